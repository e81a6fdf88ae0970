import Glibc

/// The huge page sizes this kernel offers (hugetlbfs, `MAP_HUGETLB`), in bytes,
/// ascending: the `hugepages-<N>kB` entries of `/sys/kernel/mm/hugepages`.
/// Empty when the kernel has no hugetlb support.
package func kernelHugePageSizes() -> [Int] {
  guard let directory = opendir("/sys/kernel/mm/hugepages") else { return [] }
  defer { closedir(directory) }
  var sizes: [Int] = []
  while let entry = readdir(directory) {
    let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    guard name.hasPrefix("hugepages-"), name.hasSuffix("kB"), let kib = Int(name.dropFirst(10).dropLast(2)) else { continue }
    sizes.append(kib << 10)
  }
  return sizes.sorted()
}
