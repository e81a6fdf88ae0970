import Glibc

/// The memory of the test VMM's guest, as its snapshot file holds it: the
/// guest's page tables, its code and its data all come from this image (the
/// VMM restores them through the broker); only the vCPU's registers come from
/// the VMM (`KVMVCPU.enterUserLongMode`, the "vmstate").
///
/// Guest-physical layout (identity-mapped, 4 KiB pages):
///
///     0x0000            not mapped (a null access faults)
///     0x1000            PML4 → 0x2000 PDPT → 0x3000 PD → page tables from 0x4000, one per 2 MiB
///     0x80000           the code (read-only, user); its parameters at +0x100
///     0x81000           the TSS, whose I/O permission bitmap lets ring 3 use the guest's ports
///     0x8f000–0x90000   the stack page (RSP starts at 0x90000)
///     1 MiB ...         data pages, a known pattern (`pattern(at:)`): the guest's checksum covers them
///     `free`            inside the data: the balloon's area, read only at the end
///     last 2 MiB        scratch pages: the guest adds to every qword of them
///
/// The free area starts and ends half a prefetch block (8 pages) off a 16-page
/// boundary, so the snapshot plugin's aligned prefetch around the data next to
/// it reaches into it. The guest sums the data above it only after the
/// balloon is done: its first fault's block covers 8 dropped pages, and a
/// ballooned page refilled with the snapshot's bytes would show in the
/// guest's checksum of the area.
struct GuestImage {
  static let pml4: UInt64 = 0x1000
  static let firstPageTable: UInt64 = 0x4000
  static let code: UInt64 = 0x8_0000
  static let parameters: UInt64 = code + 0x100
  static let tss: UInt64 = 0x8_1000
  /// The TSS's limit: the 104-byte 64-bit TSS, then the I/O permission bitmap
  /// for ports 0–31 and the byte of ones the bitmap must end with.
  static let tssLimit: UInt32 = 0x68 + 4
  static let stackTop: UInt64 = 0x9_0000
  static let dataStart: UInt64 = 1 << 20
  static let pageSize = 4096

  /// The guest's ports: it stops at each OUT and the VMM resumes it.
  enum Port: UInt16, CaseIterable {
    /// The data below the free area summed: the VMM may start its balloon,
    /// which runs while the guest writes its scratch pages.
    case halfway = 0x11
    /// Scratch pages written: the guest waits here until the balloon is done.
    case balloonDone = 0x12
    /// The end: RAX holds the data checksum, RBX the free area's.
    case done = 0x10
  }

  let size: Int
  let free: Range<UInt64>
  let scratch: Range<UInt64>

  /// `mib`: the guest's memory, a multiple of 8 from 8 to 128 MiB (its page
  /// tables must fit below the code).
  init?(mib: Int) {
    guard mib >= 8, mib <= 128, mib % 8 == 0 else { return nil }
    size = mib << 20
    let halfBlock = UInt64(8 * Self.pageSize)
    let freeStart = UInt64(mib << 19) + halfBlock
    free = freeStart..<(freeStart + UInt64(mib << 17))
    scratch = UInt64(size - (2 << 20))..<UInt64(size)
  }

  /// The data pages the guest's checksum covers, in the order it sums them.
  var checksummed: [Range<UInt64>] { [Self.dataStart..<free.lowerBound, free.upperBound..<scratch.lowerBound] }
  var dataPages: Int { checksummed.reduce(0) { $0 + $1.count } / Self.pageSize }

  /// The snapshot's qword at guest-physical `address` (1 MiB and up): splitmix64 of the address.
  static func pattern(at address: UInt64) -> UInt64 {
    var z = address &+ 0x9e37_79b9_7f4a_7c15
    z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
    z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
    return z ^ (z >> 31)
  }

  static let fnvBasis: UInt64 = 0xcbf2_9ce4_8422_2325
  static let fnvPrime: UInt64 = 0x100_0000_01b3

  /// The guest's checksum: FNV-1a over qwords (hash ^= qword; hash *= prime).
  static func checksum(_ memory: UnsafeRawBufferPointer, _ range: Range<UInt64>, continuing hash: UInt64 = fnvBasis) -> UInt64 {
    var hash = hash
    let qwords = UnsafeBufferPointer(start: (memory.baseAddress! + Int(range.lowerBound)).assumingMemoryBound(to: UInt64.self), count: range.count / 8)
    for qword in qwords { hash = (hash ^ qword) &* fnvPrime }
    return hash
  }

  /// What the guest adds to the qword at `address` in the scratch area: its
  /// page's index in the area in the high half, its index in the page in the low.
  func scratchIncrement(at address: UInt64) -> UInt64 {
    let offset = address - scratch.lowerBound
    return (offset >> 12) << 32 | (offset & 0xfff) >> 3
  }

  /// The guest's code, hand-assembled (x86-64, Intel syntax, offsets in the code page).
  /// It reads its parameters (five qwords at +0x100: data start, free start,
  /// free end, scratch start, scratch end) RIP-relatively. In order: the
  /// checksum of the data below the free area; `halfway`; the scratch pages;
  /// `balloonDone`; the checksum continued over the data above the free area;
  /// the free area's own checksum; `done`.
  static let program: [UInt8] = [
    0x48, 0x8d, 0x2d, 0xf9, 0x00, 0x00, 0x00,                     // 00 lea rbp, [rip+0xf9]                   ; rbp = the parameters (+0x100)
    0x49, 0xbc, 0xb3, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,   // 07 movabs r12, 0x100000001b3             ; FNV prime
    0x48, 0xb8, 0x25, 0x23, 0x22, 0x84, 0xe4, 0x9c, 0xf2, 0xcb,   // 11 movabs rax, 0xcbf29ce484222325        ; FNV basis
    0x48, 0x8b, 0x75, 0x00,                                       // 1b mov rsi, [rbp]                        ; data start
    0x48, 0x8b, 0x7d, 0x08,                                       // 1f mov rdi, [rbp+8]                      ; free start
    0xe8, 0x6e, 0x00, 0x00, 0x00,                                 // 23 call fnv (0x96)                       ; rax = checksum of [rsi, rdi)
    0x49, 0x89, 0xc5,                                             // 28 mov r13, rax                          ; r13 = checksum of the first half
    0xe6, 0x11,                                                   // 2b out 0x11, al                          ; halfway: the balloon starts
    0x48, 0x8b, 0x75, 0x18,                                       // 2d mov rsi, [rbp+0x18]                   ; scratch start
    0x48, 0x8b, 0x7d, 0x20,                                       // 31 mov rdi, [rbp+0x20]                   ; scratch end
    0x49, 0x89, 0xf0,                                             // 35 mov r8, rsi
    0x48, 0x89, 0xf0,                                             // 38 mov rax, rsi                          ; scratch:
    0x4c, 0x29, 0xc0,                                             // 3b sub rax, r8                           ; offset in the scratch area
    0x48, 0x89, 0xc2,                                             // 3e mov rdx, rax
    0x48, 0xc1, 0xea, 0x0c,                                       // 41 shr rdx, 12                           ; page index
    0x48, 0xc1, 0xe2, 0x20,                                       // 45 shl rdx, 32
    0x25, 0xff, 0x0f, 0x00, 0x00,                                 // 49 and eax, 0xfff
    0xc1, 0xe8, 0x03,                                             // 4e shr eax, 3                            ; qword index in the page
    0x48, 0x09, 0xc2,                                             // 51 or rdx, rax
    0x48, 0x01, 0x16,                                             // 54 add [rsi], rdx                        ; reads the snapshot's qword, writes the sum
    0x48, 0x83, 0xc6, 0x08,                                       // 57 add rsi, 8
    0x48, 0x39, 0xfe,                                             // 5b cmp rsi, rdi
    0x72, 0xd8,                                                   // 5e jb scratch (0x38)
    0xe6, 0x12,                                                   // 60 out 0x12, al                          ; waits until the balloon is done
    0x4c, 0x89, 0xe8,                                             // 62 mov rax, r13                          ; the checksum so far
    0x48, 0x8b, 0x75, 0x10,                                       // 65 mov rsi, [rbp+0x10]                   ; free end
    0x48, 0x8b, 0x7d, 0x18,                                       // 69 mov rdi, [rbp+0x18]                   ; scratch start (the data's end)
    0xe8, 0x24, 0x00, 0x00, 0x00,                                 // 6d call fnv                              ; continues the checksum
    0x49, 0x89, 0xc5,                                             // 72 mov r13, rax                          ; r13 = data checksum
    0x48, 0xb8, 0x25, 0x23, 0x22, 0x84, 0xe4, 0x9c, 0xf2, 0xcb,   // 75 movabs rax, 0xcbf29ce484222325        ; FNV basis
    0x48, 0x8b, 0x75, 0x08,                                       // 7f mov rsi, [rbp+8]                      ; free start
    0x48, 0x8b, 0x7d, 0x10,                                       // 83 mov rdi, [rbp+0x10]                   ; free end
    0xe8, 0x0a, 0x00, 0x00, 0x00,                                 // 87 call fnv                              ; the free area's checksum
    0x48, 0x89, 0xc3,                                             // 8c mov rbx, rax                          ; rbx = free area checksum
    0x4c, 0x89, 0xe8,                                             // 8f mov rax, r13                          ; rax = data checksum
    0xe6, 0x10,                                                   // 92 out 0x10, al                          ; done
    0xeb, 0xfe,                                                   // 94 jmp $                                 ; never resumed
    0x48, 0x33, 0x06,                                             // 96 xor rax, [rsi]                        ; fnv: rax = FNV-1a of the qwords in [rsi, rdi) from rax
    0x49, 0x0f, 0xaf, 0xc4,                                       // 99 imul rax, r12
    0x48, 0x83, 0xc6, 0x08,                                       // 9d add rsi, 8
    0x48, 0x39, 0xfe,                                             // a1 cmp rsi, rdi
    0x72, 0xf0,                                                   // a4 jb fnv (0x96)
    0xc3,                                                         // a6 ret
  ]

  /// Writes the whole image into `memory` (`size` bytes, zeroed).
  func build(into memory: UnsafeMutableRawBufferPointer) {
    precondition(memory.count == size)
    let present: UInt64 = 1, writable: UInt64 = 2, user: UInt64 = 4
    let tables = size >> 21
    memory.storeBytes(of: 0x2000 | present | writable | user, toByteOffset: Int(Self.pml4), as: UInt64.self)
    memory.storeBytes(of: 0x3000 | present | writable | user, toByteOffset: 0x2000, as: UInt64.self)
    for table in 0..<tables {
      let address = Self.firstPageTable + UInt64(table << 12)
      memory.storeBytes(of: address | present | writable | user, toByteOffset: 0x3000 + 8 * table, as: UInt64.self)
    }
    // Page 0 stays unmapped; the page tables are the supervisor's, the code read-only.
    for page in 1..<(size / Self.pageSize) {
      let address = UInt64(page * Self.pageSize)
      let flags = switch address {
      case Self.pml4..<(Self.firstPageTable + UInt64(tables << 12)): present | writable
      case Self.code: present | user
      case Self.tss: present | writable
      default: present | writable | user
      }
      memory.storeBytes(of: address | flags, toByteOffset: Int(Self.firstPageTable) + 8 * page, as: UInt64.self)
    }
    memory.baseAddress!.advanced(by: Int(Self.code)).copyMemory(from: Self.program, byteCount: Self.program.count)
    // The TSS: only its I/O map base (offset 0x66) matters, pointing at the
    // bitmap right after it. A set bit denies its port: all of 0–31 but ours.
    memory.storeBytes(of: UInt16(0x68), toByteOffset: Int(Self.tss) + 0x66, as: UInt16.self)
    var bitmap: UInt32 = 0xffff_ffff
    for port in Port.allCases { bitmap &= ~(1 << UInt32(port.rawValue)) }
    memory.storeBytes(of: bitmap, toByteOffset: Int(Self.tss) + 0x68, as: UInt32.self)
    memory.storeBytes(of: UInt8(0xff), toByteOffset: Int(Self.tss) + 0x6c, as: UInt8.self)
    let parameters = [Self.dataStart, free.lowerBound, free.upperBound, scratch.lowerBound, scratch.upperBound]
    for (index, value) in parameters.enumerated() {
      memory.storeBytes(of: value, toByteOffset: Int(Self.parameters) + 8 * index, as: UInt64.self)
    }
    let qwords = memory.assumingMemoryBound(to: UInt64.self)
    for index in Int(Self.dataStart / 8)..<(size / 8) { qwords[index] = Self.pattern(at: UInt64(index * 8)) }
  }

  /// Writes the snapshot's memory file at `path`.
  func write(to path: String) throws(KVMError) {
    let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: Self.pageSize)
    defer { memory.deallocate() }
    memory.initializeMemory(as: UInt8.self, repeating: 0)
    build(into: memory)
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw KVMError("cannot create \(path)", errno: errno) }
    defer { close(fd) }
    var written = 0
    while written < size {
      let n = Glibc.write(fd, memory.baseAddress! + written, size - written)
      guard n > 0 else { throw KVMError("cannot write \(path)", errno: errno) }
      written += n
    }
  }
}
