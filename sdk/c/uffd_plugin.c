/*
 * The C plugin SDK: the connection, Hello, and the run loop that decodes
 * BrokerToPlugin packets, calls the plugin back and batches its answers into
 * PluginToBroker packets. See include/uffd_plugin.h for the contract.
 */
#define _GNU_SOURCE
#include "uffd_plugin.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "broker.pb-c.h"

enum {
  MAX_PACKET = 256 << 10,           /* the protocol's packet limit */
  PACKET_BUDGET = MAX_PACKET - 4096, /* what the size estimates may reach */
  RECEIVE_BUFFER = 512 << 10,       /* larger than any packet: a longer one shows as MSG_TRUNC */
  SOCKET_BUFFER = 1 << 20,          /* SO_SNDBUF/SO_RCVBUF: a 256 KiB send needs more than the default */
  SHARED_HALF = 4 << 20,            /* the shared area is two halves, alternating between packets: two huge pages each */
  MAX_FDS = 8,                      /* descriptors per packet, and names in the descriptor store */
  MAX_KEPT_NAME = 64,               /* a descriptor store name's bytes */
  MAX_BATCH = 8192,                 /* Decisions entries per packet (~33 bytes each) */
  MAX_INLINE = 64,                  /* Decision messages with inline bytes per packet (≥ 4 KiB each) */
  MAX_REPLIES = 1024,               /* RegionReply, StoreReply, Delegation per packet each */
  MAX_MESSAGE = 1024,               /* a refusal's message, truncated */
  MAX_BLOCKS = 4096,                /* blocks of page bytes (2 shared, the others private: 1 GiB at most) */
};

/* No current block: no buffer for a fault until one is free. */
#define NO_BLOCK ((size_t)-1)

/* Estimated packed sizes, on the high side. */
enum { BATCH_ENTRY = 40, INLINE_OVERHEAD = 64, REPLY_OVERHEAD = 64, EXTENT_SIZE = 32, DELEGATION_SIZE = 80 };

/*
 * Page bytes live in blocks: the two halves of the memfd shared with the broker
 * (a decision names where its bytes lie), or private memory (the bytes travel
 * inline). Faults' buffers are carved one after another from the current block.
 * A block is reused from its start only when
 * 1. no deferred fault holds a buffer in it (that buffer stays the plugin's until answered), and
 * 2. the last packet naming its bytes was applied by the broker (shared) or sent (private).
 */
typedef struct block {
  uint8_t *base;
  size_t size;
  long shared_offset;   /* where it lies in the shared area, or -1: private */
  uint64_t last_packet; /* the last packet naming its bytes */
  uint32_t held;        /* deferred faults whose buffers lie in it */
} block;

/* A fault the plugin answers later: what its answer needs, and its buffer. */
typedef struct deferred {
  uint64_t fault_id; /* 0: an empty slot (the broker's ids are never 0) */
  uint64_t client_id, region_id, address, offset;
  size_t block, at;  /* its buffer: blocks[block].base + at */
  uint64_t reserved; /* bytes of it */
} deferred;

/* An answer given with uffd_plugin_answer, queued for the loop. */
typedef struct answer {
  uint64_t fault_id;
  uffd_decision decision;
} answer;

struct uffd_plugin {
  int fd;
  uint64_t packets_sent, packets_applied, faults_served;
  uint8_t *receive;
  uint8_t *send;
  /* Page bytes: the shared memfd's mapping (NULL: none), the blocks, the one buffers come from. */
  uint8_t *shared;
  block *blocks; /* the shared halves first, if any */
  size_t block_count, current, staged;
  /* Deferred faults by fault_id: open addressing, linear probing (used by the loop only). */
  deferred *table;
  size_t table_capacity, table_count;
  /* Answers from any thread: queued under `lock`, the loop woken through `wake` (an eventfd). */
  pthread_mutex_t lock;
  answer *queue, *taken;
  size_t queue_count, queue_capacity, taken_capacity;
  int wake, stopped;
  /* Regions, with the last one found cached (runs of faults hit one region). */
  uffd_region **regions;
  size_t region_count, region_capacity;
  uffd_region *last;
  /* The packet being built. */
  size_t estimate;
  uint64_t batch_fault[MAX_BATCH], batch_address[MAX_BATCH], batch_length[MAX_BATCH], batch_shared[MAX_BATCH];
  Uffdbroker__DecisionKind batch_kind[MAX_BATCH];
  size_t batch_count;
  Uffdbroker__Decision inline_decisions[MAX_INLINE];
  Uffdbroker__Decision *inline_pointers[MAX_INLINE];
  size_t inline_count;
  Uffdbroker__RegionReply replies[MAX_REPLIES];
  Uffdbroker__RegionReply *reply_pointers[MAX_REPLIES];
  Uffdbroker__Error reply_errors[MAX_REPLIES];
  Uffdbroker__Extent *reply_lost[MAX_REPLIES];     /* malloc'd per reply, freed after the send */
  Uffdbroker__Extent **reply_lost_pointers[MAX_REPLIES];
  size_t reply_count;
  Uffdbroker__StoreReply store_replies[MAX_REPLIES];
  Uffdbroker__StoreReply *store_pointers[MAX_REPLIES];
  Uffdbroker__Error store_errors[MAX_REPLIES];
  size_t store_count;
  Uffdbroker__Delegation delegations[MAX_REPLIES];
  Uffdbroker__Delegation *delegation_pointers[MAX_REPLIES];
  size_t delegation_count;
  int fds[MAX_FDS]; /* file delegations' duplicates, in order */
  size_t fd_count;
  int keep_fds[MAX_FDS]; /* descriptors to keep (they ride after the delegations'), with their names */
  char *keep_names[MAX_FDS];
  size_t keep_count;
  /* The broker's descriptor store, as restored at Hello: taken (-1) or owned by the SDK. */
  char *kept_names[MAX_FDS];
  int kept_fds[MAX_FDS];
  size_t kept_count;
  /* Descriptors that came with the last packet received, in order. */
  int received_fds[2 * MAX_FDS];
  size_t received_count;
  char *strings[2 * MAX_REPLIES]; /* refusal messages, freed after the send */
  size_t string_count;
  int in_pagefault; /* the stage may not move: the decision being made names it */
};

static __thread char last_error[512];

const char *uffd_plugin_last_error(void) { return last_error; }

/* Records why, sets errno, returns -err. */
static int fail(int err, const char *format, ...) {
  va_list arguments;
  va_start(arguments, format);
  vsnprintf(last_error, sizeof last_error, format, arguments);
  va_end(arguments);
  errno = err;
  return -err;
}

/* ---- the socket ---- */

static int send_packet(uffd_plugin *p, const uint8_t *bytes, size_t length, const int *fds, size_t fd_count) {
  if (length == 0) return fail(EINVAL, "an empty packet reads as end of stream: not sent");
  struct iovec vector = {.iov_base = (void *)bytes, .iov_len = length};
  union {
    char buffer[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct cmsghdr align;
  } control;
  struct msghdr message = {.msg_iov = &vector, .msg_iovlen = 1};
  if (fd_count > 0) {
    memset(&control, 0, sizeof control);
    message.msg_control = control.buffer;
    message.msg_controllen = CMSG_SPACE(sizeof(int) * fd_count);
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int) * fd_count);
    memcpy(CMSG_DATA(header), fds, sizeof(int) * fd_count);
  }
  ssize_t sent;
  do sent = sendmsg(p->fd, &message, MSG_NOSIGNAL);
  while (sent < 0 && errno == EINTR);
  if (sent < 0) return fail(errno, "sending to the broker: %s", strerror(errno));
  return 0;
}

static void close_received(uffd_plugin *p) {
  for (size_t i = 0; i < p->received_count; i++) close(p->received_fds[i]);
  p->received_count = 0;
}

/* Receives one packet: its length, 0 when the broker closed the connection, or -errno.
 * Descriptors that came with it are in received_fds until the next receive (close_received). */
static ssize_t receive_packet(uffd_plugin *p) {
  struct iovec vector = {.iov_base = p->receive, .iov_len = RECEIVE_BUFFER};
  union {
    char buffer[CMSG_SPACE(sizeof(int) * MAX_FDS * 2)];
    struct cmsghdr align;
  } control;
  struct msghdr message = {.msg_iov = &vector, .msg_iovlen = 1, .msg_control = control.buffer, .msg_controllen = sizeof control.buffer};
  ssize_t count;
  close_received(p);
  do count = recvmsg(p->fd, &message, MSG_CMSG_CLOEXEC);
  while (count < 0 && errno == EINTR);
  if (count < 0 && errno == ECONNRESET) return 0;
  if (count < 0) return fail(errno, errno == EAGAIN ? "the broker did not answer in time" : "receiving from the broker: %s", strerror(errno));
  for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
    if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
    size_t n = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < n; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof fd);
      if (p->received_count < 2 * MAX_FDS) p->received_fds[p->received_count++] = fd;
      else close(fd);
    }
  }
  if (message.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) return fail(EPROTO, "a packet from the broker was truncated");
  return count;
}

static int default_socket_path(char *path, size_t size) {
  const char *overridden = getenv("UFFD_BROKER_PLUGIN_SOCKET");
  if (overridden && *overridden) return snprintf(path, size, "%s", overridden) < (int)size ? 0 : fail(ENAMETOOLONG, "socket path too long");
  const char *runtime = getenv("XDG_RUNTIME_DIR");
  if (runtime && *runtime) return snprintf(path, size, "%s/uffd-broker/plugin.sock", runtime) < (int)size ? 0 : fail(ENAMETOOLONG, "socket path too long");
  if (geteuid() == 0) return snprintf(path, size, "/run/uffd-broker/plugin.sock"), 0;
  return fail(EINVAL, "no safe default for the plugin socket: set XDG_RUNTIME_DIR or UFFD_BROKER_PLUGIN_SOCKET, or pass a path");
}

/* The listener must be root, us, or $UFFD_BROKER_UID: nothing is sent to a squatter. */
static int check_peer(int fd) {
  struct ucred peer;
  socklen_t length = sizeof peer;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &length) != 0) return fail(errno, "SO_PEERCRED: %s", strerror(errno));
  const char *trusted = getenv("UFFD_BROKER_UID");
  int trusted_uid = trusted && *trusted ? atoi(trusted) : -1;
  if (peer.uid == 0 || peer.uid == getuid() || peer.uid == geteuid() || (trusted_uid >= 0 && peer.uid == (uid_t)trusted_uid)) return 0;
  return fail(EACCES, "the broker's socket is held by uid %u, not root or you; refusing to send it anything", (unsigned)peer.uid);
}

static int open_socket(const char *socket_path) {
  const char *inherited = socket_path ? NULL : getenv("UFFD_BROKER_PLUGIN_FD");
  if (inherited) {
    int fd = atoi(inherited);
    struct stat info;
    unsetenv("UFFD_BROKER_PLUGIN_FD");
    if (fd < 0 || fstat(fd, &info) != 0 || !S_ISSOCK(info.st_mode)) return fail(EBADF, "UFFD_BROKER_PLUGIN_FD=%s names no socket", inherited);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
  }
  char path[sizeof ((struct sockaddr_un *)0)->sun_path];
  if (socket_path) {
    if (strlen(socket_path) >= sizeof path) return fail(ENAMETOOLONG, "socket path too long: %s", socket_path);
    strcpy(path, socket_path);
  } else {
    int err = default_socket_path(path, sizeof path);
    if (err) return err;
  }
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail(errno, "socket: %s", strerror(errno));
  struct sockaddr_un address = {.sun_family = AF_UNIX};
  strcpy(address.sun_path, path);
  int result;
  do result = connect(fd, (struct sockaddr *)&address, sizeof address);
  while (result != 0 && errno == EINTR);
  if (result != 0) {
    int err = errno;
    close(fd);
    return fail(err, "cannot connect to %s: %s", path, strerror(err));
  }
  return fd;
}

/* ---- the packet being built ---- */

static int packet_empty(const uffd_plugin *p) {
  return p->batch_count + p->inline_count + p->reply_count + p->store_count + p->delegation_count + p->keep_count == 0;
}

static char *keep_string(uffd_plugin *p, const char *text) {
  char *copy = strndup(text, MAX_MESSAGE);
  if (copy) p->strings[p->string_count++] = copy;
  return copy ? copy : "refused";
}

/* ---- blocks of page bytes ---- */

static int block_free(const uffd_plugin *p, const block *b) {
  return b->held == 0 && b->last_packet <= (b->shared_offset >= 0 ? p->packets_applied : p->packets_sent);
}

static int add_block(uffd_plugin *p, uint8_t *base, size_t size, long shared_offset) {
  if (!base) return -ENOMEM;
  block *grown = realloc(p->blocks, (p->block_count + 1) * sizeof *grown);
  if (!grown) return -ENOMEM;
  p->blocks = grown;
  p->blocks[p->block_count++] = (block){.base = base, .size = size, .shared_offset = shared_offset};
  return 0;
}

/* Picks the block the next buffers come from: a free shared half (the fast path),
 * else a free private block, else a new private one; NO_BLOCK if none can be had. */
static void choose_stage(uffd_plugin *p) {
  size_t chosen = NO_BLOCK;
  for (size_t i = 0; i < p->block_count; i++) {
    if (!block_free(p, &p->blocks[i])) continue;
    if (p->blocks[i].shared_offset >= 0 || chosen == NO_BLOCK) chosen = i;
    if (p->blocks[i].shared_offset >= 0) break;
  }
  /* Every block is busy: deferred faults hold buffers in them. Private memory is committed only as written. */
  if (chosen == NO_BLOCK && p->block_count < MAX_BLOCKS && add_block(p, aligned_alloc(4096, MAX_PACKET), MAX_PACKET, -1) == 0)
    chosen = p->block_count - 1;
  p->current = chosen;
  p->staged = 0;
}

/* Bytes left for buffers in the current block. */
static size_t room(const uffd_plugin *p) { return p->current == NO_BLOCK ? 0 : p->blocks[p->current].size - p->staged; }

static int current_is_shared(const uffd_plugin *p) { return p->current != NO_BLOCK && p->blocks[p->current].shared_offset >= 0; }

static int flush(uffd_plugin *p) {
  if (packet_empty(p)) return 0;
  Uffdbroker__PluginToBroker message;
  uffdbroker__plugin_to_broker__init(&message);
  Uffdbroker__Decisions batch;
  uffdbroker__decisions__init(&batch);
  if (p->batch_count > 0) {
    batch.n_fault_id = batch.n_kind = batch.n_address = batch.n_length = batch.n_shared_offset = p->batch_count;
    batch.fault_id = p->batch_fault;
    batch.kind = p->batch_kind;
    batch.address = p->batch_address;
    batch.length = p->batch_length;
    batch.shared_offset = p->batch_shared;
    message.batch = &batch;
  }
  message.n_decisions = p->inline_count;
  message.decisions = p->inline_pointers;
  message.n_region_replies = p->reply_count;
  message.region_replies = p->reply_pointers;
  message.n_store_replies = p->store_count;
  message.store_replies = p->store_pointers;
  message.n_delegations = p->delegation_count;
  message.delegations = p->delegation_pointers;
  Uffdbroker__DescriptorStore keep;
  uffdbroker__descriptor_store__init(&keep);
  if (p->keep_count > 0) {
    keep.n_names = p->keep_count;
    keep.names = p->keep_names;
    message.keep = &keep;
  }
  /* The descriptors: file delegations' first, then those to keep (section 5.5's order). */
  for (size_t i = 0; i < p->keep_count; i++) p->fds[p->fd_count + i] = p->keep_fds[i];
  size_t fd_count = p->fd_count + p->keep_count;
  size_t size = uffdbroker__plugin_to_broker__get_packed_size(&message);
  int result = size > MAX_PACKET ? fail(EMSGSIZE, "an answer of %zu bytes exceeds the packet limit", size) : 0;
  if (result == 0) result = send_packet(p, p->send, uffdbroker__plugin_to_broker__pack(&message, p->send), p->fds, fd_count);
  for (size_t i = 0; i < fd_count; i++) close(p->fds[i]); /* the broker has its own copies now */
  for (size_t i = 0; i < p->keep_count; i++) free(p->keep_names[i]);
  for (size_t i = 0; i < p->reply_count; i++) free(p->reply_lost[i]), free(p->reply_lost_pointers[i]);
  for (size_t i = 0; i < p->string_count; i++) free(p->strings[i]);
  p->batch_count = p->inline_count = p->reply_count = p->store_count = p->delegation_count = p->fd_count = p->keep_count = p->string_count = 0;
  p->estimate = 64;
  p->packets_sent++;
  choose_stage(p);
  return result;
}

/* Makes room for `bytes` more (estimated) in the packet, and one more of a kind limited to `count` < `capacity`. */
static int make_room(uffd_plugin *p, size_t bytes, size_t count, size_t capacity) {
  if (p->estimate + bytes <= PACKET_BUDGET && count < capacity) return 0;
  return flush(p);
}

static void append_batch(uffd_plugin *p, uint64_t fault_id, Uffdbroker__DecisionKind kind, uint64_t address, uint64_t length, uint64_t shared_offset) {
  size_t i = p->batch_count++;
  p->batch_fault[i] = fault_id;
  p->batch_kind[i] = kind;
  p->batch_address[i] = address;
  p->batch_length[i] = length;
  p->batch_shared[i] = shared_offset;
  p->estimate += BATCH_ENTRY;
}

/* ---- regions ---- */

static uffd_region *find_region(uffd_plugin *p, uint64_t client_id, uint64_t region_id, size_t *index) {
  if (!index && p->last && p->last->client_id == client_id && p->last->region_id == region_id) return p->last;
  for (size_t i = 0; i < p->region_count; i++) {
    uffd_region *region = p->regions[i];
    if (region->client_id == client_id && region->region_id == region_id) {
      if (index) *index = i;
      return p->last = region;
    }
  }
  return NULL;
}

static void free_region(uffd_region *region) {
  free((char *)region->plugin);
  free((char *)region->argument);
  free(region);
}

static void close_region(uffd_plugin *p, size_t index, const uffd_callbacks *callbacks, void *user) {
  uffd_region *region = p->regions[index];
  p->regions[index] = p->regions[--p->region_count];
  p->last = NULL;
  if (callbacks->region_closed) callbacks->region_closed(region, user);
  free_region(region);
}

static int add_region(uffd_plugin *p, uffd_region *region) {
  if (p->region_count == p->region_capacity) {
    size_t capacity = p->region_capacity ? 2 * p->region_capacity : 16;
    uffd_region **grown = realloc(p->regions, capacity * sizeof *grown);
    if (!grown) return -ENOMEM;
    p->regions = grown;
    p->region_capacity = capacity;
  }
  p->regions[p->region_count++] = region;
  return 0;
}

static int region_opened(uffd_plugin *p, const Uffdbroker__RegionOpened *event, const uffd_callbacks *callbacks, void *user) {
  const Uffdbroker__Region *spec = event->region;
  if (!spec) return fail(EPROTO, "RegionOpened without a region");
  int err = make_room(p, REPLY_OVERHEAD + MAX_MESSAGE + EXTENT_SIZE * spec->n_swapped_out, p->reply_count, MAX_REPLIES);
  if (err) return err;
  const char *refusal = NULL;
  uffd_region *region = calloc(1, sizeof *region);
  if (!region) return fail(ENOMEM, "out of memory");
  *region = (uffd_region){
      .client_id = event->client_id, .region_id = spec->id, .base = spec->address, .length = spec->length, .page_size = spec->page_size,
      .plugin = strdup(spec->plugin), .argument = strdup(spec->argument), .backing_offset = spec->backing_offset, .pid = event->pid,
      .parent_client_id = event->parent_client_id, .has_credentials = event->client != NULL, .uid = event->client ? event->client->uid : 0,
      .gid = event->client ? event->client->gid : 0, .token_high = event->token_high, .token_low = event->token_low,
      .shared_memory = spec->backing == UFFDBROKER__BACKING__BACKING_SHARED_MEMORY};
  char message[128];
  if (region->page_size > UFFD_PLUGIN_MAX_PREFETCH && (!p->shared || region->page_size > SHARED_HALF)) {
    /* A huge page's bytes fit no packet: they go through the shared area only. */
    snprintf(message, sizeof message, "region %llu has %u-byte pages, more than this plugin's buffers hold%s", (unsigned long long)spec->id,
             region->page_size, p->shared ? "" : " (it has no shared area)");
    refusal = message;
  } else if (event->parent_client_id != 0) {
    /* A forked child: it starts as its parent's region (the same base and context). */
    uffd_region *parent = find_region(p, event->parent_client_id, spec->id, NULL);
    if (!parent) refusal = "the parent's region is not open here";
    else if (!callbacks->region_opened) refusal = "this plugin serves no forked child";
    else region->base = parent->base, region->context = parent->context;
  }
  if (!refusal && callbacks->region_opened) refusal = callbacks->region_opened(region, user);
  size_t existing;
  if (!refusal && find_region(p, region->client_id, region->region_id, &existing)) close_region(p, existing, callbacks, user);
  if (!refusal && add_region(p, region) != 0) refusal = "out of memory";

  size_t i = p->reply_count++;
  Uffdbroker__RegionReply *reply = &p->replies[i];
  uffdbroker__region_reply__init(reply);
  reply->client_id = event->client_id;
  reply->region_id = spec->id;
  p->reply_pointers[i] = reply;
  p->reply_lost[i] = NULL;
  p->reply_lost_pointers[i] = NULL;
  p->estimate += REPLY_OVERHEAD;
  if (refusal) {
    Uffdbroker__Error *error = &p->reply_errors[i];
    uffdbroker__error__init(error);
    error->code = UFFDBROKER__ERROR_CODE__ERROR_PLUGIN_REFUSED;
    error->message = keep_string(p, refusal);
    reply->error = error;
    p->estimate += strlen(error->message);
    free_region(region);
    return 0;
  }
  if (event->parent_client_id == 0 && spec->n_swapped_out > 0) {
    /* Of the pages swapped out, those the plugin no longer holds fail closed. */
    p->reply_lost[i] = calloc(spec->n_swapped_out, sizeof(Uffdbroker__Extent));
    p->reply_lost_pointers[i] = calloc(spec->n_swapped_out, sizeof(Uffdbroker__Extent *));
    if (!p->reply_lost[i] || !p->reply_lost_pointers[i]) return fail(ENOMEM, "out of memory");
    for (size_t e = 0; e < spec->n_swapped_out; e++) {
      const Uffdbroker__Extent *extent = spec->swapped_out[e];
      if (callbacks->holds && callbacks->holds(region, extent->offset, extent->offset + extent->length, user)) continue;
      Uffdbroker__Extent *lost = &p->reply_lost[i][reply->n_lost];
      uffdbroker__extent__init(lost);
      lost->offset = extent->offset;
      lost->length = extent->length;
      p->reply_lost_pointers[i][reply->n_lost++] = lost;
      p->estimate += EXTENT_SIZE;
    }
    reply->lost = p->reply_lost_pointers[i];
  }
  return 0;
}

static int store(uffd_plugin *p, const Uffdbroker__Store *event, const uffd_callbacks *callbacks, void *user) {
  int err = make_room(p, REPLY_OVERHEAD + MAX_MESSAGE, p->store_count, MAX_REPLIES);
  if (err) return err;
  uffd_region *region = find_region(p, event->client_id, event->region_id, NULL);
  const char *refusal = !region ? "the region is not open here"
                        : !callbacks->store ? "this plugin stores nothing"
                                            : callbacks->store(region, event->offset, event->data.data, event->data.len, user);
  size_t i = p->store_count++;
  Uffdbroker__StoreReply *reply = &p->store_replies[i];
  uffdbroker__store_reply__init(reply);
  reply->store_id = event->store_id;
  p->store_pointers[i] = reply;
  p->estimate += REPLY_OVERHEAD;
  if (refusal) {
    Uffdbroker__Error *error = &p->store_errors[i];
    uffdbroker__error__init(error);
    error->code = region ? UFFDBROKER__ERROR_CODE__ERROR_PLUGIN_REFUSED : UFFDBROKER__ERROR_CODE__ERROR_BAD_REGION;
    error->message = keep_string(p, refusal);
    reply->error = error;
    p->estimate += strlen(error->message);
  }
  return 0;
}

/* ---- events ---- */

static int handle_event(uffd_plugin *p, const Uffdbroker__Event *event, const uffd_callbacks *callbacks, void *user) {
  uffd_region *region;
  size_t index;
  switch (event->kind_case) {
  case UFFDBROKER__EVENT__KIND_REGION_OPENED:
    return region_opened(p, event->region_opened, callbacks, user);
  case UFFDBROKER__EVENT__KIND_REMOVED:
    region = find_region(p, event->removed->client_id, event->removed->region_id, NULL);
    if (region) {
      const Uffdbroker__RangeEvent *range = event->removed;
      uint64_t start = range->start_offset, end = range->start_offset + (range->end - range->start);
      if (range->swapped_out && callbacks->swapped_out) callbacks->swapped_out(region, start, end, user);
      else if (!range->swapped_out && callbacks->removed) callbacks->removed(region, start, end, user);
    }
    return 0;
  case UFFDBROKER__EVENT__KIND_UNMAPPED:
    region = find_region(p, event->unmapped->client_id, event->unmapped->region_id, NULL);
    if (region && callbacks->unmapped) {
      const Uffdbroker__RangeEvent *range = event->unmapped;
      callbacks->unmapped(region, range->start_offset, range->start_offset + (range->end - range->start), user);
    }
    return 0;
  case UFFDBROKER__EVENT__KIND_REMAPPED:
    region = find_region(p, event->remapped->client_id, event->remapped->region_id, NULL);
    if (region) {
      region->base = event->remapped->new_base;
      if (callbacks->remapped) callbacks->remapped(region, user);
    }
    return 0;
  case UFFDBROKER__EVENT__KIND_REGION_CLOSED:
    if (find_region(p, event->region_closed->client_id, event->region_closed->region_id, &index)) close_region(p, index, callbacks, user);
    return 0;
  case UFFDBROKER__EVENT__KIND_CLOSED:
    /* The broker closed each region before; any left are closed now. */
    for (size_t i = p->region_count; i-- > 0;)
      if (p->regions[i]->client_id == event->closed->client_id) close_region(p, i, callbacks, user);
    if (callbacks->closed) callbacks->closed(event->closed->client_id, event->closed->reason, user);
    return 0;
  case UFFDBROKER__EVENT__KIND_STORE:
    return store(p, event->store, callbacks, user);
  case UFFDBROKER__EVENT__KIND_DECISION_REFUSED:
    if (callbacks->decision_refused) {
      const Uffdbroker__DecisionRefused *refused = event->decision_refused;
      callbacks->decision_refused(refused->fault_id, refused->cause, refused->reason, user);
    }
    return 0;
  default:
    return 0; /* a kind this SDK does not know */
  }
}

/* ---- deferred faults, by fault_id: open addressing, linear probing ---- */

static size_t slot_of(const uffd_plugin *p, uint64_t fault_id) {
  return (size_t)((fault_id * 0x9E3779B97F4A7C15ull) >> 32) & (p->table_capacity - 1);
}

static void table_put(uffd_plugin *p, const deferred *entry) {
  size_t i = slot_of(p, entry->fault_id);
  while (p->table[i].fault_id) i = (i + 1) & (p->table_capacity - 1);
  p->table[i] = *entry;
  p->table_count++;
}

static int table_insert(uffd_plugin *p, const deferred *entry) {
  if (2 * (p->table_count + 1) > p->table_capacity) { /* at most half full: probe runs stay short */
    size_t old_capacity = p->table_capacity, capacity = old_capacity ? 2 * old_capacity : 256;
    deferred *old = p->table, *table = calloc(capacity, sizeof *table);
    if (!table) return fail(ENOMEM, "out of memory");
    p->table = table;
    p->table_capacity = capacity;
    p->table_count = 0;
    for (size_t i = 0; i < old_capacity; i++)
      if (old[i].fault_id) table_put(p, &old[i]);
    free(old);
  }
  table_put(p, entry);
  return 0;
}

/* Takes the entry of `fault_id` out of the table into *entry: 1, or 0 if there is none. */
static int table_take(uffd_plugin *p, uint64_t fault_id, deferred *entry) {
  if (p->table_count == 0 || fault_id == 0) return 0;
  size_t mask = p->table_capacity - 1, hole = slot_of(p, fault_id);
  while (p->table[hole].fault_id != fault_id) {
    if (!p->table[hole].fault_id) return 0;
    hole = (hole + 1) & mask;
  }
  *entry = p->table[hole];
  p->table[hole].fault_id = 0;
  p->table_count--;
  /* Backward shift: an entry after the hole whose probe path crosses it moves into it,
   * so no later lookup stops early at the hole. */
  for (size_t j = (hole + 1) & mask; p->table[j].fault_id; j = (j + 1) & mask) {
    size_t home = slot_of(p, p->table[j].fault_id);
    if (((j - home) & mask) >= ((j - hole) & mask)) {
      p->table[hole] = p->table[j];
      p->table[j].fault_id = 0;
      hole = j;
    }
  }
  return 1;
}

/* ---- faults ---- */

/* What a decision needs of its fault. */
typedef struct fault_place {
  uint64_t fault_id, address, offset;
} fault_place;

/* Makes room in the packet for one more decision (with up to `inline_bytes` of data) and
 * `buffer` bytes (0: none) for its buffer in the current block. */
static int make_decision_room(uffd_plugin *p, size_t buffer, size_t inline_bytes) {
  int fits = p->estimate + BATCH_ENTRY + (inline_bytes ? inline_bytes + INLINE_OVERHEAD : 0) <= PACKET_BUDGET &&
             p->batch_count < MAX_BATCH && p->inline_count < MAX_INLINE;
  if (fits && room(p) >= buffer) return 0;
  if (!packet_empty(p)) return flush(p); /* and chooses the next block */
  choose_stage(p);
  return 0;
}

/* Appends the decision answering `fault`: a copy's bytes are at `buffer`, in block `b`. */
static void decide(uffd_plugin *p, const fault_place *fault, uffd_decision decision, uint32_t page, size_t b, uint8_t *buffer) {
  uint64_t length = decision.length ? decision.length : page;
  /* The address of region offset decision.offset, in the same live piece as the fault. */
  uint64_t address = decision.length ? fault->address - fault->offset + decision.offset : fault->address;
  p->faults_served++;
  switch (decision.kind) {
  case UFFD_DECISION_COPY: {
    block *where = &p->blocks[b];
    where->last_packet = p->packets_sent + 1; /* the packet being built names these bytes */
    if (where->shared_offset >= 0) {
      append_batch(p, fault->fault_id, UFFDBROKER__DECISION_KIND__DECISION_COPY, address, length,
                   (uint64_t)where->shared_offset + (uint64_t)(buffer - where->base));
      return;
    }
    Uffdbroker__Decision *d = &p->inline_decisions[p->inline_count];
    uffdbroker__decision__init(d);
    d->fault_id = fault->fault_id;
    d->kind = UFFDBROKER__DECISION_KIND__DECISION_COPY;
    d->address = address;
    d->length = length;
    d->data.data = buffer;
    d->data.len = length;
    p->inline_pointers[p->inline_count++] = d;
    p->estimate += length + INLINE_OVERHEAD;
    return;
  }
  case UFFD_DECISION_ZERO:
    append_batch(p, fault->fault_id, UFFDBROKER__DECISION_KIND__DECISION_ZERO, address, length, 0);
    return;
  case UFFD_DECISION_POISON:
    append_batch(p, fault->fault_id, UFFDBROKER__DECISION_KIND__DECISION_POISON, address, length, 0);
    return;
  case UFFD_DECISION_RETRY:
  default:
    append_batch(p, fault->fault_id, UFFDBROKER__DECISION_KIND__DECISION_RETRY, fault->address, 0, 0);
    return;
  }
}

/* A decision's bytes must fit its buffer: anything else is a bug in the plugin, and would name
 * another fault's bytes. */
static void check_copy(uffd_decision decision, uint64_t page, uint64_t capacity) {
  uint64_t length = decision.length ? decision.length : page;
  if (decision.kind != UFFD_DECISION_COPY || length <= capacity) return;
  fprintf(stderr, "uffd_plugin: a copy of %llu bytes exceeds its buffer of %llu\n", (unsigned long long)length, (unsigned long long)capacity);
  abort();
}

static int serve_fault(uffd_plugin *p, const Uffdbroker__Faults *faults, size_t i, const uffd_callbacks *callbacks, void *user) {
  uffd_region *region = find_region(p, faults->client_id[i], faults->region_id[i], NULL);
  size_t size = region ? uffd_plugin_buffer_size(region) : UFFD_PLUGIN_MAX_PREFETCH;
  int huge = size > UFFD_PLUGIN_MAX_PREFETCH, shared = current_is_shared(p);
  /* Room for the largest inline copy when the bytes cannot go in a shared block (a huge page's never can).
   * A private stage was chosen as the broker's last packet came: no shared half is free before the next, and
   * flushing would not free one (a huge page is retried). */
  int err = make_decision_room(p, huge && !shared ? 0 : size, shared || huge ? 0 : size);
  if (err) return err;
  fault_place place = {faults->fault_id[i], faults->address[i], faults->offset[i]};
  /* No buffer: deferred faults hold them all, or a huge page finds no free shared half (private blocks are
   * for bytes that travel inline, and a huge page fits no packet). Asked again later. */
  if (!region || room(p) < size || (size > UFFD_PLUGIN_MAX_PREFETCH && !current_is_shared(p))) {
    decide(p, &place, uffd_retry(), 0, 0, NULL);
    return 0;
  }
  uffd_fault fault = {.fault_id = place.fault_id, .address = place.address, .offset = place.offset, .flags = faults->flags[i],
                      .thread_id = faults->thread_id[i]};
  size_t b = p->current;
  uint8_t *buffer = p->blocks[b].base + p->staged;
  p->in_pagefault = 1;
  uffd_decision decision = callbacks->pagefault(&fault, region, buffer, size, user);
  p->in_pagefault = 0;
  uint64_t page = region->page_size;
  if (decision.kind == UFFD_DECISION_LATER) {
    /* The buffer's first `reserved` bytes stay the plugin's until it answers. */
    uint64_t reserved = decision.length ? (decision.length + page - 1) / page * page : page;
    check_copy((uffd_decision){UFFD_DECISION_COPY, 0, reserved}, page, size);
    deferred entry = {.fault_id = place.fault_id, .client_id = region->client_id, .region_id = region->region_id,
                      .address = place.address, .offset = place.offset, .block = b, .at = p->staged, .reserved = reserved};
    if (table_insert(p, &entry) != 0) return -ENOMEM;
    p->blocks[b].held++;
    p->staged += reserved;
    return 0;
  }
  check_copy(decision, page, size);
  decide(p, &place, decision, region->page_size, b, buffer);
  if (decision.kind == UFFD_DECISION_COPY) p->staged += ((decision.length ? decision.length : page) + page - 1) / page * page;
  return 0;
}

/* Applies one answer of uffd_plugin_answer. Dropped: an unknown fault (answered already,
 * or never deferred) and one whose region closed meanwhile (the broker forgot the fault). */
static int apply_answer(uffd_plugin *p, const answer *a) {
  deferred entry;
  if (!table_take(p, a->fault_id, &entry)) return 0;
  uffd_region *region = find_region(p, entry.client_id, entry.region_id, NULL);
  int err = 0;
  if (region) {
    check_copy(a->decision, region->page_size, entry.reserved);
    int inline_bytes = a->decision.kind == UFFD_DECISION_COPY && p->blocks[entry.block].shared_offset < 0;
    err = make_decision_room(p, 0, inline_bytes ? entry.reserved : 0); /* the block is held: it stays put */
    fault_place place = {entry.fault_id, entry.address, entry.offset};
    if (!err) decide(p, &place, a->decision, region->page_size, entry.block, p->blocks[entry.block].base + entry.at);
  }
  p->blocks[entry.block].held--;
  return err;
}

/* Takes the answers queued by other threads and applies them. */
static int take_answers(uffd_plugin *p) {
  uint64_t count;
  if (read(p->wake, &count, sizeof count) < 0 && errno != EAGAIN) return fail(errno, "eventfd: %s", strerror(errno));
  pthread_mutex_lock(&p->lock);
  answer *taken = p->queue;
  size_t n = p->queue_count, capacity = p->queue_capacity;
  p->queue = p->taken;
  p->queue_capacity = p->taken_capacity;
  p->queue_count = 0;
  p->taken = taken;
  p->taken_capacity = capacity;
  pthread_mutex_unlock(&p->lock);
  for (size_t i = 0; i < n; i++) {
    int err = apply_answer(p, &taken[i]);
    if (err) return err;
  }
  return 0;
}

/* Applies one decoded packet: events first, then faults, then sends the answers. */
static int handle_packet(uffd_plugin *p, const Uffdbroker__BrokerToPlugin *packet, const uffd_callbacks *callbacks, void *user) {
  if (packet->error) return fail(ECONNABORTED, "the broker: %s (code %d)", packet->error->message, packet->error->code);
  if (packet->packets_applied > p->packets_applied) p->packets_applied = packet->packets_applied;
  /* An unused private block may give way to a shared one now that the broker has caught up. */
  if (packet_empty(p) && (p->current == NO_BLOCK || (!current_is_shared(p) && p->staged == 0))) choose_stage(p);
  for (size_t i = 0; i < packet->n_events; i++) {
    int err = handle_event(p, packet->events[i], callbacks, user);
    if (err) return err;
  }
  const Uffdbroker__Faults *faults = packet->faults;
  if (faults) {
    size_t n = faults->n_fault_id;
    if (faults->n_client_id != n || faults->n_region_id != n || faults->n_address != n || faults->n_offset != n || faults->n_flags != n ||
        faults->n_thread_id != n)
      return fail(EPROTO, "the broker sent fault arrays of different lengths");
    for (size_t i = 0; i < n; i++) {
      int err = serve_fault(p, faults, i, callbacks, user);
      if (err) return err;
    }
  }
  return flush(p);
}

/* ---- the public functions ---- */

static int make_shared_area(void) {
  int fd = memfd_create("uffd-plugin-pages", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return -errno;
  if (ftruncate(fd, 2 * SHARED_HALF) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    int err = errno;
    close(fd);
    return -err;
  }
  return fd;
}

static int refused(const Uffdbroker__Error *error) {
  return fail(ECONNABORTED, "the broker refused: %s (code %d)", error->message, error->code);
}

/* After a failed send of Hello: a broker that refuses a connection sends why,
 * then shuts it (EPIPE), but its Error is there to read; without one, the send's error stands. */
static void read_refusal(uffd_plugin *p) {
  int err = errno;
  char sent[sizeof last_error];
  memcpy(sent, last_error, sizeof sent);
  struct timeval timeout = {.tv_sec = 1};
  setsockopt(p->fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  ssize_t count = receive_packet(p);
  Uffdbroker__BrokerToPlugin *answer = count > 0 ? uffdbroker__broker_to_plugin__unpack(NULL, (size_t)count, p->receive) : NULL;
  if (answer && answer->error) refused(answer->error);
  else fail(err, "%s", sent);
  if (answer) uffdbroker__broker_to_plugin__free_unpacked(answer, NULL);
}

/* Takes the descriptors the broker's Hello packet carries for its `kept` names. */
static int restore_kept(uffd_plugin *p, const Uffdbroker__DescriptorStore *kept) {
  size_t n = kept ? kept->n_names : 0;
  for (size_t i = 0; i < n && p->kept_count < MAX_FDS; i++) {
    char *name = strdup(kept->names[i]);
    if (!name) return fail(ENOMEM, "out of memory");
    p->kept_names[p->kept_count] = name;
    p->kept_fds[p->kept_count++] = p->received_fds[i];
    p->received_fds[i] = -1;
  }
  for (size_t i = 0; i < p->received_count; i++)
    if (p->received_fds[i] >= 0) close(p->received_fds[i]);
  p->received_count = 0;
  return 0;
}

uffd_plugin *uffd_plugin_connect(const char *socket_path, const char *name) {
  uffd_plugin *p = calloc(1, sizeof *p);
  if (!p) return fail(ENOMEM, "out of memory"), NULL;
  p->fd = -1;
  pthread_mutex_init(&p->lock, NULL);
  p->current = NO_BLOCK;
  p->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  p->receive = malloc(RECEIVE_BUFFER);
  p->send = malloc(MAX_PACKET);
  if (p->wake < 0) {
    fail(errno, "eventfd: %s", strerror(errno));
    goto failed;
  }
  if (!p->receive || !p->send) {
    fail(ENOMEM, "out of memory");
    goto failed;
  }
  p->estimate = 64;
  int fd = open_socket(socket_path);
  if (fd < 0) goto failed;
  p->fd = fd;
  if (check_peer(fd) != 0) goto failed;
  /* Linux refuses a send longer than SO_SNDBUF - 32: the default (212,992) is below a full packet. */
  int size = SOCKET_BUFFER;
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) != 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);

  /* The plugin speaks first: Hello, with the shared area's memfd if one could be made. */
  int memfd = make_shared_area();
  if (memfd >= 0) {
    void *mapping = mmap(NULL, 2 * SHARED_HALF, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (mapping != MAP_FAILED && add_block(p, mapping, SHARED_HALF, 0) == 0 && add_block(p, (uint8_t *)mapping + SHARED_HALF, SHARED_HALF, SHARED_HALF) == 0)
      p->shared = mapping;
    else if (mapping != MAP_FAILED)
      munmap(mapping, 2 * SHARED_HALF), p->block_count = 0;
  }
  Uffdbroker__Hello hello;
  uffdbroker__hello__init(&hello);
  hello.version = UFFD_PLUGIN_PROTOCOL_VERSION;
  hello.role = UFFDBROKER__ROLE__ROLE_PLUGIN;
  hello.name = (char *)name;
  Uffdbroker__PluginToBroker message;
  uffdbroker__plugin_to_broker__init(&message);
  message.hello = &hello;
  size_t length = uffdbroker__plugin_to_broker__pack(&message, p->send);
  int sent = send_packet(p, p->send, length, &memfd, p->shared ? 1 : 0);
  if (memfd >= 0) close(memfd); /* the mapping stays */
  if (sent != 0) {
    read_refusal(p);
    goto failed;
  }
  p->packets_sent = 1;
  choose_stage(p);

  struct timeval timeout = {.tv_sec = 10};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  ssize_t count = receive_packet(p);
  if (count == 0) fail(ECONNABORTED, "the broker closed the connection after Hello");
  if (count <= 0) goto failed;
  timeout.tv_sec = 0;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  Uffdbroker__BrokerToPlugin *answer = uffdbroker__broker_to_plugin__unpack(NULL, (size_t)count, p->receive);
  if (!answer) {
    fail(EPROTO, "the broker's answer to Hello is malformed");
    goto failed;
  }
  int ok = 0;
  if (answer->error) refused(answer->error);
  else if (!answer->hello || answer->hello->role != UFFDBROKER__ROLE__ROLE_BROKER) fail(EPROTO, "the broker did not answer Hello");
  else if (answer->kept && answer->kept->n_names > p->received_count) fail(EPROTO, "the broker named more kept descriptors than it sent");
  else ok = restore_kept(p, answer->kept) == 0;
  if (answer->packets_applied > p->packets_applied) p->packets_applied = answer->packets_applied;
  uffdbroker__broker_to_plugin__free_unpacked(answer, NULL);
  if (ok) return p;
failed:;
  int err = errno;
  uffd_plugin_free(p);
  errno = err;
  return NULL;
}

/* Serves until the broker closes the connection (0) or an error (-errno). */
static int serve(uffd_plugin *p, const uffd_callbacks *callbacks, void *user) {
  int err = flush(p); /* delegations and descriptors to keep made before the loop */
  struct pollfd ready[2] = {{.fd = p->fd, .events = POLLIN}, {.fd = p->wake, .events = POLLIN}};
  while (err == 0) {
    if (poll(ready, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return fail(errno, "poll: %s", strerror(errno));
    }
    if (ready[1].revents) {
      err = take_answers(p);
      if (err == 0) err = flush(p); /* the answers of one wake-up, batched */
    }
    if (err != 0 || !ready[0].revents) continue;
    ssize_t count = receive_packet(p);
    if (count == 0) return 0; /* the broker closed the connection */
    if (count < 0) return (int)count;
    close_received(p); /* only the Hello packet carries descriptors for the plugin */
    Uffdbroker__BrokerToPlugin *packet = uffdbroker__broker_to_plugin__unpack(NULL, (size_t)count, p->receive);
    if (!packet) return fail(EPROTO, "a malformed packet from the broker");
    err = handle_packet(p, packet, callbacks, user);
    uffdbroker__broker_to_plugin__free_unpacked(packet, NULL);
  }
  return err;
}

int uffd_plugin_run(uffd_plugin *p, const uffd_callbacks *callbacks, void *user) {
  if (!callbacks || !callbacks->pagefault) return fail(EINVAL, "a plugin needs a pagefault callback");
  int result = serve(p, callbacks, user);
  /* The connection is over: its fault ids mean nothing to any later one. Later answers are refused. */
  pthread_mutex_lock(&p->lock);
  p->stopped = 1;
  p->queue_count = 0;
  pthread_mutex_unlock(&p->lock);
  return result;
}

int uffd_plugin_answer(uffd_plugin *p, uint64_t fault_id, uffd_decision decision) {
  if (decision.kind < UFFD_DECISION_COPY || decision.kind > UFFD_DECISION_POISON)
    return fail(EINVAL, "an answer must copy, zero, retry or poison");
  pthread_mutex_lock(&p->lock);
  if (p->stopped) {
    pthread_mutex_unlock(&p->lock);
    return fail(ENOTCONN, "the connection is over: its faults are the broker's again");
  }
  if (p->queue_count == p->queue_capacity) {
    size_t capacity = p->queue_capacity ? 2 * p->queue_capacity : 256;
    answer *grown = realloc(p->queue, capacity * sizeof *grown);
    if (!grown) {
      pthread_mutex_unlock(&p->lock);
      return fail(ENOMEM, "out of memory");
    }
    p->queue = grown;
    p->queue_capacity = capacity;
  }
  p->queue[p->queue_count++] = (answer){fault_id, decision};
  int wake = p->queue_count == 1; /* the first since the loop last took them */
  pthread_mutex_unlock(&p->lock);
  uint64_t one = 1;
  if (wake && write(p->wake, &one, sizeof one) < 0 && errno != EAGAIN) return fail(errno, "eventfd: %s", strerror(errno));
  return 0;
}

void uffd_plugin_free(uffd_plugin *p) {
  if (!p) return;
  if (p->fd >= 0) close(p->fd);
  for (size_t i = 0; i < p->region_count; i++) free_region(p->regions[i]);
  for (size_t i = 0; i < p->fd_count; i++) close(p->fds[i]);
  for (size_t i = 0; i < p->keep_count; i++) close(p->keep_fds[i]), free(p->keep_names[i]);
  for (size_t i = 0; i < p->kept_count; i++) {
    if (p->kept_fds[i] >= 0) close(p->kept_fds[i]);
    free(p->kept_names[i]);
  }
  close_received(p);
  for (size_t i = 0; i < p->reply_count; i++) free(p->reply_lost[i]), free(p->reply_lost_pointers[i]);
  for (size_t i = 0; i < p->string_count; i++) free(p->strings[i]);
  free(p->regions);
  if (p->shared) munmap(p->shared, 2 * SHARED_HALF);
  for (size_t i = 0; i < p->block_count; i++)
    if (p->blocks[i].shared_offset < 0) free(p->blocks[i].base);
  free(p->blocks);
  free(p->table);
  free(p->queue);
  free(p->taken);
  if (p->wake >= 0) close(p->wake);
  pthread_mutex_destroy(&p->lock);
  free(p->send);
  free(p->receive);
  free(p);
}

uint64_t uffd_plugin_faults_served(const uffd_plugin *p) { return p->faults_served; }

static int delegate(uffd_plugin *p, const uffd_region *region, uint64_t offset, uint64_t length, Uffdbroker__DelegationKind kind, int fd,
                    uint64_t file_offset, uint32_t prefetch_pages, int revoke) {
  if (offset % region->page_size || length % region->page_size || length == 0 || offset + length > region->length || offset + length < offset)
    return fail(EINVAL, "a delegation must be whole pages inside the region");
  if (prefetch_pages > 32) return fail(EINVAL, "at most 32 pages per fault");
  int full = p->estimate + DELEGATION_SIZE > PACKET_BUDGET || p->delegation_count == MAX_REPLIES || (fd >= 0 && p->fd_count + p->keep_count == MAX_FDS);
  if (full && p->in_pagefault) return fail(EAGAIN, "this answer is full; delegate from another callback");
  int err = full ? flush(p) : 0;
  if (err) return err;
  int copy = -1;
  if (fd >= 0 && (copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) return fail(errno, "dup: %s", strerror(errno));
  Uffdbroker__Delegation *d = &p->delegations[p->delegation_count];
  uffdbroker__delegation__init(d);
  d->client_id = region->client_id;
  d->region_id = region->region_id;
  d->offset = offset;
  d->length = length;
  d->kind = kind;
  d->file_offset = file_offset;
  d->prefetch_pages = prefetch_pages;
  d->revoke = revoke;
  p->delegation_pointers[p->delegation_count++] = d;
  p->estimate += DELEGATION_SIZE;
  if (copy >= 0) p->fds[p->fd_count++] = copy;
  return 0;
}

int uffd_plugin_delegate_zero(uffd_plugin *p, const uffd_region *region, uint64_t offset, uint64_t length, uint32_t prefetch_pages) {
  return delegate(p, region, offset, length, UFFDBROKER__DELEGATION_KIND__DELEGATE_ZERO, -1, 0, prefetch_pages, 0);
}

int uffd_plugin_delegate_file(uffd_plugin *p, const uffd_region *region, uint64_t offset, uint64_t length, int fd, uint64_t file_offset,
                              uint32_t prefetch_pages) {
  if (fd < 0) return fail(EBADF, "no file to delegate");
  return delegate(p, region, offset, length, UFFDBROKER__DELEGATION_KIND__DELEGATE_FILE, fd, file_offset, prefetch_pages, 0);
}

int uffd_plugin_revoke(uffd_plugin *p, const uffd_region *region, uint64_t offset, uint64_t length) {
  return delegate(p, region, offset, length, UFFDBROKER__DELEGATION_KIND__DELEGATE_UNSPECIFIED, -1, 0, 0, 1);
}

int uffd_plugin_keep(uffd_plugin *p, int fd, const char *name) {
  size_t length = name ? strlen(name) : 0;
  if (length == 0 || length > MAX_KEPT_NAME) return fail(EINVAL, "a kept descriptor's name must be 1 to %d bytes", MAX_KEPT_NAME);
  if (fd < 0) return fail(EBADF, "no descriptor to keep");
  int full = p->fd_count + p->keep_count == MAX_FDS || p->estimate + MAX_KEPT_NAME + 8 > PACKET_BUDGET;
  if (full && p->in_pagefault) return fail(EAGAIN, "this answer is full; keep from another callback");
  int err = full ? flush(p) : 0;
  if (err) return err;
  char *copy_name = strdup(name);
  if (!copy_name) return fail(ENOMEM, "out of memory");
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) {
    int dup_error = errno;
    free(copy_name);
    return fail(dup_error, "dup: %s", strerror(dup_error));
  }
  p->keep_names[p->keep_count] = copy_name;
  p->keep_fds[p->keep_count++] = copy;
  p->estimate += MAX_KEPT_NAME + 8;
  return 0;
}

int uffd_plugin_take_kept(uffd_plugin *p, const char *name) {
  for (size_t i = 0; i < p->kept_count; i++) {
    if (p->kept_fds[i] < 0 || strcmp(p->kept_names[i], name) != 0) continue;
    int fd = p->kept_fds[i];
    p->kept_fds[i] = -1;
    return fd;
  }
  return fail(ENOENT, "the broker kept nothing named %s", name);
}
