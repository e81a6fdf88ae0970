/* The definitions of CUserfaultfd.h (see there for why they are not inline). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <signal.h>
#include <spawn.h>
#include <sys/signalfd.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <pthread.h>
#include <unistd.h>
#include "CUserfaultfd.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

/* The kernel's message is packed and 32 bytes; the flattening relies on it. */
_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg layout changed");

int cuffd_create(int flags) {
  long fd = syscall(SYS_userfaultfd, flags);
  if (fd >= 0) return (int)fd;
  int err = errno;
  if (err != ENOSYS && err != EPERM) return -err;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) return -err; /* report the syscall's reason, it explains more */
  int nfd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
  int nerr = errno;
  close(dev);
  return nfd >= 0 ? nfd : -nerr;
}

int cuffd_api_handshake(int fd, uint64_t features, uint64_t *granted_features, uint64_t *ioctls) {
  struct uffdio_api api = { .api = UFFD_API, .features = features };
  if (ioctl(fd, UFFDIO_API, &api) != 0) return -errno;
  *granted_features = api.features;
  *ioctls = api.ioctls;
  return 0;
}

int cuffd_is_userfaultfd(int fd) {
  char path[64], target[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(path, target, sizeof target - 1);
  if (n < 0) return -errno;
  target[n] = 0;
  return strcmp(target, "anon_inode:[userfaultfd]") == 0;
}

int cuffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls) {
  struct uffdio_register r = { .range = { start, len }, .mode = mode };
  if (ioctl(fd, UFFDIO_REGISTER, &r) != 0) return -errno;
  *ioctls = r.ioctls;
  return 0;
}

int cuffd_unregister(int fd, uint64_t start, uint64_t len) {
  struct uffdio_range r = { start, len };
  return ioctl(fd, UFFDIO_UNREGISTER, &r) == 0 ? 0 : -errno;
}

int cuffd_wake(int fd, uint64_t start, uint64_t len) {
  struct uffdio_range r = { start, len };
  return ioctl(fd, UFFDIO_WAKE, &r) == 0 ? 0 : -errno;
}

int cuffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *done) {
  struct uffdio_copy c = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = mode, .copy = 0 };
  int rc = ioctl(fd, UFFDIO_COPY, &c) == 0 ? 0 : -errno;
  *done = c.copy;
  return rc;
}

int cuffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done) {
  struct uffdio_zeropage z = { .range = { start, len }, .mode = mode, .zeropage = 0 };
  int rc = ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0 ? 0 : -errno;
  *done = z.zeropage;
  return rc;
}

int cuffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode) {
  struct uffdio_writeprotect w = { .range = { start, len }, .mode = mode };
  return ioctl(fd, UFFDIO_WRITEPROTECT, &w) == 0 ? 0 : -errno;
}

int cuffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done) {
  struct uffdio_continue c = { .range = { start, len }, .mode = mode, .mapped = 0 };
  int rc = ioctl(fd, UFFDIO_CONTINUE, &c) == 0 ? 0 : -errno;
  *done = c.mapped;
  return rc;
}

int cuffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done) {
  struct uffdio_poison p = { .range = { start, len }, .mode = mode, .updated = 0 };
  int rc = ioctl(fd, UFFDIO_POISON, &p) == 0 ? 0 : -errno;
  *done = p.updated;
  return rc;
}

int cuffd_read_events(int fd, cuffd_event *out, int max) {
  struct uffd_msg msgs[CUFFD_READ_BATCH];
  if (max > CUFFD_READ_BATCH) max = CUFFD_READ_BATCH;
  ssize_t n;
  do { n = read(fd, msgs, sizeof(struct uffd_msg) * (size_t)max); } while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  int count = (int)(n / (ssize_t)sizeof(struct uffd_msg));
  for (int i = 0; i < count; i++) {
    const struct uffd_msg *m = &msgs[i];
    cuffd_event *e = &out[i];
    memset(e, 0, sizeof *e);
    e->event = m->event;
    e->fd = -1;
    switch (m->event) {
    case UFFD_EVENT_PAGEFAULT:
      e->flags = m->arg.pagefault.flags;
      e->a = m->arg.pagefault.address;
      e->thread = m->arg.pagefault.feat.ptid;
      break;
    case UFFD_EVENT_FORK: e->fd = (int32_t)m->arg.fork.ufd; break;
    case UFFD_EVENT_REMAP:
      e->a = m->arg.remap.from; e->b = m->arg.remap.to; e->length = m->arg.remap.len;
      break;
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP:
      e->a = m->arg.remove.start; e->b = m->arg.remove.end;
      break;
    default: break;
    }
  }
  return count;
}

int cuffd_pidfd_open(pid_t pid) {
  long fd = syscall(SYS_pidfd_open, pid, 0);
  return fd >= 0 ? (int)fd : -errno;
}

int cuffd_pidfd_send_signal(int pidfd, int sig) {
  return syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) == 0 ? 0 : -errno;
}

int cuffd_memfd_create(const char *name, unsigned int flags) {
  int fd = memfd_create(name, flags);
  return fd >= 0 ? fd : -errno;
}

pid_t cuffd_gettid(void) { return (pid_t)syscall(SYS_gettid); }

ssize_t cuffd_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
  struct iovec iov = { (void *)buf, len };
  union { char buf[CMSG_SPACE(sizeof(int) * CUFFD_MAX_FDS)]; struct cmsghdr align; } control;
  struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
  if (nfds > CUFFD_MAX_FDS) return -EINVAL;
  if (nfds > 0) {
    memset(&control, 0, sizeof control);
    m.msg_control = control.buf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
  }
  ssize_t n;
  do { n = sendmsg(sock, &m, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
  return n >= 0 ? n : -errno;
}

ssize_t cuffd_recv_with_fds(int sock, void *buf, size_t len, int *fds, int *nfds, int *truncated, int flags) {
  struct iovec iov = { buf, len };
  union { char buf[CMSG_SPACE(sizeof(int) * CUFFD_MAX_FDS)]; struct cmsghdr align; } control;
  struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf };
  ssize_t n;
  *nfds = 0;
  *truncated = 0;
  do { n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC | flags); } while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    int count = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < count && *nfds < CUFFD_MAX_FDS; i++) {
      memcpy(&fds[*nfds], CMSG_DATA(cm) + sizeof(int) * (size_t)i, sizeof(int));
      (*nfds)++;
    }
  }
  if (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) *truncated = 1;
  return n;
}

int cuffd_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid) {
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -errno;
  *pid = cred.pid; *uid = cred.uid; *gid = cred.gid;
  return 0;
}

int cuffd_listen_unix(const char *path, mode_t mode, int backlog) {
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  if (strlen(path) >= sizeof addr.sun_path) return -ENAMETOOLONG;
  strcpy(addr.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -errno;
  unlink(path);
  mode_t old = umask((mode_t)~mode & 0777);
  int rc = bind(fd, (struct sockaddr *)&addr, sizeof addr);
  umask(old);
  if (rc != 0 || chmod(path, mode) != 0 || listen(fd, backlog) != 0) {
    int err = errno;
    close(fd);
    return -err;
  }
  return fd;
}

int cuffd_connect_unix(const char *path) {
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  if (strlen(path) >= sizeof addr.sun_path) return -ENAMETOOLONG;
  strcpy(addr.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  int rc;
  do { rc = connect(fd, (struct sockaddr *)&addr, sizeof addr); } while (rc != 0 && errno == EINTR);
  if (rc != 0) { int err = errno; close(fd); return -err; }
  return fd;
}

int cuffd_accept(int listener) {
  int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
  return fd >= 0 ? fd : -errno;
}

void cuffd_set_socket_buffers(int sock, int bytes) {
  if (setsockopt(sock, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0)
    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
  if (setsockopt(sock, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0)
    setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
}

int cuffd_epoll_create(void) {
  int fd = epoll_create1(EPOLL_CLOEXEC);
  return fd >= 0 ? fd : -errno;
}

int cuffd_epoll_ctl(int ep, int op, int fd, uint32_t events, uint64_t token) {
  struct epoll_event ev = { .events = events, .data.u64 = token };
  return epoll_ctl(ep, op, fd, &ev) == 0 ? 0 : -errno;
}

int cuffd_epoll_wait(int ep, cuffd_ready *out, int max, int timeout_ms) {
  struct epoll_event evs[64];
  if (max > 64) max = 64;
  int n = epoll_wait(ep, evs, max, timeout_ms);
  if (n < 0) return -errno;
  for (int i = 0; i < n; i++) { out[i].events = evs[i].events; out[i].token = evs[i].data.u64; }
  return n;
}

int cuffd_timerfd_create(void) {
  int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  return fd >= 0 ? fd : -errno;
}

int cuffd_timerfd_arm(int fd, uint64_t ns) {
  struct itimerspec t = { .it_value = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) } };
  if (ns == 0) { t.it_value.tv_sec = 0; t.it_value.tv_nsec = 0; }
  return timerfd_settime(fd, 0, &t, NULL) == 0 ? 0 : -errno;
}

int cuffd_eventfd(void) {
  int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  return fd >= 0 ? fd : -errno;
}

uint64_t cuffd_monotonic_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int cuffd_termination_signalfd(void) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) return -errno;
  int fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  return fd >= 0 ? fd : -errno;
}

int cuffd_read_signal(int fd) {
  struct signalfd_siginfo info;
  ssize_t n = read(fd, &info, sizeof info);
  if (n < 0) return -errno;
  return n == sizeof info ? (int)info.ssi_signo : -EIO;
}

void cuffd_unblock_signals(void) {
  sigset_t set;
  sigemptyset(&set);
  pthread_sigmask(SIG_SETMASK, &set, NULL);
}

pid_t cuffd_spawn(const char *path, char *const argv[], char *const envp[], const cuffd_spawn_options *options) {
  posix_spawnattr_t attr;
  posix_spawn_file_actions_t actions;
  sigset_t none, defaults;
  pid_t pid;
  sigemptyset(&none);
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGINT);
  sigaddset(&defaults, SIGTERM);
  sigaddset(&defaults, SIGPIPE);
  posix_spawnattr_init(&attr);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
  if (options->new_process_group) {
    flags |= POSIX_SPAWN_SETPGROUP;
    posix_spawnattr_setpgroup(&attr, 0);
  }
  posix_spawnattr_setflags(&attr, flags);
  posix_spawn_file_actions_init(&actions);
  int mode = O_WRONLY | O_CREAT | (options->truncate ? O_TRUNC : O_APPEND);
  if (options->stdin_path) posix_spawn_file_actions_addopen(&actions, 0, options->stdin_path, O_RDONLY, 0);
  if (options->stdout_path) posix_spawn_file_actions_addopen(&actions, 1, options->stdout_path, mode, 0644);
  if (options->stderr_path) posix_spawn_file_actions_addopen(&actions, 2, options->stderr_path, mode, 0644);
  /* dup2 onto 3 clears close-on-exec there: only the child keeps that descriptor. */
  if (options->descriptor3 >= 0) posix_spawn_file_actions_adddup2(&actions, options->descriptor3, 3);
  int rc = posix_spawn(&pid, path, &actions, &attr, argv, envp);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  return rc == 0 ? pid : -rc;
}
int cuffd_sealed_memfd(const char *name, uint64_t size) {
  int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return -errno;
  if (ftruncate(fd, (off_t)size) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    int err = errno;
    close(fd);
    return -err;
  }
  return fd;
}

int cuffd_memfd(const char *name) {
  int fd = memfd_create(name, MFD_CLOEXEC);
  return fd < 0 ? -errno : fd;
}

int64_t cuffd_sealed_memfd_size(int fd) {
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) return -errno;
  if (!(seals & F_SEAL_SHRINK)) return -EPERM;
  struct stat info;
  if (fstat(fd, &info) != 0) return -errno;
  return (int64_t)info.st_size;
}

int cuffd_set_descriptor_limit(pid_t pid, uint64_t limit) {
  struct rlimit value = { .rlim_cur = limit, .rlim_max = limit };
  return prlimit(pid, RLIMIT_NOFILE, &value, NULL) == 0 ? 0 : -errno;
}

uint8_t cuffd_touch(const void *address) { return *(const volatile uint8_t *)address; }

void *cuffd_mremap(void *old_address, size_t old_size, size_t new_size, int flags, void *new_address) {
  _Static_assert(MREMAP_MAYMOVE == 1 && MREMAP_FIXED == 2, "mremap flags differ from the header's constants");
  return mremap(old_address, old_size, new_size, flags, new_address);
}
