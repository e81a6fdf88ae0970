import CKVM
import Glibc

/// A KVM virtual machine (/dev/kvm, KVM_CREATE_VM): guest-physical memory
/// slots backed by this process's memory, and vCPUs. Closes its descriptors
/// on deinit (after its vCPUs, which it outlives).
final class KVMMachine {
  private let kvm: CInt
  private let vm: CInt

  init() throws(KVMError) {
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC)
    guard kvm >= 0 else { throw KVMError("cannot open /dev/kvm", errno: errno) }
    do throws(KVMError) {
      let version = try KVMError.check(ckvm_api_version(kvm), "KVM_GET_API_VERSION")
      guard version == 12 else { throw KVMError("KVM API version \(version), not 12") }
      vm = try KVMError.check(ckvm_create_vm(kvm), "KVM_CREATE_VM")
    } catch {
      close(kvm)
      throw error
    }
  }

  deinit {
    close(vm)
    close(kvm)
  }

  /// Guest-physical [`guestPhysical`, + `memory.count`) is `memory` (KVM_SET_USER_MEMORY_REGION).
  /// KVM reaches it through this process's page tables (get_user_pages), so a
  /// page the guest touches faults here as if this process had touched it.
  func map(_ memory: UnsafeMutableRawBufferPointer, at guestPhysical: UInt64, slot: UInt32 = 0) throws(KVMError) {
    let host = UInt64(UInt(bitPattern: memory.baseAddress))
    try KVMError.check(ckvm_set_memory_region(vm, slot, guestPhysical, UInt64(memory.count), host), "KVM_SET_USER_MEMORY_REGION")
  }

  func createVCPU(id: UInt = 0) throws(KVMError) -> KVMVCPU {
    let size = try KVMError.check(ckvm_vcpu_mmap_size(kvm), "KVM_GET_VCPU_MMAP_SIZE")
    let fd = try KVMError.check(ckvm_create_vcpu(vm, id), "KVM_CREATE_VCPU")
    return try KVMVCPU(adopting: fd, runSize: Int(size))
  }
}
