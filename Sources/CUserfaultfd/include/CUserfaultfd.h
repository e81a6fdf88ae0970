/*
 * CUserfaultfd: the userfaultfd C that Swift cannot reach.
 *
 * Swift cannot call variadic functions (ioctl, syscall), cannot import
 * function-like macros (UFFDIO_COPY, ...) and walks the kernel's `uffd_msg`
 * unions awkwardly. Each of those is wrapped as a small function with a
 * `cuffd_` prefix. Every wrapper returns 0 (or a count) on success and
 * `-errno` on failure, so Swift never reads the thread-local `errno` after
 * another call could clobber it. The rest of the Linux plumbing is in CLinux.
 */
#ifndef CUSERFAULTFD_H
#define CUSERFAULTFD_H

#include <stdint.h>
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

/* ---- the read journal ----
 *
 * A broker killed between reading a client's events and telling the client
 * what they changed (a MADV_DONTNEED's drop record) would leave the client
 * re-attaching without it. So the broker reads each client's events into a
 * journal: a memfd it maps writable, sealed so that no one else can write or
 * resize it, and hands read-only to the client. While a read is not settled
 * (its events acted on and every notice sent) the journal holds its raw
 * messages; the kernel writes them there, so a kill right after the read(2)
 * leaves them too. A re-attaching client reads what an unsettled journal holds.
 *
 * Layout: 64-byte header, then CUFFD_JOURNAL_CAPACITY uffd_msg. A message
 * slot not written since the journal was last settled has event 0. */
enum { CUFFD_JOURNAL_SIZE = 16384, CUFFD_JOURNAL_CAPACITY = (CUFFD_JOURNAL_SIZE - 64) / 32 };
#define CUFFD_JOURNAL_MAGIC 0x314c4e524a444655ULL /* "UFDJRNL1" */
enum {
  CUFFD_JOURNAL_UNSETTLED = 1,  /* state: events were read and may not all be told */
  CUFFD_JOURNAL_OVERFLOW = 2,   /* state: a remove was read past the journal's end */
};

/* Creates a sealed journal memfd and maps it writable at *mapping. Returns the
 * descriptor (close-on-exec) or -errno. */
int cuffd_journal_create(void **mapping);

/* Starts a read: clears the `used` slots of a settled journal (then *used is 0)
 * and marks it unsettled; an unsettled one keeps its messages. */
void cuffd_journal_begin(void *journal, int *used);

/* As cuffd_read_events, reading into the journal's free slots (`*used` grows);
 * past its end the read goes to a private buffer, and a remove among it marks
 * the journal overflowed. */
int cuffd_journal_read(int fd, void *journal, int *used, cuffd_event *out, int max);

/* The read's events are acted on and told: the journal is settled. */
void cuffd_journal_settle(void *journal);

/* For a client: what an unsettled journal holds (mapped read-only at
 * `journal`, `size` bytes). Returns 0 if it is settled (or not a journal),
 * -1 if it overflowed (nothing can be vouched for), else the count of REMOVE
 * ranges written to starts/ends (at most max; more are counted as overflow). */
int cuffd_journal_unsettled_removes(const void *journal, uint64_t size, uint64_t *starts, uint64_t *ends, int max);

#endif
