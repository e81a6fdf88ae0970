import CKVM

/// Why a vCPU came back from KVM_RUN, as the test VMM needs to tell.
enum KVMExit: Equatable, CustomStringConvertible {
  /// The guest wrote `value` (its size's low bytes) to I/O `port`.
  case out(port: UInt16, value: UInt32)
  /// HLT (only at ring 0; at ring 3 it faults).
  case halt
  /// A triple fault: an exception the guest had no IDT for.
  case shutdown
  /// A signal interrupted KVM_RUN.
  case interrupted
  /// Anything else: the raw reason and its detail (entry failure, suberror, MMIO address).
  case other(reason: UInt32, detail: UInt64)

  init(_ exit: ckvm_exit) {
    switch exit.reason {
    case ckvm_exit_io where exit.io_direction == ckvm_io_out: self = .out(port: exit.io_port, value: exit.io_value)
    case ckvm_exit_hlt: self = .halt
    case ckvm_exit_shutdown: self = .shutdown
    case ckvm_exit_intr: self = .interrupted
    default: self = .other(reason: exit.reason, detail: exit.detail)
    }
  }

  var description: String {
    switch self {
    case .out(let port, let value): "out port 0x\(String(port, radix: 16)) value 0x\(String(value, radix: 16))"
    case .halt: "hlt"
    case .shutdown: "shutdown (triple fault)"
    case .interrupted: "interrupted"
    case .other(let reason, let detail): "exit reason \(reason) (detail 0x\(String(detail, radix: 16)))"
    }
  }
}
