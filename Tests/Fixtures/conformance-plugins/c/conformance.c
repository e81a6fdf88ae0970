// The conformance suite's plugin on the C SDK: what it answers comes from each
// region's argument; the table is in ../README.md.
//   conformance-plugin NAME
// The broker's socket: $UFFD_BROKER_PLUGIN_SOCKET (or the default path).
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
  return NULL;
}

static void region_closed(uffd_region *region, void *user) {
  (void)user;
  struct state *s = region->context;
  if (!s) return;
  for (size_t i = 0; i < s->pages; i++) free(s->stored[i]);
  free(s->stored), free(s->answered), free(s->removed), free(s);
  region->context = NULL;
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
  uffd_callbacks callbacks = {.region_opened = region_opened, .pagefault = pagefault, .removed = removed, .region_closed = region_closed,
                              .store = store, .decision_refused = decision_refused};
  int result = uffd_plugin_run(plugin, &callbacks, NULL);
  if (result != 0) fprintf(stderr, "conformance-plugin: %s\n", uffd_plugin_last_error());
  uffd_plugin_free(plugin);
  return result == 0 ? 0 : 1;
}
