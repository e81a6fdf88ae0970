import BrokerProtocol
import Glibc
import SystemPackage
import Testing
@testable import BrokerRuntime

/// The pid path of taking a connecting process's pidfd (what a kernel before
/// 6.5 allows): kept only for a live process whose ids are the connection's.
@Suite struct PeerPidfdTests {
  let me = PeerCredentials(pid: getpid(), uid: geteuid(), gid: getegid())

  @Test("A live process with the connection's uid and gid: its pidfd is kept")
  func matchingProcess() throws {
    let pidfd = try PeerPidfd.open(pid: me.pid, expecting: me).get()
    let valid = pidfd.isValid
    #expect(valid)
  }

  @Test("A process at the pid with other ids than the connection's is refused (its pid names another process by now)",
        arguments: [(1, 0), (0, 1)])
  func otherIDs(uidDelta: UInt32, gidDelta: UInt32) {
    let other = PeerCredentials(pid: me.pid, uid: me.uid &+ uidDelta, gid: me.gid &+ gidDelta)
    #expect(throws: Errno.noSuchProcess) { try PeerPidfd.open(pid: me.pid, expecting: other).get() }
  }

  @Test("A process that has exited and been reaped is refused")
  func exitedProcess() throws {
    var pid: pid_t = 0
    let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/true"), nil]
    defer { argv.forEach { free($0) } }
    #expect(posix_spawn(&pid, "/bin/true", nil, nil, argv, nil) == 0)
    var status: CInt = 0
    #expect(waitpid(pid, &status, 0) == pid)
    #expect(throws: Errno.noSuchProcess) { try PeerPidfd.open(pid: pid, expecting: PeerCredentials(pid: pid, uid: me.uid, gid: me.gid)).get() }
  }

  @Test("/proc/PID/status's effective ids are read (the second of four)")
  func effectiveIDs() throws {
    let ids = try #require(PeerPidfd.effectiveIDs(of: getpid()))
    #expect(ids.uid == geteuid() && ids.gid == getegid())
  }
}
