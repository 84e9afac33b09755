#if canImport(Glibc)
    import Glibc
#endif

/// NVIDIA's management library, loaded at run time with `dlopen` (never a build dependency):
/// per-device utilization, memory, power and temperature. `load()` is nil where it is absent.
public final class NVML: Sendable {
    private typealias Init = @convention(c) () -> Int32
    private typealias Count = @convention(c) (UnsafeMutablePointer<UInt32>) -> Int32
    private typealias Handle = @convention(c) (UInt32, UnsafeMutablePointer<OpaquePointer?>) -> Int32
    /// `nvmlUtilization_t` is two `unsigned int`s (gpu, memory); `nvmlMemory_t` three `unsigned long long`s (total, free, used).
    private typealias Utilization = @convention(c) (OpaquePointer?, UnsafeMutablePointer<UInt32>) -> Int32
    private typealias Memory = @convention(c) (OpaquePointer?, UnsafeMutablePointer<UInt64>) -> Int32
    private typealias Power = @convention(c) (OpaquePointer?, UnsafeMutablePointer<UInt32>) -> Int32
    private typealias Temperature = @convention(c) (OpaquePointer?, Int32, UnsafeMutablePointer<UInt32>) -> Int32

    private let count: Count
    private let handle: Handle
    private let utilization: Utilization
    private let memory: Memory
    private let power: Power
    private let powerLimit: Power
    private let temperature: Temperature

    private init(count: Count, handle: Handle, utilization: Utilization, memory: Memory, power: Power, powerLimit: Power, temperature: Temperature) {
        self.count = count
        self.handle = handle
        self.utilization = utilization
        self.memory = memory
        self.power = power
        self.powerLimit = powerLimit
        self.temperature = temperature
    }

    /// The library, initialized, or nil when it is not installed or does not initialize (no GPU, no driver).
    public static func load(path: String = "libnvidia-ml.so.1") -> NVML? {
        guard let library = dlopen(path, RTLD_NOW | RTLD_LOCAL) else { return nil }
        func symbol<T>(_ name: String, as type: T.Type) -> T? {
            dlsym(library, name).map { unsafeBitCast($0, to: type) }
        }
        guard let initialize = symbol("nvmlInit_v2", as: Init.self), initialize() == 0,
            let count = symbol("nvmlDeviceGetCount_v2", as: Count.self),
            let handle = symbol("nvmlDeviceGetHandleByIndex_v2", as: Handle.self),
            let utilization = symbol("nvmlDeviceGetUtilizationRates", as: Utilization.self),
            let memory = symbol("nvmlDeviceGetMemoryInfo", as: Memory.self),
            let power = symbol("nvmlDeviceGetPowerUsage", as: Power.self),
            let powerLimit = symbol("nvmlDeviceGetEnforcedPowerLimit", as: Power.self),
            let temperature = symbol("nvmlDeviceGetTemperature", as: Temperature.self)
        else {
            return nil
        }
        return NVML(count: count, handle: handle, utilization: utilization, memory: memory, power: power, powerLimit: powerLimit, temperature: temperature)
    }

    /// Per device, MLflow's metric names (after `gpu_<i>_`) and values; a figure the device does
    /// not report is left out.
    public func devices() -> [[String: Double]] {
        var n: UInt32 = 0
        guard count(&n) == 0 else { return [] }
        return (0..<n).map { index in
            var out: [String: Double] = [:]
            var device: OpaquePointer?
            guard handle(index, &device) == 0 else { return out }
            var rates: [UInt32] = [0, 0]
            if utilization(device, &rates) == 0 { out["utilization_percentage"] = Double(rates[0]) }
            var info: [UInt64] = [0, 0, 0]  // total, free, used
            if memory(device, &info) == 0, info[0] > 0 {
                out["memory_usage_megabytes"] = Double(info[2]) / 1e6
                out["memory_usage_percentage"] = Double(info[2]) / Double(info[0]) * 100
                out["memory_total_megabytes"] = Double(info[0]) / 1e6
            }
            var milliwatts: UInt32 = 0
            var limit: UInt32 = 0
            if power(device, &milliwatts) == 0 {
                out["power_usage_watts"] = Double(milliwatts) / 1000
                if powerLimit(device, &limit) == 0, limit > 0 { out["power_usage_percentage"] = Double(milliwatts) / Double(limit) * 100 }
            }
            var celsius: UInt32 = 0
            if temperature(device, 0, &celsius) == 0 { out["temperature_celsius"] = Double(celsius) }  // NVML_TEMPERATURE_GPU
            return out
        }
    }
}
