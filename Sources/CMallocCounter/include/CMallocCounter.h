#include <stdint.h>
/* Number of malloc-family calls made by this process so far (all threads). */
uint64_t malloc_counter_calls(void);
