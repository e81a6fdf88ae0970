/*
 * Malloc-family interposition for the benchmark (see CMallocCounter.h).
 *
 * Each wrapper increments a counter with a relaxed atomic add (no ordering is
 * needed: readers only compare two readings taken on either side of a loop)
 * and forwards to glibc's own implementation, which glibc exports as
 * __libc_malloc & co. precisely so that wrappers like these need no dlsym
 * (dlsym itself may allocate, which would recurse during start-up).
 * posix_memalign and aligned_alloc go through __libc_memalign.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include "CMallocCounter.h"

extern void *__libc_malloc(size_t size);
extern void __libc_free(void *pointer);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *pointer, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);

static uint64_t calls;
static uint64_t allocations;

#define EXPORT __attribute__((visibility("default"), used))

static inline void count_call(int allocates) {
  __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
  if (allocates) __atomic_fetch_add(&allocations, 1, __ATOMIC_RELAXED);
}

uint64_t malloc_counter_calls(void) { return __atomic_load_n(&calls, __ATOMIC_RELAXED); }
uint64_t malloc_counter_allocations(void) { return __atomic_load_n(&allocations, __ATOMIC_RELAXED); }

EXPORT void *malloc(size_t size) {
  count_call(1);
  return __libc_malloc(size);
}

EXPORT void free(void *pointer) {
  count_call(0);
  __libc_free(pointer);
}

EXPORT void *calloc(size_t count, size_t size) {
  count_call(1);
  return __libc_calloc(count, size);
}

EXPORT void *realloc(void *pointer, size_t size) {
  count_call(1);
  return __libc_realloc(pointer, size);
}

EXPORT void *memalign(size_t alignment, size_t size) {
  count_call(1);
  return __libc_memalign(alignment, size);
}

EXPORT void *aligned_alloc(size_t alignment, size_t size) {
  count_call(1);
  return __libc_memalign(alignment, size);
}

/* POSIX: the alignment must be a power of two multiple of sizeof(void *);
 * errors are returned, errno is left alone. */
EXPORT int posix_memalign(void **result, size_t alignment, size_t size) {
  count_call(1);
  if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0) return EINVAL;
  int saved = errno;
  void *pointer = __libc_memalign(alignment, size);
  if (pointer == NULL) {
    errno = saved;
    return ENOMEM;
  }
  *result = pointer;
  return 0;
}
