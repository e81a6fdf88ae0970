/* zlib (Debian: zlib1g-dev), the swap plugin's compressor. */
#include <zlib.h>
