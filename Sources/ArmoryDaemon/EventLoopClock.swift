import NIOCore
import NIOPosix
import Synchronization

/// Timers and the concurrency pool on NIO's event loops instead of libdispatch's global queues
/// (docs/architecture.md, "Starting and stopping"). Once any libdispatch worker thread exists,
/// libdispatch on Linux arms a 1 Hz pool monitor for good, which alone would keep an idle
/// daemon at one wake-up a second; `Task.sleep` is one way in (its delayed jobs run on those
/// workers), so the daemon's timers sleep here.
public enum EventLoopClock {
    /// Makes NIO's singleton event loops Swift Concurrency's global executor. Call it first thing
    /// in `main`, once; false when the runtime does not offer the hook (the pool stays
    /// libdispatch's, and only idle wake-ups differ).
    @discardableResult
    public static func runConcurrencyOnEventLoops() -> Bool {
        NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
    }

    /// Runs `body` to its end on NIO's event loops while the calling thread (the main one) waits:
    /// no job goes to the main queue, which libdispatch on Linux serves with a pool worker (an
    /// `async` main would start the pool, and its monitor, at once).
    public static func runBlocking(_ body: @escaping @Sendable () async -> Void) {
        try? MultiThreadedEventLoopGroup.singleton.next().makeFutureWithTask(body).wait()
    }

    /// Sleeps for `duration` on a timer of NIO's singleton event loops; throws
    /// `CancellationError` when the task is cancelled first.
    public static func sleep(for duration: Duration) async throws {
        try await sleep(nanoseconds: Int64(duration.components.seconds) * 1_000_000_000 + Int64(duration.components.attoseconds / 1_000_000_000))
    }

    /// Sleeps until `deadline` (`ContinuousClock`), as `sleep(for:)`.
    public static func sleep(until deadline: ContinuousClock.Instant) async throws {
        let left = ContinuousClock.now.duration(to: deadline)
        if left > .zero { try await sleep(for: left) }
    }

    private static func sleep(nanoseconds: Int64) async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.any()  // the current loop when on one: no other thread wakes
        let state = Mutex<(continuation: CheckedContinuation<Void, any Error>?, timer: Scheduled<Void>?, cancelled: Bool)>((nil, nil, false))
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let timer = loop.scheduleTask(in: .nanoseconds(max(0, nanoseconds))) { () -> Void in
                    state.withLock { $0.continuation.take() }?.resume()
                }
                let cancelledAlready = state.withLock { s -> Bool in
                    s.continuation = continuation
                    s.timer = timer
                    return s.cancelled
                }
                if cancelledAlready, let waiting = state.withLock({ $0.continuation.take() }) {
                    timer.cancel()
                    waiting.resume(throwing: CancellationError())
                }
            }
        } onCancel: {
            let (waiting, timer) = state.withLock { s in
                s.cancelled = true
                return (s.continuation.take(), s.timer)
            }
            timer?.cancel()
            waiting?.resume(throwing: CancellationError())
        }
    }

    /// Calls `body` after `seconds` on a timer of NIO's singleton event loops (not the loops a
    /// health check asks about); cancel the result to call nothing.
    @discardableResult
    public static func after(seconds: Double, _ body: @escaping @Sendable () -> Void) -> Scheduled<Void> {
        MultiThreadedEventLoopGroup.singleton.any().scheduleTask(in: .nanoseconds(Int64(seconds * 1e9)), body)
    }
}
