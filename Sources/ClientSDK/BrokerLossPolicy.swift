/// What a client does when its broker goes away (crash, restart, upgrade).
public enum BrokerLossPolicy: Sendable {
  /// What to do when no broker came back in time. Never zeros: the faulting
  /// threads stay blocked until one of these happens.
  public enum Otherwise: Sendable {
    /// Print why and abort the process (the default: a clear, immediate failure).
    case terminate
    /// Serve the client's faults itself with UFFDIO_POISON: an access to a
    /// page that was never filled gets SIGBUS; filled pages keep working.
    case poison
    /// Call this (on the monitor thread) and leave the faulting threads blocked.
    case call(@Sendable (ClientError) -> Void)
  }

  /// Re-attach to a broker at the same socket as soon as one answers (same
  /// uffd, same regions); give up after `withinMilliseconds`.
  case reattach(withinMilliseconds: Int, otherwise: Otherwise)
  /// No monitoring: faulting threads stay blocked if the broker dies.
  case none
}
