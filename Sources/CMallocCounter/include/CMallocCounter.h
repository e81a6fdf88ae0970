#ifndef CMALLOCCOUNTER_H
#define CMALLOCCOUNTER_H
#include <stdint.h>

/*
 * Counts the malloc-family calls of the process that links this target (the
 * benchmark only): malloc, free, calloc, realloc, posix_memalign,
 * aligned_alloc and memalign are defined here, bump a relaxed atomic counter
 * and forward to glibc's __libc_* entry points. An executable's definitions
 * interpose on the shared libraries' (Swift runtime, protobuf-c, libc), so
 * every allocation of every thread is seen. A difference of two readings
 * around a loop is "allocator calls per iteration": 0 means the loop neither
 * allocated nor freed.
 */

/* Number of malloc-family calls (allocations and frees) made by this process so far (all threads). */
uint64_t malloc_counter_calls(void);

/* Of those, the calls that returned new memory (malloc, calloc, realloc, the aligned allocators). */
uint64_t malloc_counter_allocations(void);

#endif
