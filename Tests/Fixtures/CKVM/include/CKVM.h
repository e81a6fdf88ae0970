/*
 * CKVM: the KVM ioctls the test VMM (broker-fixture's kvm-vmm) needs, which
 * Swift cannot reach.
 *
 * Swift cannot call the variadic ioctl, cannot import the function-like
 * KVM_* request macros, and reads `struct kvm_run`'s exit union awkwardly.
 * Each ioctl is a small function with a `ckvm_` prefix returning 0 (or a
 * descriptor, or a size) on success and `-errno` on failure; the exit a
 * KVM_RUN ended with is flattened into `struct ckvm_exit`. All logic (the
 * guest's state, the run loop) is in Swift.
 */
#ifndef CKVM_H
#define CKVM_H

#include <stdint.h>
#include <linux/kvm.h>

/* ---- exit reasons (macros do not import into Swift) ---- */
static const uint32_t ckvm_exit_io = KVM_EXIT_IO;
static const uint32_t ckvm_exit_hlt = KVM_EXIT_HLT;
static const uint32_t ckvm_exit_mmio = KVM_EXIT_MMIO;
static const uint32_t ckvm_exit_shutdown = KVM_EXIT_SHUTDOWN;
static const uint32_t ckvm_exit_fail_entry = KVM_EXIT_FAIL_ENTRY;
static const uint32_t ckvm_exit_internal_error = KVM_EXIT_INTERNAL_ERROR;
static const uint32_t ckvm_exit_intr = KVM_EXIT_INTR;
static const uint8_t ckvm_io_out = KVM_EXIT_IO_OUT;

/* ---- /dev/kvm ---- */

/* KVM_GET_API_VERSION: 12 on every kernel since 2.6.22. */
int ckvm_api_version(int kvm);
/* KVM_CREATE_VM (default machine type): the VM's descriptor, close-on-exec. */
int ckvm_create_vm(int kvm);
/* KVM_GET_VCPU_MMAP_SIZE: the size of a vCPU's shared `struct kvm_run` mapping. */
int ckvm_vcpu_mmap_size(int kvm);

/* ---- a VM ---- */

/* KVM_SET_USER_MEMORY_REGION: guest-physical [gpa, gpa + size) is the caller's memory at `host`. */
int ckvm_set_memory_region(int vm, uint32_t slot, uint64_t gpa, uint64_t size, uint64_t host);
/* KVM_CREATE_VCPU: the vCPU's descriptor, close-on-exec. */
int ckvm_create_vcpu(int vm, unsigned long id);

/* ---- a vCPU ---- */

int ckvm_get_sregs(int vcpu, struct kvm_sregs *sregs);
int ckvm_set_sregs(int vcpu, const struct kvm_sregs *sregs);
int ckvm_get_regs(int vcpu, struct kvm_regs *regs);
int ckvm_set_regs(int vcpu, const struct kvm_regs *regs);

/* Why a KVM_RUN returned, flattened from `struct kvm_run`'s union. */
struct ckvm_exit {
  uint32_t reason;          /* ckvm_exit_* */
  uint8_t io_direction;     /* KVM_EXIT_IO: ckvm_io_out or in */
  uint8_t io_size;          /* KVM_EXIT_IO: bytes per access (1, 2, 4) */
  uint16_t io_port;         /* KVM_EXIT_IO */
  uint32_t io_count;        /* KVM_EXIT_IO: accesses (rep outs) */
  uint32_t io_value;        /* KVM_EXIT_IO out: the first access's bytes */
  uint64_t detail;          /* FAIL_ENTRY: hardware reason; INTERNAL_ERROR: suberror; MMIO: address */
};

/*
 * KVM_RUN until the guest exits to userspace; `run` is the vCPU's mapped
 * `struct kvm_run`. A signal's EINTR (KVM_EXIT_INTR) is returned as an exit,
 * not retried: the caller decides whether to run again.
 */
int ckvm_run(int vcpu, struct kvm_run *run, struct ckvm_exit *exit);

#endif
