/*
 * CLinux: the Linux plumbing, other than userfaultfd, that Swift cannot reach.
 *
 * Swift cannot call variadic functions (syscall), cannot expand the CMSG_*
 * macros, does not see GNU functions and types without _GNU_SOURCE (accept4,
 * memfd_create, mremap, prlimit, struct ucred) and walks `epoll_event`'s union
 * awkwardly. Each of those is wrapped as a small function with a `clinux_`
 * prefix. Every wrapper returns 0 (or a count, or a descriptor) on success and
 * `-errno` on failure, so Swift never reads the thread-local `errno` after
 * another call could clobber it.
 *
 * The definitions live in linux.c, not inline here: they need _GNU_SOURCE,
 * and a header that defined it would give glibc types a second shape that
 * clashes with swift-system's CSystem module in any Swift file importing both.
 */
#ifndef CLINUX_H
#define CLINUX_H

#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/types.h>

/* ---- processes and memory ---- */

int clinux_pidfd_open(pid_t pid);

int clinux_pidfd_send_signal(int pidfd, int sig);
/// A pidfd of the process that connected `sock` (SO_PEERPIDFD, Linux 6.5): it
/// names that process even after its pid is reused. Returns it, or -errno.
int clinux_peer_pidfd(int sock);

/* ---- sockets: SCM_RIGHTS and SO_PEERCRED ---- */

enum { CLINUX_MAX_FDS = 8 };

/* Sends one datagram/packet with up to CLINUX_MAX_FDS descriptors attached. */
ssize_t clinux_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/*
 * Receives one packet and any descriptors (installed close-on-exec). Returns
 * the byte count (0 at end of stream) or -errno; `*truncated` is set when the
 * payload or the descriptor list did not fit (the descriptors that did arrive
 * are still returned so the caller can close them).
 */
ssize_t clinux_recv_with_fds(int sock, void *buf, size_t len, int *fds, int *nfds, int *truncated, int flags);

int clinux_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid);

/*
 * A SOCK_SEQPACKET (SOCK_STREAM if `stream`) listener at `path`, mode set before it is reachable, that
 * takes nobody's place. Under an exclusive flock of the socket's directory,
 * what is at `path` is lstat'ed (a symlink is not followed):
 *   nothing                    the listener is bound there;
 *   a socket no one listens on (connect: ECONNREFUSED, a dead broker's)
 *                              it is unlinked and replaced;
 *   a socket something answers on         -EADDRINUSE (left alone);
 *   anything that is not a socket         -EEXIST (left alone).
 * Returns the listener (non-blocking), or -errno; `*device` and `*inode` name
 * the socket file it made, for `clinux_unlink_socket`.
 */
int clinux_listen_unix(const char *path, int stream, mode_t mode, int backlog, uint64_t *device, uint64_t *inode);

/* Unlinks `path` only if it is still the socket file `device`/`inode`
 * (-ESTALE otherwise): a listener going away never removes a successor's. */
int clinux_unlink_socket(const char *path, uint64_t device, uint64_t inode);

int clinux_connect_unix(const char *path);

int clinux_accept(int listener);

/* Socket buffers big enough for a batch of page-carrying packets; FORCE works as root. */
void clinux_set_socket_buffers(int sock, int bytes);

/* ---- epoll / eventfd (a thin layer so Swift sees no unions) ---- */

int clinux_epoll_create(void);

int clinux_epoll_ctl(int ep, int op, int fd, uint32_t events, uint64_t token);

typedef struct { uint32_t events; uint64_t token; } clinux_ready;

int clinux_epoll_wait(int ep, clinux_ready *out, int max, int timeout_ms);

static const int clinux_epoll_add = EPOLL_CTL_ADD;
static const int clinux_epoll_del = EPOLL_CTL_DEL;
static const int clinux_epoll_mod = EPOLL_CTL_MOD;
static const uint32_t clinux_epollin = EPOLLIN;
static const uint32_t clinux_epollout = EPOLLOUT;
static const uint32_t clinux_epollerr = EPOLLERR;
static const uint32_t clinux_epollhup = EPOLLHUP;

int clinux_eventfd(void);

/* ---- signals and children ---- */

/* Blocks `signals` in the calling thread (and threads it creates later) and
 * returns a signalfd that becomes readable when one arrives, or -errno. */
int clinux_signalfd(const int *signals, int count);

/* Reads one pending signal from a signalfd; returns its number or -errno. */
int clinux_read_signal(int fd);

enum { CLINUX_SPAWN_MAX_DESCRIPTORS = 16 };

/* Where a spawned child's standard descriptors come from (NULL: inherited). */
typedef struct {
  const char *stdin_path;
  const char *stdout_path;   /* created 0644 */
  const char *stderr_path;
  int truncate;              /* truncate stdout/stderr files instead of appending */
  const int *descriptors;    /* these become the child's fds 3, 4, ... (in order; at most */
  int ndescriptors;          /* CLINUX_SPAWN_MAX_DESCRIPTORS), close-on-exec cleared there */
  int new_process_group;     /* the child leads a process group of its own */
  /* Who the child runs as: with set_credentials, its supplementary groups
   * become `groups` (`ngroups` of them), then its gid `gid`, then its uid `uid`
   * (real, effective and saved), after the descriptors above are opened and
   * before exec. Needs CAP_SETUID/CAP_SETGID unless they are the caller's own. */
  int set_credentials;
  uid_t uid;
  gid_t gid;
  const gid_t *groups;
  int ngroups;
  int no_new_privs;          /* prctl(PR_SET_NO_NEW_PRIVS): exec can never grant privileges */
} clinux_spawn_options;

/* Starts `path` with signals unblocked and SIGINT/SIGTERM/SIGPIPE default in
 * the child, descriptors and credentials as `options` say. Returns the pid or
 * -errno (of the first step that failed in the child, exec included). */
pid_t clinux_spawn(const char *path, char *const argv[], char *const envp[], const clinux_spawn_options *options);

/* prlimit(2) of RLIMIT_NOFILE for another process (a GNU function): 0 or -errno. */
int clinux_set_descriptor_limit(pid_t pid, uint64_t limit);

/* ---- sockets handed over (systemd's socket activation) ---- */

/* The filesystem path the Unix socket `fd` is bound to (getsockname), written
 * NUL-terminated into `out` (`size` bytes): its length, 0 for an unnamed or
 * abstract socket, or -errno (-ENAMETOOLONG if it does not fit). */
int clinux_socket_path(int fd, char *out, size_t size);

/* Sets O_NONBLOCK on `fd`, a descriptor that may have come blocking: 0 or -errno. */
int clinux_set_nonblocking(int fd);

/* ---- files ---- */

/* openat2(2) of `path` relative to the directory `dirfd`, read-only,
 * close-on-exec, non-blocking (a FIFO must not hang the caller), with
 * RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS: the path can
 * neither climb out of `dirfd` (an absolute path or `..` past it fails with
 * EXDEV) nor follow a symlink anywhere (ELOOP). Returns the fd or -errno
 * (-ENOSYS before Linux 5.6). */
int clinux_open_beneath(int dirfd, const char *path);

/* An O_PATH descriptor of the directory `path` (follows symlinks; close-on-exec),
 * to resolve paths beneath with clinux_open_beneath. Returns it or -errno. */
int clinux_open_directory(const char *path);

/* Whether the file has a POSIX access ACL (1), none (0), or -errno: a mode
 * check that ignores ACLs must refuse a file that has one. */
int clinux_has_access_acl(int fd);

/* ---- memfds and mappings ---- */

/* A memfd of `size` bytes that can never shrink or grow (sealed): safe for
 * another process to map and copy from. Returns the fd or -errno. */
int clinux_sealed_memfd(const char *name, uint64_t size);

/* memfd_create(2) with MFD_CLOEXEC: a growable anonymous file. Returns the fd or -errno. */
int clinux_memfd(const char *name);

/* Checks that fd is a memfd sealed against shrinking; returns its size, or -errno
 * (-EPERM when it is not sealed). */
int64_t clinux_sealed_memfd_size(int fd);

/* What a client's shared-memory file is, for the broker that will fill it:
 * 0 a tmpfs file (memfd, /dev/shm) opened read-write and not sealed against
 * writes; 1 on hugetlbfs; 2 on another filesystem; 3 not opened read-write;
 * 4 sealed against writes (F_SEAL_WRITE, F_SEAL_FUTURE_WRITE); or -errno. */
int clinux_shared_memory_kind(int fd);

/* Reads one byte through a volatile pointer: a first touch the optimizer cannot remove. */
uint8_t clinux_touch(const void *address);

/* mremap(2) (a GNU function). Returns MAP_FAILED on error. */
void *clinux_mremap(void *old_address, size_t old_size, size_t new_size, int flags, void *new_address);
static const int clinux_mremap_maymove = 1;    /* MREMAP_MAYMOVE */
static const int clinux_mremap_fixed = 2;      /* MREMAP_FIXED */
static const int clinux_mremap_dontunmap = 4;  /* MREMAP_DONTUNMAP */

#endif
