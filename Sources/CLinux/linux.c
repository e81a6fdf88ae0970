/* The definitions of CLinux.h (see there for why they are not inline). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <signal.h>
#include <spawn.h>
#include <sys/signalfd.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <linux/openat2.h>
#include <pthread.h>
#include <unistd.h>
#include "CLinux.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

int clinux_pidfd_open(pid_t pid) {
  long fd = syscall(SYS_pidfd_open, pid, 0);
  return fd >= 0 ? (int)fd : -errno;
}

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

int clinux_peer_pidfd(int sock) {
  int pidfd = -1;
  socklen_t len = sizeof pidfd;
  if (getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0) return pidfd;
  return -errno;
}

int clinux_pidfd_send_signal(int pidfd, int sig) {
  return syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) == 0 ? 0 : -errno;
}

ssize_t clinux_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
  struct iovec iov = { (void *)buf, len };
  union { char buf[CMSG_SPACE(sizeof(int) * CLINUX_MAX_FDS)]; struct cmsghdr align; } control;
  struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
  if (nfds > CLINUX_MAX_FDS) return -EINVAL;
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

ssize_t clinux_recv_with_fds(int sock, void *buf, size_t len, int *fds, int *nfds, int *truncated, int flags) {
  struct iovec iov = { buf, len };
  union { char buf[CMSG_SPACE(sizeof(int) * CLINUX_MAX_FDS)]; struct cmsghdr align; } control;
  struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf };
  ssize_t n;
  *nfds = 0;
  *truncated = 0;
  do { n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC | flags); } while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    int count = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < count && *nfds < CLINUX_MAX_FDS; i++) {
      memcpy(&fds[*nfds], CMSG_DATA(cm) + sizeof(int) * (size_t)i, sizeof(int));
      (*nfds)++;
    }
  }
  if (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) *truncated = 1;
  return n;
}

int clinux_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid) {
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -errno;
  *pid = cred.pid; *uid = cred.uid; *gid = cred.gid;
  return 0;
}

/* An fd of the directory `path` lies in ("." for a bare name), or -errno. */
static int open_parent(const char *path) {
  char dir[sizeof ((struct sockaddr_un *)0)->sun_path];
  const char *slash = strrchr(path, '/');
  if (!slash) return open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  size_t n = slash == path ? 1 : (size_t)(slash - path);
  memcpy(dir, path, n);
  dir[n] = 0;
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  return fd >= 0 ? fd : -errno;
}

/* Whether something accepts connections on the socket file at `addr`: 1 yes
 * (connected, backlog full, or a socket of another type), 0 no (ECONNREFUSED:
 * its listener is gone; ENOENT: it went away), -errno when it cannot tell. */
static int socket_answers(const struct sockaddr_un *addr) {
  int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (probe < 0) return -errno;
  int err = connect(probe, (const struct sockaddr *)addr, sizeof *addr) == 0 ? 0 : errno;
  close(probe);
  switch (err) {
  case 0: case EAGAIN: case EINPROGRESS: case EPROTOTYPE: return 1;
  case ECONNREFUSED: case ENOENT: return 0;
  default: return -err;
  }
}

int clinux_listen_unix(const char *path, int stream, mode_t mode, int backlog, uint64_t *device, uint64_t *inode) {
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  if (strlen(path) >= sizeof addr.sun_path) return -ENAMETOOLONG;
  strcpy(addr.sun_path, path);
  int dir = open_parent(path);
  if (dir < 0) return dir;
  /* Held until `dir` is closed: two brokers starting together must not both
   * find the path free, nor one unlink the other's socket before it listens. */
  if (flock(dir, LOCK_EX) != 0) { int err = errno; close(dir); return -err; }
  int result;
  struct stat st;
  if (lstat(path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) { result = -EEXIST; goto done; }  /* not ours to remove */
    int answers = socket_answers(&addr);
    if (answers != 0) { result = answers > 0 ? -EADDRINUSE : answers; goto done; }
    if (unlink(path) != 0 && errno != ENOENT) { result = -errno; goto done; }  /* a dead broker's */
  } else if (errno != ENOENT) {
    result = -errno;
    goto done;
  }
  int fd = socket(AF_UNIX, (stream ? SOCK_STREAM : SOCK_SEQPACKET) | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) { result = -errno; goto done; }
  mode_t old = umask((mode_t)~mode & 0777);
  int rc = bind(fd, (struct sockaddr *)&addr, sizeof addr);
  umask(old);
  if (rc != 0 || lstat(path, &st) != 0 || chmod(path, mode) != 0 || listen(fd, backlog) != 0) {
    result = -errno;
    if (rc == 0) unlink(path);
    close(fd);
    goto done;
  }
  *device = (uint64_t)st.st_dev;
  *inode = (uint64_t)st.st_ino;
  result = fd;
done:
  close(dir);
  return result;
}

int clinux_unlink_socket(const char *path, uint64_t device, uint64_t inode) {
  struct stat st;
  if (lstat(path, &st) != 0) return -errno;
  if (!S_ISSOCK(st.st_mode) || (uint64_t)st.st_dev != device || (uint64_t)st.st_ino != inode) return -ESTALE;
  return unlink(path) == 0 ? 0 : -errno;
}

int clinux_connect_unix(const char *path) {
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

int clinux_accept(int listener) {
  int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
  return fd >= 0 ? fd : -errno;
}

void clinux_set_socket_buffers(int sock, int bytes) {
  if (setsockopt(sock, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0)
    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
  if (setsockopt(sock, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0)
    setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
}

int clinux_epoll_create(void) {
  int fd = epoll_create1(EPOLL_CLOEXEC);
  return fd >= 0 ? fd : -errno;
}

int clinux_epoll_ctl(int ep, int op, int fd, uint32_t events, uint64_t token) {
  struct epoll_event ev = { .events = events, .data.u64 = token };
  return epoll_ctl(ep, op, fd, &ev) == 0 ? 0 : -errno;
}

int clinux_epoll_wait(int ep, clinux_ready *out, int max, int timeout_ms) {
  struct epoll_event evs[64];
  if (max > 64) max = 64;
  int n = epoll_wait(ep, evs, max, timeout_ms);
  if (n < 0) return -errno;
  for (int i = 0; i < n; i++) { out[i].events = evs[i].events; out[i].token = evs[i].data.u64; }
  return n;
}

int clinux_eventfd(void) {
  int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  return fd >= 0 ? fd : -errno;
}

int clinux_signalfd(const int *signals, int count) {
  sigset_t set;
  sigemptyset(&set);
  for (int i = 0; i < count; i++) sigaddset(&set, signals[i]);
  if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) return -errno;
  int fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  return fd >= 0 ? fd : -errno;
}

int clinux_read_signal(int fd) {
  struct signalfd_siginfo info;
  ssize_t n = read(fd, &info, sizeof info);
  if (n < 0) return -errno;
  return n == sizeof info ? (int)info.ssi_signo : -EIO;
}

#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* Makes `fd` the descriptor `target` (open across exec). */
static int move_descriptor(int fd, int target) {
  if (fd == target) return fcntl(fd, F_SETFD, 0);
  if (dup2(fd, target) < 0) return -1;
  return 0;
}

/* The child of a spawn that changes credentials, between fork and exec: only
 * async-signal-safe calls (the parent is multi-threaded; another thread may
 * have held malloc's lock at the fork). The credentials are set with raw
 * system calls: glibc's setuid() and friends signal every thread of the
 * process to change them all, machinery a forked child must not rely on. The
 * first failure's errno is written to `report` (close-on-exec: an exec that
 * succeeds closes it with nothing written). */
static void spawn_child(const char *path, char *const argv[], char *const envp[], const clinux_spawn_options *options, int report) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_handler = SIG_DFL;
  sigaction(SIGINT, &action, NULL);
  sigaction(SIGTERM, &action, NULL);
  sigaction(SIGPIPE, &action, NULL);
  sigset_t none;
  sigemptyset(&none);
  int failed = 0;
  int first_free = 3 + options->ndescriptors;
  /* Out of the way of the descriptors set up below. */
  if (report < first_free) report = fcntl(report, F_DUPFD_CLOEXEC, first_free);
  if (sigprocmask(SIG_SETMASK, &none, NULL) != 0) failed = 1;
  if (!failed && options->new_process_group && setpgid(0, 0) != 0) failed = 1;
  int mode = O_WRONLY | O_CREAT | (options->truncate ? O_TRUNC : O_APPEND);
  const char *paths[3] = { options->stdin_path, options->stdout_path, options->stderr_path };
  for (int target = 0; target < 3 && !failed; target++) {
    if (!paths[target]) continue;
    int fd = open(paths[target], target == 0 ? O_RDONLY : mode, 0644);
    if (fd < 0 || move_descriptor(fd, target) != 0) failed = 1;
    else if (fd != target) close(fd);
  }
  for (int i = 0; i < options->ndescriptors && !failed; i++)
    if (move_descriptor(options->descriptors[i], 3 + i) != 0) failed = 1;
  /* Nothing else of the parent's crosses the exec, close-on-exec or not (Linux 5.11; older: best effort). */
  if (!failed) syscall(SYS_close_range, (unsigned)first_free, ~0U, CLOSE_RANGE_CLOEXEC);
  if (!failed && options->set_credentials) {
    if (syscall(SYS_setgroups, (size_t)options->ngroups, options->groups) != 0
        || syscall(SYS_setresgid, options->gid, options->gid, options->gid) != 0
        || syscall(SYS_setresuid, options->uid, options->uid, options->uid) != 0) failed = 1;
  }
  if (!failed && options->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) failed = 1;
  if (!failed) execve(path, argv, envp);
  int err = errno;
  ssize_t written;
  do written = write(report, &err, sizeof err); while (written < 0 && errno == EINTR);
  _exit(127);
}

/* fork + the child above + exec; the child's failure is read back from a pipe. */
static pid_t spawn_with_credentials(const char *path, char *const argv[], char *const envp[], const clinux_spawn_options *options) {
  int report[2];
  if (pipe2(report, O_CLOEXEC) != 0) return -errno;
  pid_t pid = fork();
  if (pid == 0) {
    close(report[0]);
    spawn_child(path, argv, envp, options, report[1]);
  }
  int err = errno;
  close(report[1]);
  if (pid < 0) {
    close(report[0]);
    return -err;
  }
  int child_error = 0;
  ssize_t got;
  do got = read(report[0], &child_error, sizeof child_error); while (got < 0 && errno == EINTR);
  close(report[0]);
  if (got == (ssize_t)sizeof child_error) {
    /* It exits at once: reap it, so no zombie stays behind. */
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    return -(child_error ? child_error : EIO);
  }
  return pid;
}

static pid_t spawn(const char *path, char *const argv[], char *const envp[], const clinux_spawn_options *options) {
  /* posix_spawn cannot change credentials: those spawns fork and exec themselves. */
  if (options->set_credentials || options->no_new_privs) return spawn_with_credentials(path, argv, envp, options);
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
  /* dup2 onto 3, 4, ... clears close-on-exec there: only the child keeps those descriptors. */
  for (int i = 0; i < options->ndescriptors; i++) posix_spawn_file_actions_adddup2(&actions, options->descriptors[i], 3 + i);
  int rc = posix_spawn(&pid, path, &actions, &attr, argv, envp);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  return rc == 0 ? pid : -rc;
}

pid_t clinux_spawn(const char *path, char *const argv[], char *const envp[], const clinux_spawn_options *options) {
  int count = options->ndescriptors;
  if (count < 0 || count > CLINUX_SPAWN_MAX_DESCRIPTORS) return -EINVAL;
  /* The descriptors are copied above 3 + count first, so that moving one onto
   * its place (dup2, in order) never overwrites another still to be moved
   * (the descriptor given for the child's 4 may be our 3). */
  int moved[CLINUX_SPAWN_MAX_DESCRIPTORS];
  for (int i = 0; i < count; i++) {
    moved[i] = fcntl(options->descriptors[i], F_DUPFD_CLOEXEC, 3 + count);
    if (moved[i] < 0) {
      int err = errno;
      while (i-- > 0) close(moved[i]);
      return -err;
    }
  }
  clinux_spawn_options copy = *options;
  copy.descriptors = moved;
  pid_t pid = spawn(path, argv, envp, &copy);
  for (int i = 0; i < count; i++) close(moved[i]);
  return pid;
}

int clinux_socket_path(int fd, char *out, size_t size) {
  struct sockaddr_un addr;
  socklen_t length = sizeof addr;
  memset(&addr, 0, sizeof addr);
  if (getsockname(fd, (struct sockaddr *)&addr, &length) != 0) return -errno;
  if (addr.sun_family != AF_UNIX) return -EAFNOSUPPORT;
  if (length <= offsetof(struct sockaddr_un, sun_path) || addr.sun_path[0] == 0) return 0;  /* unnamed or abstract */
  size_t count = strnlen(addr.sun_path, length - offsetof(struct sockaddr_un, sun_path));
  if (count + 1 > size) return -ENAMETOOLONG;
  memcpy(out, addr.sun_path, count);
  out[count] = 0;
  return (int)count;
}

int clinux_set_nonblocking(int fd) {
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return -errno;
  if (flags & O_NONBLOCK) return 0;
  return fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 ? 0 : -errno;
}

#ifndef SYS_openat2
#define SYS_openat2 437
#endif

int clinux_open_beneath(int dirfd, const char *path) {
  struct open_how how;
  memset(&how, 0, sizeof how);
  how.flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
  return fd >= 0 ? (int)fd : -errno;
}

int clinux_open_directory(const char *path) {
  int fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
  return fd >= 0 ? fd : -errno;
}

int clinux_has_access_acl(int fd) {
  ssize_t size = fgetxattr(fd, "system.posix_acl_access", NULL, 0);
  if (size >= 0) return size > 0;
  return errno == ENODATA || errno == EOPNOTSUPP ? 0 : -errno;
}

int clinux_sealed_memfd(const char *name, uint64_t size) {
  int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return -errno;
  if (ftruncate(fd, (off_t)size) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    int err = errno;
    close(fd);
    return -err;
  }
  return fd;
}

int clinux_memfd(const char *name) {
  int fd = memfd_create(name, MFD_CLOEXEC);
  return fd < 0 ? -errno : fd;
}

int64_t clinux_sealed_memfd_size(int fd) {
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) return -errno;
  if (!(seals & F_SEAL_SHRINK)) return -EPERM;
  struct stat info;
  if (fstat(fd, &info) != 0) return -errno;
  return (int64_t)info.st_size;
}

int clinux_set_descriptor_limit(pid_t pid, uint64_t limit) {
  struct rlimit value = { .rlim_cur = limit, .rlim_max = limit };
  return prlimit(pid, RLIMIT_NOFILE, &value, NULL) == 0 ? 0 : -errno;
}

int clinux_shared_memory_kind(int fd) {
  struct statfs fs;
  if (fstatfs(fd, &fs) != 0) return -errno;
  if (fs.f_type == HUGETLBFS_MAGIC) return 1;
  if (fs.f_type != TMPFS_MAGIC) return 2;
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return -errno;
  if ((flags & O_ACCMODE) != O_RDWR) return 3;
  int seals = fcntl(fd, F_GET_SEALS);  /* EINVAL: a tmpfs file that takes no seals */
  if (seals > 0 && (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))) return 4;
  return 0;
}

uint8_t clinux_touch(const void *address) { return *(const volatile uint8_t *)address; }

void *clinux_mremap(void *old_address, size_t old_size, size_t new_size, int flags, void *new_address) {
  _Static_assert(MREMAP_MAYMOVE == 1 && MREMAP_FIXED == 2, "mremap flags differ from the header's constants");
  return mremap(old_address, old_size, new_size, flags, new_address);
}
