// A C plugin without a shared area, for HugePageTests: a seccomp filter makes
// memfd_create fail (ENOSYS) before it connects, so its SDK sends every page's
// bytes inline. It serves the fixture's pattern, one page per fault.
//   inline NAME
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <uffd_plugin.h>

// memfd_create answers ENOSYS, as on a kernel without it; every other call is allowed.
static int deny_memfd(void) {
  struct sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_memfd_create, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog program = {.len = sizeof filter / sizeof filter[0], .filter = filter};
  return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program);
}

static uffd_decision pagefault(const uffd_fault *fault, uffd_region *region, void *buffer, size_t size, void *user) {
  (void)size, (void)user;
  uint64_t *words = buffer, backing = region->backing_offset + fault->offset;
  for (uint64_t i = 0; i < region->page_size / 8; i++) words[i] = (backing + i * 8 + 1) * 0x9E3779B97F4A7C15ull;
  return uffd_copy();
}

int main(int argc, char **argv) {
  if (argc != 2) return fprintf(stderr, "usage: %s NAME\n", argv[0]), 2;
  if (deny_memfd() != 0) return perror("inline: seccomp"), 1;
  uffd_plugin *plugin = uffd_plugin_connect(NULL, argv[1]);
  if (!plugin) return fprintf(stderr, "inline: %s\n", uffd_plugin_last_error()), 1;
  uffd_callbacks callbacks = {.pagefault = pagefault};
  int result = uffd_plugin_run(plugin, &callbacks, NULL);
  if (result != 0) fprintf(stderr, "inline: %s\n", uffd_plugin_last_error());
  uffd_plugin_free(plugin);
  return result == 0 ? 0 : 1;
}
