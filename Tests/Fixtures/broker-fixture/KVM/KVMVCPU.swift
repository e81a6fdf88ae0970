import CKVM
import Glibc

/// One vCPU: its descriptor and its shared `kvm_run` page. Closes both on deinit.
final class KVMVCPU {
  private let fd: CInt
  private let shared: UnsafeMutablePointer<kvm_run>
  private let runSize: Int

  init(adopting fd: CInt, runSize: Int) throws(KVMError) {
    guard let mapped = mmap(nil, runSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), mapped != MAP_FAILED else {
      let error = errno
      close(fd)
      throw KVMError("cannot map the vCPU's kvm_run", errno: error)
    }
    self.fd = fd
    self.shared = mapped.assumingMemoryBound(to: kvm_run.self)
    self.runSize = runSize
  }

  deinit {
    munmap(shared, runSize)
    close(fd)
  }

  /// The state a restore gives the vCPU (its "vmstate"): 64-bit long mode with
  /// paging from the page tables at guest-physical `pageTables`, running user
  /// code (CPL 3) at `entry` with its stack at `stack`. No GDT or IDT:
  /// segments are loaded directly, and an exception (nothing to deliver it
  /// to) ends the guest in a triple fault (`KVMExit.shutdown`).
  ///
  /// The guest's OUTs are allowed by the I/O permission bitmap of the TSS at
  /// `tss` (limit `tssLimit`), not by IOPL 3 in RFLAGS: on a paravirtual KVM
  /// without VMX/SVM (guest ring 3 runs as host user code) RFLAGS.IOPL reads
  /// back as set but is 0 once the guest runs, so an OUT at CPL 3 faults and
  /// KVM's instruction emulator grants it from the TSS's bitmap. Without a TSS
  /// of ours, TR's reset value (base 0, limit 0xffff) would read whatever the
  /// guest holds at address 0 as the bitmap.
  func enterUserLongMode(pageTables: UInt64, entry: UInt64, stack: UInt64, tss: UInt64, tssLimit: UInt32) throws(KVMError) {
    var sregs = kvm_sregs()
    try KVMError.check(ckvm_get_sregs(fd, &sregs), "KVM_GET_SREGS")
    // Linux's user selectors (__USER_CS 0x33, __USER_DS 0x2b): RPL 3.
    var code = kvm_segment()
    code.limit = 0xffff_ffff
    code.selector = 0x33
    code.type = 0xb     // code: execute/read, accessed
    code.present = 1
    code.dpl = 3
    code.s = 1          // a code/data segment, not a system one
    code.l = 1          // 64-bit
    code.g = 1
    var data = code
    data.selector = 0x2b
    data.type = 0x3     // data: read/write, accessed
    data.l = 0
    data.db = 1
    sregs.cs = code
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data)
    var task = kvm_segment()
    task.base = tss
    task.limit = tssLimit
    task.selector = 0x40
    task.type = 0xb     // a busy 64-bit TSS
    task.present = 1
    sregs.tr = task
    sregs.cr0 = 1 << 0 | 1 << 1 | 1 << 4 | 1 << 5 | 1 << 16 | 1 << 31  // PE MP ET NE WP PG
    sregs.cr4 = 1 << 5                                                  // PAE
    sregs.efer = 1 << 8 | 1 << 10                                       // LME LMA
    sregs.cr3 = pageTables
    try KVMError.check(ckvm_set_sregs(fd, &sregs), "KVM_SET_SREGS")
    var regs = kvm_regs()
    regs.rip = entry
    regs.rsp = stack
    regs.rflags = 1 << 1  // the always-one bit; IOPL 0, interrupts off
    try KVMError.check(ckvm_set_regs(fd, &regs), "KVM_SET_REGS")
  }

  /// Runs the guest until it exits to us.
  func run() throws(KVMError) -> KVMExit {
    var exit = ckvm_exit()
    try KVMError.check(ckvm_run(fd, shared, &exit), "KVM_RUN")
    return KVMExit(exit)
  }

  /// The general registers (the guest reports its results in them).
  func registers() throws(KVMError) -> kvm_regs {
    var regs = kvm_regs()
    try KVMError.check(ckvm_get_regs(fd, &regs), "KVM_GET_REGS")
    return regs
  }
}
