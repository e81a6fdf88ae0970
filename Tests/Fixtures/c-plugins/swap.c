// A swap plugin in C, for CPluginTests: keeps the pages of each swap-out (Store)
// and serves them back on their faults; pages never stored read as zeros.
// Pages live in a memfd (swap-data, one page per slot) with an index beside it
// (swap-index, one entry per slot), so the broker's descriptor store can keep
// them across a crash of this process: a restart finds every stored page again.
// A linear table: a test plugin, not a fast one.
//   swap NAME
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <uffd_plugin.h>

typedef struct entry {
  uint64_t used, token_high, token_low, region_id, offset;
} entry;

static int data_fd, index_fd;
static entry *entries;
static size_t entry_count, entry_capacity;
static uint64_t pages_stored, pages_restored, pages_swapped_out;

static int same(const entry *e, const uffd_region *r, uint64_t offset) {
  return e->used && e->token_high == r->token_high && e->token_low == r->token_low && e->region_id == r->region_id && e->offset == offset;
}

static long find(const uffd_region *region, uint64_t offset) {
  for (size_t i = 0; i < entry_count; i++)
    if (same(&entries[i], region, offset)) return (long)i;
  return -1;
}

static void put(size_t slot, entry e) {
  entries[slot] = e;
  if (pwrite(index_fd, &e, sizeof e, (off_t)(slot * sizeof e)) != sizeof e) abort();
}

static const char *store(uffd_region *region, uint64_t offset, const void *data, size_t length, void *user) {
  (void)user;
  for (size_t done = 0; done < length; done += region->page_size) {
    long slot = find(region, offset + done);
    if (slot < 0) {
      for (slot = 0; (size_t)slot < entry_count && entries[slot].used; slot++) {}
      if ((size_t)slot == entry_count) {
        if (entry_count == entry_capacity) {
          entry_capacity = entry_capacity ? 2 * entry_capacity : 1024;
          entries = realloc(entries, entry_capacity * sizeof *entries);
          if (!entries) return "out of memory";
        }
        entry_count++;
      }
    }
    if (pwrite(data_fd, (const char *)data + done, region->page_size, (off_t)slot * region->page_size) != (ssize_t)region->page_size)
      return "cannot write the page";
    put((size_t)slot, (entry){1, region->token_high, region->token_low, region->region_id, offset + done});
    pages_stored++;
  }
  return NULL;
}

static uffd_decision pagefault(const uffd_fault *fault, uffd_region *region, void *buffer, size_t size, void *user) {
  (void)size, (void)user;
  long slot = find(region, fault->offset);
  if (slot < 0) {
    if (!(fault->flags & UFFD_FAULT_WRITE)) return uffd_zero();
    memset(buffer, 0, region->page_size);  // a write would take a second fault on the zero page
    return uffd_copy();
  }
  if (pread(data_fd, buffer, region->page_size, (off_t)slot * region->page_size) != (ssize_t)region->page_size) return uffd_poison();
  pages_restored++;
  return uffd_copy();
}

static void forget(uffd_region *region, uint64_t start, uint64_t end) {
  for (size_t i = 0; i < entry_count; i++)
    if (same(&entries[i], region, entries[i].offset) && entries[i].offset >= start && entries[i].offset < end) put(i, (entry){0});
}

static void removed(uffd_region *region, uint64_t start, uint64_t end, void *user) { (void)user, forget(region, start, end); }
static void unmapped(uffd_region *region, uint64_t start, uint64_t end, void *user) { (void)user, forget(region, start, end); }
static void region_closed(uffd_region *region, void *user) { (void)user, forget(region, 0, region->length); }

static void swapped_out(uffd_region *region, uint64_t start, uint64_t end, void *user) {
  (void)user;
  pages_swapped_out += (end - start) / region->page_size;
}

static int holds(uffd_region *region, uint64_t start, uint64_t end, void *user) {
  (void)user;
  for (uint64_t offset = start; offset < end; offset += region->page_size)
    if (find(region, offset) < 0) return 0;
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 2) return fprintf(stderr, "usage: %s NAME\n", argv[0]), 2;
  uffd_plugin *plugin = uffd_plugin_connect(NULL, argv[1]);
  if (!plugin) return fprintf(stderr, "swap: %s\n", uffd_plugin_last_error()), 1;
  data_fd = uffd_plugin_take_kept(plugin, "swap-data");
  index_fd = uffd_plugin_take_kept(plugin, "swap-index");
  if (data_fd >= 0 && index_fd >= 0) {  // a restart: the index names every page stored before
    off_t size = lseek(index_fd, 0, SEEK_END);
    entry_count = entry_capacity = (size_t)size / sizeof(entry);
    entries = malloc(entry_capacity * sizeof(entry) + 1);
    if (!entries || pread(index_fd, entries, entry_count * sizeof(entry), 0) != (ssize_t)(entry_count * sizeof(entry))) return perror("swap-index"), 1;
    size_t held = 0;
    for (size_t i = 0; i < entry_count; i++) held += entries[i].used != 0;
    fprintf(stderr, "swap: recovered %zu stored pages\n", held);
  } else {
    data_fd = memfd_create("swap-data", MFD_CLOEXEC);
    index_fd = memfd_create("swap-index", MFD_CLOEXEC);
    if (data_fd < 0 || index_fd < 0) return perror("memfd_create"), 1;
    if (uffd_plugin_keep(plugin, data_fd, "swap-data") != 0 || uffd_plugin_keep(plugin, index_fd, "swap-index") != 0)
      return fprintf(stderr, "swap: %s\n", uffd_plugin_last_error()), 1;
  }
  uffd_callbacks callbacks = {.pagefault = pagefault, .store = store, .swapped_out = swapped_out, .holds = holds,
                              .removed = removed, .unmapped = unmapped, .region_closed = region_closed};
  int result = uffd_plugin_run(plugin, &callbacks, NULL);
  if (result != 0) fprintf(stderr, "swap: %s\n", uffd_plugin_last_error());
  fprintf(stderr, "swap: stored %llu pages, swapped out %llu, restored %llu\n", (unsigned long long)pages_stored,
          (unsigned long long)pages_swapped_out, (unsigned long long)pages_restored);
  uffd_plugin_free(plugin);
  return result == 0 ? 0 : 1;
}
