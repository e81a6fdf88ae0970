import Glibc

/// Starts a joinable POSIX thread running `body`.
package func spawnThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
  final class Box { let body: @Sendable () -> Void; init(_ body: @escaping @Sendable () -> Void) { self.body = body } }
  var thread = pthread_t()
  let box = Unmanaged.passRetained(Box(body)).toOpaque()
  let rc = pthread_create(&thread, nil, { raw in
    let box = Unmanaged<AnyObject>.fromOpaque(raw!).takeRetainedValue() as! Box
    box.body()
    return nil
  }, box)
  precondition(rc == 0, "pthread_create failed: \(rc)")
  return thread
}
