/* The definitions of CUserfaultfd.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "CUserfaultfd.h"

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

/* Reads up to max messages into msgs and flattens them into out. */
static int read_into(int fd, struct uffd_msg *msgs, cuffd_event *out, int max) {
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

int cuffd_read_events(int fd, cuffd_event *out, int max) {
  struct uffd_msg msgs[CUFFD_READ_BATCH];
  return read_into(fd, msgs, out, max);
}

/* ---- the read journal ---- */

typedef struct {
  uint64_t magic;
  uint64_t state;   /* CUFFD_JOURNAL_* bits */
  uint64_t removes_past_end;  /* the broker's: a remove was read past the end since the last settle */
  uint64_t reserved[5];
  struct uffd_msg msgs[CUFFD_JOURNAL_CAPACITY];
} journal_layout;
_Static_assert(sizeof(journal_layout) <= CUFFD_JOURNAL_SIZE, "journal layout");

int cuffd_journal_create(void **mapping) {
  int fd = memfd_create("uffd-broker-journal", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return -errno;
  void *m = MAP_FAILED;
  if (ftruncate(fd, CUFFD_JOURNAL_SIZE) != 0 ||
      (m = mmap(NULL, CUFFD_JOURNAL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED ||
      /* FUTURE_WRITE: our mapping stays writable, no other can be made. */
      fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) != 0) {
    int err = errno;
    if (m != MAP_FAILED) munmap(m, CUFFD_JOURNAL_SIZE);
    close(fd);
    return -err;
  }
  ((journal_layout *)m)->magic = CUFFD_JOURNAL_MAGIC;
  *mapping = m;
  return fd;
}

void cuffd_journal_begin(void *journal, int *used) {
  journal_layout *j = journal;
  if (__atomic_load_n(&j->state, __ATOMIC_RELAXED) != 0) return;
  for (int i = 0; i < *used; i++) j->msgs[i].event = 0;
  *used = 0;
  /* The slots are clear before the journal says a read is under way. */
  __atomic_store_n(&j->state, CUFFD_JOURNAL_UNSETTLED, __ATOMIC_RELEASE);
}

int cuffd_journal_read(int fd, void *journal, int *used, cuffd_event *out, int max) {
  journal_layout *j = journal;
  if (*used >= CUFFD_JOURNAL_CAPACITY) {
    /* Only removes matter to a re-attach, so a burst of faults past the end costs nothing. The
     * flag goes up before the read (a kill right after it must find it) and down again if
     * neither this read nor an earlier one past the end held a remove. */
    __atomic_or_fetch(&j->state, CUFFD_JOURNAL_OVERFLOW, __ATOMIC_RELEASE);
    int count = cuffd_read_events(fd, out, max);
    for (int i = 0; i < count; i++) j->removes_past_end |= out[i].event == UFFD_EVENT_REMOVE;
    if (!j->removes_past_end) __atomic_and_fetch(&j->state, ~(uint64_t)CUFFD_JOURNAL_OVERFLOW, __ATOMIC_RELEASE);
    return count;
  }
  if (max > CUFFD_JOURNAL_CAPACITY - *used) max = CUFFD_JOURNAL_CAPACITY - *used;
  int count = read_into(fd, &j->msgs[*used], out, max);
  if (count > 0) *used += count;
  return count;
}

void cuffd_journal_settle(void *journal) {
  journal_layout *j = journal;
  j->removes_past_end = 0;
  __atomic_store_n(&j->state, 0, __ATOMIC_RELEASE);
}

int cuffd_journal_unsettled_removes(const void *journal, uint64_t size, uint64_t *starts, uint64_t *ends, int max) {
  const journal_layout *j = journal;
  if (size < sizeof(journal_layout) || j->magic != CUFFD_JOURNAL_MAGIC) return 0;
  uint64_t state = __atomic_load_n(&j->state, __ATOMIC_ACQUIRE);
  if (state == 0) return 0;
  if (state & CUFFD_JOURNAL_OVERFLOW) return -1;
  int count = 0;
  for (int i = 0; i < CUFFD_JOURNAL_CAPACITY && j->msgs[i].event != 0; i++) {
    if (j->msgs[i].event != UFFD_EVENT_REMOVE) continue;
    if (count == max) return -1;
    starts[count] = j->msgs[i].arg.remove.start;
    ends[count] = j->msgs[i].arg.remove.end;
    count++;
  }
  return count;
}
