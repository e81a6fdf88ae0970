// A C plugin that answers every fault later, for CPluginTests: the pagefault
// callback hands the fault to worker threads and returns uffd_later(); each
// worker takes all the faults waiting, writes the fixture's pattern into their
// buffers and answers them newest first, so answers come out of order and from
// several threads. Every fourth fault keeps a 4-page buffer and prefetches its
// aligned 4-page block, if its buffer holds that (not of a huge-page region, whose
// faults keep one whole huge page each).
//   later NAME STATS [hold]   -- STATS: a file kept at "answered=N\nreordered=M\n"
// hold: no answer before the first client is gone (Closed): those answers come
// after their region closed, and must be dropped harmlessly.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <uffd_plugin.h>

enum { WORKERS = 3, BLOCK_PAGES = 4 };

typedef struct job {
  uint64_t fault_id, sequence, start, length, backing_offset;
  void *buffer;
  int prefetch;
} job;

static uffd_plugin *plugin;
static const char *stats_path;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t waiting = PTHREAD_COND_INITIALIZER;
static job *jobs;
static size_t job_count, job_capacity;
static uint64_t deferred, answered, reordered, last_sequence;
static int holding;

static void fill(uint64_t *words, size_t bytes, uint64_t backing_offset) {
  for (size_t i = 0; i < bytes / 8; i++) words[i] = (backing_offset + i * 8 + 1) * 0x9E3779B97F4A7C15ull;
}

static uffd_decision pagefault(const uffd_fault *fault, uffd_region *region, void *buffer, size_t size, void *user) {
  (void)user;
  uint64_t block = BLOCK_PAGES * region->page_size, start = fault->offset / block * block;
  int prefetch = deferred % 4 == 3 && block <= size && start + block <= region->length;
  job j = {fault->fault_id, ++deferred, prefetch ? start : fault->offset, prefetch ? block : region->page_size, region->backing_offset, buffer, prefetch};
  pthread_mutex_lock(&lock);
  if (job_count == job_capacity) {
    job_capacity = job_capacity ? 2 * job_capacity : 1024;
    if (!(jobs = realloc(jobs, job_capacity * sizeof *jobs))) abort();
  }
  jobs[job_count++] = j;
  pthread_cond_signal(&waiting);
  pthread_mutex_unlock(&lock);
  return prefetch ? uffd_later_keeping(block) : uffd_later();
}

static void write_stats(void) {
  char temporary[4096];
  snprintf(temporary, sizeof temporary, "%s.tmp", stats_path);
  FILE *file = fopen(temporary, "w");
  if (!file) return;
  fprintf(file, "answered=%llu\nreordered=%llu\n", (unsigned long long)answered, (unsigned long long)reordered);
  fclose(file);
  rename(temporary, stats_path);
}

static void *worker(void *unused) {
  (void)unused;
  job *taken = NULL;
  size_t capacity = 0;
  for (;;) {
    pthread_mutex_lock(&lock);
    while (job_count == 0 || holding) pthread_cond_wait(&waiting, &lock);
    if (capacity < job_count && !(taken = realloc(taken, (capacity = job_capacity) * sizeof *taken))) abort();
    size_t n = job_count;
    for (size_t i = 0; i < n; i++) taken[i] = jobs[i];
    job_count = 0;
    pthread_mutex_unlock(&lock);
    for (size_t i = n; i-- > 0;) {  // newest first
      job *j = &taken[i];
      fill(j->buffer, j->length, j->backing_offset + j->start);
      uffd_decision decision = j->prefetch ? uffd_copy_range(j->start, j->length) : uffd_copy();
      if (uffd_plugin_answer(plugin, j->fault_id, decision) != 0) fprintf(stderr, "later: %s\n", uffd_plugin_last_error());
      pthread_mutex_lock(&lock);
      answered++;
      if (j->sequence < last_sequence) reordered++;
      last_sequence = j->sequence;
      pthread_mutex_unlock(&lock);
    }
    pthread_mutex_lock(&lock);
    write_stats();
    pthread_mutex_unlock(&lock);
  }
  return NULL;
}

static void closed(uint64_t client_id, const char *reason, void *user) {
  (void)client_id, (void)reason, (void)user;
  pthread_mutex_lock(&lock);
  holding = 0;
  pthread_cond_broadcast(&waiting);
  pthread_mutex_unlock(&lock);
}

int main(int argc, char **argv) {
  if (argc < 3) return fprintf(stderr, "usage: %s NAME STATS [hold]\n", argv[0]), 2;
  stats_path = argv[2];
  holding = argc > 3;
  plugin = uffd_plugin_connect(NULL, argv[1]);
  if (!plugin) return fprintf(stderr, "later: %s\n", uffd_plugin_last_error()), 1;
  for (int i = 0; i < WORKERS; i++) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, worker, NULL) != 0) return fprintf(stderr, "later: no thread\n"), 1;
  }
  uffd_callbacks callbacks = {.pagefault = pagefault, .closed = closed};
  int result = uffd_plugin_run(plugin, &callbacks, NULL);
  if (result != 0) fprintf(stderr, "later: %s\n", uffd_plugin_last_error());
  _exit(result == 0 ? 0 : 1);  // the workers may still hold jobs: the plugin outlives none of them
}
