#include "CKVM.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

/* The layouts the kernel shares with us; Swift imports them from linux/kvm.h as they are. */
_Static_assert(sizeof(struct kvm_regs) == 18 * 8, "kvm_regs layout changed");
_Static_assert(sizeof(struct kvm_segment) == 24, "kvm_segment layout changed");

static int value_or_errno(long rc) { return rc < 0 ? -errno : (int)rc; }

int ckvm_api_version(int kvm) { return value_or_errno(ioctl(kvm, KVM_GET_API_VERSION, 0)); }
int ckvm_create_vm(int kvm) { return value_or_errno(ioctl(kvm, KVM_CREATE_VM, 0)); }
int ckvm_vcpu_mmap_size(int kvm) { return value_or_errno(ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)); }

int ckvm_set_memory_region(int vm, uint32_t slot, uint64_t gpa, uint64_t size, uint64_t host) {
  struct kvm_userspace_memory_region region = {
    .slot = slot, .flags = 0, .guest_phys_addr = gpa, .memory_size = size, .userspace_addr = host,
  };
  return value_or_errno(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region));
}

int ckvm_create_vcpu(int vm, unsigned long id) { return value_or_errno(ioctl(vm, KVM_CREATE_VCPU, id)); }

int ckvm_get_sregs(int vcpu, struct kvm_sregs *sregs) { return value_or_errno(ioctl(vcpu, KVM_GET_SREGS, sregs)); }
int ckvm_set_sregs(int vcpu, const struct kvm_sregs *sregs) { return value_or_errno(ioctl(vcpu, KVM_SET_SREGS, sregs)); }
int ckvm_get_regs(int vcpu, struct kvm_regs *regs) { return value_or_errno(ioctl(vcpu, KVM_GET_REGS, regs)); }
int ckvm_set_regs(int vcpu, const struct kvm_regs *regs) { return value_or_errno(ioctl(vcpu, KVM_SET_REGS, regs)); }

int ckvm_run(int vcpu, struct kvm_run *run, struct ckvm_exit *exit) {
  memset(exit, 0, sizeof *exit);
  if (ioctl(vcpu, KVM_RUN, 0) < 0) {
    if (errno != EINTR) return -errno;
    exit->reason = KVM_EXIT_INTR;
    return 0;
  }
  exit->reason = run->exit_reason;
  switch (run->exit_reason) {
  case KVM_EXIT_IO:
    exit->io_direction = run->io.direction;
    exit->io_size = run->io.size;
    exit->io_port = run->io.port;
    exit->io_count = run->io.count;
    if (run->io.size <= sizeof exit->io_value)
      memcpy(&exit->io_value, (const char *)run + run->io.data_offset, run->io.size);
    break;
  case KVM_EXIT_FAIL_ENTRY: exit->detail = run->fail_entry.hardware_entry_failure_reason; break;
  case KVM_EXIT_INTERNAL_ERROR: exit->detail = run->internal.suberror; break;
  case KVM_EXIT_MMIO: exit->detail = run->mmio.phys_addr; break;
  }
  return 0;
}
