// A C plugin that hands its regions to the broker, for CPluginTests:
//   delegate NAME file   -- the region's argument names a file: delegated whole,
//                           then its second half revoked; those faults come here
//                           and are served from the file, any other is poisoned
//   delegate NAME zero   -- every region delegated to zero pages
// The file is opened as the client named it: a test plugin, not one to deploy.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <uffd_plugin.h>

typedef struct served {
  uffd_plugin *plugin;
  int zero;
} served;

static const char *region_opened(uffd_region *region, void *user) {
  served *s = user;
  if (s->zero) return uffd_plugin_delegate_zero(s->plugin, region, 0, region->length, 1) == 0 ? NULL : uffd_plugin_last_error();
  int fd = open(region->argument, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "cannot open the file";
  uint64_t half = region->length / 2 / region->page_size * region->page_size;
  int err = uffd_plugin_delegate_file(s->plugin, region, 0, region->length, fd, 0, 4);
  if (err == 0) err = uffd_plugin_revoke(s->plugin, region, half, region->length - half);
  if (err != 0) return close(fd), uffd_plugin_last_error();
  region->context = (void *)(intptr_t)fd;
  return NULL;
}

static uffd_decision pagefault(const uffd_fault *fault, uffd_region *region, void *buffer, size_t size, void *user) {
  (void)size;
  served *s = user;
  uint64_t half = region->length / 2 / region->page_size * region->page_size;
  if (s->zero || fault->offset < half) return uffd_poison();  // delegated: the broker should have served it
  memset(buffer, 0, region->page_size);  // past the file's end: zeros
  if (pread((int)(intptr_t)region->context, buffer, region->page_size, (off_t)fault->offset) < 0) return uffd_poison();
  return uffd_copy();
}

static void region_closed(uffd_region *region, void *user) {
  if (!((served *)user)->zero) close((int)(intptr_t)region->context);
}

int main(int argc, char **argv) {
  if (argc < 3) return fprintf(stderr, "usage: %s NAME file|zero\n", argv[0]), 2;
  served s = {.plugin = uffd_plugin_connect(NULL, argv[1]), .zero = strcmp(argv[2], "zero") == 0};
  if (!s.plugin) return fprintf(stderr, "delegate: %s\n", uffd_plugin_last_error()), 1;
  uffd_callbacks callbacks = {.region_opened = region_opened, .pagefault = pagefault, .region_closed = region_closed};
  int result = uffd_plugin_run(s.plugin, &callbacks, &s);
  if (result != 0) fprintf(stderr, "delegate: %s\n", uffd_plugin_last_error());
  uffd_plugin_free(s.plugin);
  return result == 0 ? 0 : 1;
}
