// A plugin in C: serves every page of its regions with a pattern computed from
// the page's place in the region's backing (each 8-byte word a function of its
// offset), the content the fixture client checks.
//   pattern NAME [PAGES]   -- PAGES > 1: prefetch aligned blocks of PAGES pages
// The broker's socket: $UFFD_BROKER_PLUGIN_SOCKET (or the default path).
#include <stdio.h>
#include <stdlib.h>
#include <uffd_plugin.h>

static uint64_t block_pages = 1;

static void fill(uint64_t *words, size_t bytes, uint64_t backing_offset) {
  for (size_t i = 0; i < bytes / 8; i++) words[i] = (backing_offset + i * 8 + 1) * 0x9E3779B97F4A7C15ull;
}

static uffd_decision pagefault(const uffd_fault *fault, uffd_region *region, void *buffer, size_t size, void *user) {
  (void)user;
  uint64_t block = block_pages * region->page_size;
  if (block_pages <= 1 || block > size) {  // the faulting page alone
    fill(buffer, region->page_size, region->backing_offset + fault->offset);
    return uffd_copy();
  }
  uint64_t start = fault->offset / block * block;  // the aligned block, cut at the region's end
  uint64_t length = start + block > region->length ? region->length - start : block;
  fill(buffer, length, region->backing_offset + start);
  return uffd_copy_range(start, length);
}

static void removed(uffd_region *region, uint64_t start, uint64_t end, void *user) {
  (void)region, (void)user;  // a dropped page gets the pattern again
  fprintf(stderr, "removed [%llu, %llu)\n", (unsigned long long)start, (unsigned long long)end);
}

int main(int argc, char **argv) {
  if (argc < 2) return fprintf(stderr, "usage: %s NAME [PAGES]\n", argv[0]), 2;
  if (argc > 2) block_pages = strtoull(argv[2], NULL, 10);
  uffd_plugin *plugin = uffd_plugin_connect(NULL, argv[1]);
  if (!plugin) return fprintf(stderr, "pattern: %s\n", uffd_plugin_last_error()), 1;
  uffd_callbacks callbacks = {.pagefault = pagefault, .removed = removed};
  int result = uffd_plugin_run(plugin, &callbacks, NULL);
  if (result != 0) fprintf(stderr, "pattern: %s\n", uffd_plugin_last_error());
  fprintf(stderr, "pattern: served %llu faults\n", (unsigned long long)uffd_plugin_faults_served(plugin));
  uffd_plugin_free(plugin);
  return result == 0 ? 0 : 1;
}
