// The conformance suite's plugin on the C SDK: what it answers comes from each
// region's argument; the table is in ../README.md.
//   conformance-plugin NAME
// The broker's socket: $UFFD_BROKER_PLUGIN_SOCKET (or the default path).
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <uffd_plugin.h>

enum behaviour { PATTERN, ZERO, RETRY_ONCE, POISON, INVALID, OVERSIZED, PREFETCH, DIE };

// Per region: its behaviour and what the client did to its pages, one entry per page.
struct state {
  enum behaviour behaviour;
  uint64_t parameter;  // PREFETCH: pages per block; DIE: faults before dying
  size_t pages;
  uint8_t *removed;    // dropped (MADV_DONTNEED): reads zeros
  uint8_t *answered;   // answered once (the behaviours that differ the first time)
  uint8_t **stored;    // the bytes a swap-out stored, or NULL
};

static uint64_t faults;

// The stored pages, also in a memfd the broker keeps for this plugin's name (the
// descriptor store), so a restart after kill -9 finds them: an append-only log of
// records, the client's token (high, low), the region id, the region offset, the
// page's length (8 bytes each), then the page; a later record of the same page replaces an earlier one.
enum { RECORD_HEADER = 5 * sizeof(uint64_t) };
static int page_log = -1;
static off_t log_end;

// Takes the log the broker kept, or makes one and asks the broker to keep it.
static const char *open_log(uffd_plugin *plugin) {
  page_log = uffd_plugin_take_kept(plugin, "pages");
  if (page_log == -ENOENT) {
    if ((page_log = memfd_create("conformance-pages", MFD_CLOEXEC)) < 0) return "memfd_create failed";
    if (uffd_plugin_keep(plugin, page_log, "pages") != 0) return uffd_plugin_last_error();  // it only grows: kept once is enough
  }
  if (page_log < 0) return uffd_plugin_last_error();
  return (log_end = lseek(page_log, 0, SEEK_END)) < 0 ? "lseek failed" : NULL;
}

// Fills a region's stored pages from what earlier incarnations logged for it.
static const char *restore(struct state *s, const uffd_region *region) {
  uint64_t header[5], size = region->page_size;
  for (off_t at = 0; at + RECORD_HEADER <= log_end; at += RECORD_HEADER + header[4]) {
    if (pread(page_log, header, RECORD_HEADER, at) != RECORD_HEADER) return "cannot read the page log";
    if (header[0] != region->token_high || header[1] != region->token_low || header[2] != region->region_id || header[3] / size >= s->pages ||
        header[4] != size)
      continue;
    uint8_t **slot = &s->stored[header[3] / size];
    if (!*slot && !(*slot = malloc(size))) return "out of memory";
    if (pread(page_log, *slot, size, at + RECORD_HEADER) != (ssize_t)size) return "cannot read the page log";
  }
  return NULL;
}

static int parse(const char *argument, struct state *s) {
  static const struct { const char *name; enum behaviour behaviour; } plain[] = {
      {"", PATTERN}, {"pattern", PATTERN}, {"zero", ZERO}, {"retry-once", RETRY_ONCE},
      {"poison", POISON}, {"invalid", INVALID}, {"oversized", OVERSIZED}};
  for (size_t i = 0; i < sizeof plain / sizeof plain[0]; i++)
    if (strcmp(argument, plain[i].name) == 0) return s->behaviour = plain[i].behaviour, 0;
  char *end;
  if (strncmp(argument, "prefetch=", 9) == 0) {
    s->parameter = strtoull(argument + 9, &end, 10);
    return s->behaviour = PREFETCH, *end || end == argument + 9 || s->parameter == 0 ? -1 : 0;
  }
  if (strncmp(argument, "die=", 4) == 0) {
    s->parameter = strtoull(argument + 4, &end, 10);
    return s->behaviour = DIE, *end || end == argument + 4 ? -1 : 0;
  }
  return -1;
}

static void free_state(uffd_region *region) {
  struct state *s = region->context;
  if (!s) return;
  for (size_t i = 0; i < s->pages; i++) free(s->stored[i]);
  free(s->stored), free(s->answered), free(s->removed), free(s);
  region->context = NULL;
}

static const char *region_opened(uffd_region *region, void *user) {
  (void)user;
  if (region->parent_client_id) return "this plugin serves no forked child";
  struct state *s = calloc(1, sizeof *s);
  if (!s) return "out of memory";
  if (parse(region->argument, s) != 0) return free(s), "unknown conformance behaviour";
  s->pages = region->length / region->page_size;
  s->removed = calloc(s->pages, 1);
  s->answered = calloc(s->pages, 1);
  s->stored = calloc(s->pages, sizeof *s->stored);
  if (!s->removed || !s->answered || !s->stored) return free(s->removed), free(s->answered), free(s->stored), free(s), "out of memory";
  region->context = s;
  const char *failure = restore(s, region);
  if (failure) free_state(region);  // a refused region is never closed
  return failure;
}

// Whether every page of [start, end) is stored (asked for pages a swap-out released before a restart).
static int holds(uffd_region *region, uint64_t start, uint64_t end, void *user) {
  (void)user;
  const struct state *s = region->context;
  for (uint64_t page = start / region->page_size; page < end / region->page_size; page++)
    if (page >= s->pages || !s->stored[page]) return 0;
  return 1;
}

static void region_closed(uffd_region *region, void *user) {
  (void)user;
  free_state(region);
}

// Writes `pages` pages from region offset `offset`: stored bytes, else zeros for dropped pages, else the pattern.
static void fill(uint8_t *buffer, uint64_t offset, uint64_t pages, const struct state *s, const uffd_region *region) {
  uint64_t size = region->page_size;
  for (uint64_t i = 0; i < pages; i++) {
    uint64_t page = offset / size + i;
    uint8_t *bytes = buffer + i * size;
    if (s->stored[page]) {
      memcpy(bytes, s->stored[page], size);
    } else if (s->removed[page]) {
      memset(bytes, 0, size);
    } else {
      uint64_t *words = (uint64_t *)bytes, backing = region->backing_offset + page * size;
      for (uint64_t w = 0; w < size / 8; w++) words[w] = (backing + w * 8 + 1) * 0x9E3779B97F4A7C15ull;
    }
  }
}

static uffd_decision pagefault(const uffd_fault *fault, uffd_region *region, void *buffer, size_t buffer_size, void *user) {
  (void)user;
  struct state *s = region->context;
  uint64_t size = region->page_size, page = fault->offset / size;
  faults++;
  if (page < s->pages && s->stored[page]) {  // a page a swap-out stored comes back as it was stored, whatever the behaviour
    fill(buffer, fault->offset, 1, s, region);
    return uffd_copy();
  }
  int first_time = 0;
  if (s->behaviour == RETRY_ONCE || s->behaviour == INVALID || s->behaviour == OVERSIZED) first_time = !s->answered[page], s->answered[page] = 1;
  switch (s->behaviour) {
  case ZERO: return uffd_zero();
  case POISON: return uffd_poison();
  case RETRY_ONCE:
    if (first_time) return uffd_retry();
    break;
  case INVALID:
    if (first_time) return fill(buffer, fault->offset, 1, s, region), uffd_copy_range(fault->offset + 8, size);
    break;
  case OVERSIZED:
    if (first_time) return uffd_zero_range(0, region->length + size);
    break;
  case DIE:
    if (faults > s->parameter) kill(getpid(), SIGKILL);  // mid-fault: this one and the rest of its packet stay unanswered
    break;
  case PREFETCH: {
    uint64_t block = s->parameter * size > buffer_size ? buffer_size / size * size : s->parameter * size;
    uint64_t start = fault->offset / block * block;
    uint64_t length = start + block > region->length ? region->length - start : block;
    fill(buffer, start, length / size, s, region);
    return uffd_copy_range(start, length);
  }
  case PATTERN: break;
  }
  fill(buffer, fault->offset, 1, s, region);
  return uffd_copy();
}

// Never told of a swap-out's drop (that is swapped_out, not set here: the stored bytes are the pages' content).
static void removed(uffd_region *region, uint64_t start, uint64_t end, void *user) {
  (void)user;
  struct state *s = region->context;
  for (uint64_t page = start / region->page_size; page < end / region->page_size && page < s->pages; page++) {
    s->removed[page] = 1;
    free(s->stored[page]);
    s->stored[page] = NULL;
  }
}

static const char *store(uffd_region *region, uint64_t offset, const void *data, size_t length, void *user) {
  (void)user;
  struct state *s = region->context;
  uint64_t size = region->page_size;
  for (uint64_t i = 0; i < length / size && offset / size + i < s->pages; i++) {
    uint8_t **slot = &s->stored[offset / size + i];
    if (!*slot && !(*slot = malloc(size))) return "out of memory";
    memcpy(*slot, (const uint8_t *)data + i * size, size);
    uint64_t header[5] = {region->token_high, region->token_low, region->region_id, offset + i * size, size};
    if (pwrite(page_log, header, RECORD_HEADER, log_end) != RECORD_HEADER || pwrite(page_log, *slot, size, log_end + RECORD_HEADER) != (ssize_t)size)
      return "cannot write the page log";
    log_end += RECORD_HEADER + size;
  }
  return NULL;
}

static void decision_refused(uint64_t fault_id, const char *cause, const char *reason, void *user) {
  (void)fault_id, (void)reason, (void)user;
  fprintf(stderr, "refused %s\n", cause);
}

int main(int argc, char **argv) {
  if (argc != 2) return fprintf(stderr, "usage: %s NAME\n", argv[0]), 2;
  uffd_plugin *plugin = uffd_plugin_connect(NULL, argv[1]);
  if (!plugin) return fprintf(stderr, "conformance-plugin: %s\n", uffd_plugin_last_error()), 1;
  const char *failure = open_log(plugin);
  if (failure) return fprintf(stderr, "conformance-plugin: the page log: %s\n", failure), uffd_plugin_free(plugin), 1;
  uffd_callbacks callbacks = {.region_opened = region_opened, .pagefault = pagefault, .removed = removed, .region_closed = region_closed,
                              .store = store, .holds = holds, .decision_refused = decision_refused};
  int result = uffd_plugin_run(plugin, &callbacks, NULL);
  if (result != 0) fprintf(stderr, "conformance-plugin: %s\n", uffd_plugin_last_error());
  uffd_plugin_free(plugin);
  return result == 0 ? 0 : 1;
}
