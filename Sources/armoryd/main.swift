import ArmoryDaemon

// armoryd starts here rather than in an `async` main: Swift Concurrency runs on NIO's event loops,
// and the command runs on them while this thread waits, so libdispatch's pool (and its monitor,
// once a second for the rest of the process) never starts; an idle daemon wakes only for its own
// timers (docs/architecture.md, "Starting and stopping").
EventLoopClock.runConcurrencyOnEventLoops()
EventLoopClock.runBlocking { await ArmoryDaemonCommand.main() }
