import BrokerCore
import BrokerProtocol
import ChildProcess
import Glibc

/// Who each spawned plugin runs as. A plugin acts for clients, so it must not
/// hold the broker's privileges: a root broker runs it as the configured
/// `user`/`group`, by default the dedicated user `uffd-plugin` if the system
/// has one, else `nobody`; root only when the config says `"user": "root"`.
/// A broker that is not root cannot change users: it runs its plugins as
/// itself, and a `user` or `group` other than its own is a config error.
enum PluginCredentials {
  /// The dedicated user a root broker runs plugins as by default, when it exists.
  static let dedicatedUser = "uffd-plugin"
  /// The fallback when it does not (and no `nobody` entry exists either).
  static let nobody: UInt32 = 65534

  /// The credentials of each of `plugins` (nil: the broker's own, unchanged).
  static func resolve(_ plugins: [BrokerConfiguration.SpawnedPlugin]) throws(BrokerError) -> [ChildProcess.Credentials?] {
    var credentials: [ChildProcess.Credentials?] = []
    for (index, plugin) in plugins.enumerated() { credentials.append(try resolve(plugin, index: index)) }
    return credentials
  }

  /// The credentials of `plugin` (nil: the broker's own, unchanged).
  static func resolve(_ plugin: BrokerConfiguration.SpawnedPlugin, index: Int) throws(BrokerError) -> ChildProcess.Credentials? {
    let field = "plugins[\(index)]"
    let brokerUID = geteuid()
    guard brokerUID == 0 else {
      // Not root: no other user is reachable. Saying so beats failing at each spawn.
      if let user = plugin.user, try uid(of: user, field: field + ".user") != brokerUID {
        throw BrokerError(.malformed, "\(field).user \(user): the broker runs as uid \(brokerUID) and cannot run plugins as another user (run it as root, or leave user out)")
      }
      if let group = plugin.group, try gid(of: group, field: field + ".group") != getegid() {
        throw BrokerError(.malformed, "\(field).group \(group): the broker runs as gid \(getegid()) and cannot run plugins in another group (run it as root, or leave group out)")
      }
      return nil
    }
    let account: Account
    if let user = plugin.user {
      let uid = try uid(of: user, field: field + ".user")
      account = Account(uid: uid) ?? Account(name: user, uid: uid, gid: nil)
    } else {
      account = Account(name: dedicatedUser) ?? Account(name: "nobody") ?? Account(name: "nobody", uid: nobody, gid: nobody)
    }
    if let group = plugin.group {
      let gid = try gid(of: group, field: field + ".group")
      return ChildProcess.Credentials(uid: account.uid, gid: gid, groups: [gid])
    }
    guard let gid = account.gid else {
      throw BrokerError(.malformed, "\(field).user \(plugin.user ?? ""): no such user in the user database, so no group to run it in: give \(field).group")
    }
    return ChildProcess.Credentials(uid: account.uid, gid: gid, groups: account.groups)
  }

  private static func uid(of user: String, field: String) throws(BrokerError) -> UInt32 {
    if let number = UInt32(user), number != UInt32.max { return number }
    guard let account = Account(name: user) else { throw BrokerError(.malformed, "\(field) \"\(user)\" is no user on this system") }
    return account.uid
  }

  private static func gid(of group: String, field: String) throws(BrokerError) -> UInt32 {
    if let number = UInt32(group), number != UInt32.max { return number }
    var entry = Glibc.group()
    var result: UnsafeMutablePointer<Glibc.group>?
    var buffer = [CChar](repeating: 0, count: 16_384)
    guard getgrnam_r(group, &entry, &buffer, buffer.count, &result) == 0, result != nil else {
      throw BrokerError(.malformed, "\(field) \"\(group)\" is no group on this system")
    }
    return entry.gr_gid
  }

  /// A user database entry (getpwnam_r / getpwuid_r), with its groups.
  private struct Account {
    var name: String
    var uid: UInt32
    var gid: UInt32?
    var groups: [UInt32] = []

    init(name: String, uid: UInt32, gid: UInt32?) {
      self.name = name
      self.uid = uid
      self.gid = gid
      self.groups = gid.map { [$0] } ?? []
    }

    init?(name: String) {
      self.init { entry, buffer, result in getpwnam_r(name, &entry, buffer.baseAddress!, buffer.count, &result) }
    }

    init?(uid: UInt32) {
      self.init { entry, buffer, result in getpwuid_r(uid, &entry, buffer.baseAddress!, buffer.count, &result) }
    }

    private init?(_ lookup: (inout passwd, UnsafeMutableBufferPointer<CChar>, inout UnsafeMutablePointer<passwd>?) -> CInt) {
      var entry = passwd()
      var result: UnsafeMutablePointer<passwd>?
      var buffer = [CChar](repeating: 0, count: 16_384)
      let status = buffer.withUnsafeMutableBufferPointer { lookup(&entry, $0, &result) }
      guard status == 0, result != nil else { return nil }
      name = String(cString: entry.pw_name)
      uid = entry.pw_uid
      gid = entry.pw_gid
      // The user's supplementary groups, as a login would have them (getgrouplist).
      var count: CInt = 64
      var list = [gid_t](repeating: 0, count: Int(count))
      if getgrouplist(entry.pw_name, entry.pw_gid, &list, &count) < 0 {
        list = [gid_t](repeating: 0, count: Int(count))
        if getgrouplist(entry.pw_name, entry.pw_gid, &list, &count) < 0 { count = 0 }
      }
      groups = count > 0 ? Array(list[..<Int(count)]) : [entry.pw_gid]
    }
  }
}

extension BrokerConfiguration {
  /// Checks that every spawned plugin's `user` and `group` can be taken (they
  /// exist, and a broker that is not root is asked for none but its own).
  public func checkPluginUsers() throws(BrokerError) {
    _ = try PluginCredentials.resolve(plugins)
  }
}
