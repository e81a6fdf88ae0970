/*
 * CUserfaultfd: the C that Swift cannot reach.
 *
 * Swift cannot call variadic functions (ioctl, syscall), cannot expand the
 * CMSG_* macros, cannot import function-like macros (UFFDIO_COPY, ...) and
 * walks the kernel's `uffd_msg` unions awkwardly. Each of those is wrapped
 * as a small function with a `cuffd_` prefix. Every wrapper returns 0 (or a
 * count) on success and `-errno` on failure, so Swift never reads the
 * thread-local `errno` after another call could clobber it.
 *
 * The definitions live in shim.c, not inline here: they need _GNU_SOURCE
 * (accept4, memfd_create, struct ucred), and a header that defined it would
 * give glibc types a second shape that clashes with swift-system's CSystem
 * module in any Swift file importing both.
 */
#ifndef CUSERFAULTFD_H
#define CUSERFAULTFD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/types.h>
#include <linux/userfaultfd.h>

/* Debian 12 ships 6.1 uapi headers; these arrived later (6.4–6.8). */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison { struct uffdio_range range; __u64 mode; __s64 updated; };
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC 0xAA
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif



/* ---- constants (macros do not import into Swift) ---- */
static const uint64_t cuffd_api = UFFD_API;
static const uint8_t cuffd_event_pagefault = UFFD_EVENT_PAGEFAULT;
static const uint8_t cuffd_event_fork = UFFD_EVENT_FORK;
static const uint8_t cuffd_event_remap = UFFD_EVENT_REMAP;
static const uint8_t cuffd_event_remove = UFFD_EVENT_REMOVE;
static const uint8_t cuffd_event_unmap = UFFD_EVENT_UNMAP;
static const int cuffd_ioctl_bit_register = _UFFDIO_REGISTER;
static const int cuffd_ioctl_bit_unregister = _UFFDIO_UNREGISTER;
static const int cuffd_ioctl_bit_wake = _UFFDIO_WAKE;
static const int cuffd_ioctl_bit_copy = _UFFDIO_COPY;
static const int cuffd_ioctl_bit_zeropage = _UFFDIO_ZEROPAGE;
static const int cuffd_ioctl_bit_move = _UFFDIO_MOVE;
static const int cuffd_ioctl_bit_writeprotect = _UFFDIO_WRITEPROTECT;
static const int cuffd_ioctl_bit_continue = _UFFDIO_CONTINUE;
static const int cuffd_ioctl_bit_poison = _UFFDIO_POISON;
static const int cuffd_ioctl_bit_api = _UFFDIO_API;

/* ---- creating a userfaultfd ---- */

/* The userfaultfd(2) syscall; on ENOSYS (or a seccomp filter) falls back to /dev/userfaultfd. */
int cuffd_create(int flags);

int cuffd_api_handshake(int fd, uint64_t features, uint64_t *granted_features, uint64_t *ioctls);

/* Is fd a userfaultfd? Its /proc/self/fdinfo names the anon inode "[userfaultfd]". */
int cuffd_is_userfaultfd(int fd);

/* ---- ioctls ---- */

int cuffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);

int cuffd_unregister(int fd, uint64_t start, uint64_t len);

int cuffd_wake(int fd, uint64_t start, uint64_t len);

/* `*done` receives the kernel's result field: bytes done (>0), 0, or -errno. */
int cuffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *done);

int cuffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);

int cuffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);

int cuffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);

int cuffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);

/* ---- reading events ---- */

/* One uffd_msg with its unions flattened, so Swift reads plain fields. */
typedef struct {
  uint8_t event;    /* UFFD_EVENT_* */
  uint32_t thread;  /* pagefault: faulting thread id (UFFD_FEATURE_THREAD_ID) */
  uint64_t flags;   /* pagefault: UFFD_PAGEFAULT_FLAG_* */
  uint64_t a;       /* pagefault address; remove/unmap start; remap from */
  uint64_t b;       /* remove/unmap end; remap to */
  uint64_t length;  /* remap length */
  int32_t fd;       /* fork: the child's new userfaultfd (already in our fd table) */
} cuffd_event;

enum { CUFFD_READ_BATCH = 64 };

/*
 * Reads up to `max` (<= CUFFD_READ_BATCH) messages in one read(2) and flattens
 * them. Returns the count, or -errno (-EAGAIN when none are queued).
 */
int cuffd_read_events(int fd, cuffd_event *out, int max);

/* ---- processes and memory ---- */

int cuffd_pidfd_open(pid_t pid);

int cuffd_pidfd_send_signal(int pidfd, int sig);

int cuffd_memfd_create(const char *name, unsigned int flags);

pid_t cuffd_gettid(void);

/* ---- sockets: SCM_RIGHTS and SO_PEERCRED ---- */

enum { CUFFD_MAX_FDS = 8 };

/* Sends one datagram/packet with up to CUFFD_MAX_FDS descriptors attached. */
ssize_t cuffd_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/*
 * Receives one packet and any descriptors (installed close-on-exec). Returns
 * the byte count (0 at end of stream) or -errno; `*truncated` is set when the
 * payload or the descriptor list did not fit (the descriptors that did arrive
 * are still returned so the caller can close them).
 */
ssize_t cuffd_recv_with_fds(int sock, void *buf, size_t len, int *fds, int *nfds, int *truncated, int flags);

int cuffd_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid);

/* A SOCK_SEQPACKET listener at `path` (unlinked first), mode set before it is reachable. */
int cuffd_listen_unix(const char *path, mode_t mode, int backlog);

int cuffd_connect_unix(const char *path);

int cuffd_accept(int listener);

/* Socket buffers big enough for a batch of page-carrying packets; FORCE works as root. */
void cuffd_set_socket_buffers(int sock, int bytes);

/* ---- epoll / timerfd (a thin layer so Swift sees no unions) ---- */

int cuffd_epoll_create(void);

int cuffd_epoll_ctl(int ep, int op, int fd, uint32_t events, uint64_t token);

typedef struct { uint32_t events; uint64_t token; } cuffd_ready;

int cuffd_epoll_wait(int ep, cuffd_ready *out, int max, int timeout_ms);

static const int cuffd_epoll_add = EPOLL_CTL_ADD;
static const int cuffd_epoll_del = EPOLL_CTL_DEL;
static const int cuffd_epoll_mod = EPOLL_CTL_MOD;
static const uint32_t cuffd_epollin = EPOLLIN;
static const uint32_t cuffd_epollout = EPOLLOUT;
static const uint32_t cuffd_epollerr = EPOLLERR;
static const uint32_t cuffd_epollhup = EPOLLHUP;

int cuffd_timerfd_create(void);

/* Arms a one-shot timer `ns` from now (0 disarms). */
int cuffd_timerfd_arm(int fd, uint64_t ns);

int cuffd_eventfd(void);

uint64_t cuffd_monotonic_ns(void);

/* ---- signals and children ---- */

/* Blocks SIGINT and SIGTERM in the calling thread (and threads it creates later)
 * and returns a signalfd that becomes readable when one arrives. */
int cuffd_termination_signalfd(void);

/* Reads one pending signal from a signalfd; returns its number or -errno. */
int cuffd_read_signal(int fd);

/* Unblocks every signal in the calling thread (for a child before exec). */
void cuffd_unblock_signals(void);

/* Where a spawned child's standard descriptors come from (NULL: inherited). */
typedef struct {
  const char *stdin_path;
  const char *stdout_path;   /* created 0644 */
  const char *stderr_path;
  int truncate;              /* truncate stdout/stderr files instead of appending */
  int descriptor3;           /* if >= 0: becomes the child's fd 3 */
  int new_process_group;     /* the child leads a process group of its own */
} cuffd_spawn_options;

/* posix_spawn with signals unblocked and SIGINT/SIGTERM/SIGPIPE default in the
 * child, descriptors as `options` say. Returns the pid or -errno. */
pid_t cuffd_spawn(const char *path, char *const argv[], char *const envp[], const cuffd_spawn_options *options);

/* A memfd of `size` bytes that can never shrink or grow (sealed): safe for
 * another process to map and copy from. Returns the fd or -errno. */
int cuffd_sealed_memfd(const char *name, uint64_t size);
/* memfd_create(2) with MFD_CLOEXEC: a growable anonymous file (not visible to Swift without _GNU_SOURCE). Returns the fd or -errno. */
int cuffd_memfd(const char *name);

/* Checks that fd is a memfd sealed against shrinking; returns its size, or -errno
 * (-EPERM when it is not sealed). */
int64_t cuffd_sealed_memfd_size(int fd);

/* prlimit(2) of RLIMIT_NOFILE for another process (a GNU function): 0 or -errno. */
int cuffd_set_descriptor_limit(pid_t pid, uint64_t limit);

/* Reads one byte through a volatile pointer: a first touch the optimizer cannot remove. */
uint8_t cuffd_touch(const void *address);

/* mremap(2) is a GNU extension: not visible to Swift without _GNU_SOURCE. Returns MAP_FAILED on error. */
void *cuffd_mremap(void *old_address, size_t old_size, size_t new_size, int flags, void *new_address);
static const int cuffd_mremap_maymove = 1;    /* MREMAP_MAYMOVE */
static const int cuffd_mremap_fixed = 2;      /* MREMAP_FIXED */
static const int cuffd_mremap_dontunmap = 4;  /* MREMAP_DONTUNMAP */

#endif
