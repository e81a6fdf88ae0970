/*
 * uffd_plugin.h: the C plugin SDK of uffd-broker (protocol version 2).
 *
 * A plugin connects to the broker's plugin socket, says Hello under a plugin
 * name, and is then called back for each event of the clients whose regions
 * name it: a region opened (accept or refuse), a page fault (write the page's
 * bytes into the buffer handed over and decide copy, zero, retry or poison),
 * pages removed or unmapped, a region moved (mremap), a region closed, a
 * client gone, a swap-out's bytes to store, a decision of the plugin refused.
 *
 *     static uffd_decision fault(const uffd_fault *f, uffd_region *r, void *buffer, size_t size, void *user) {
 *       memset(buffer, 0x2a, r->page_size);  // size >= r->page_size, huge pages too
 *       return uffd_copy();
 *     }
 *     int main(void) {
 *       uffd_plugin *p = uffd_plugin_connect(NULL, "answer");
 *       uffd_callbacks callbacks = { .pagefault = fault };
 *       return p && uffd_plugin_run(p, &callbacks, NULL) == 0 ? 0 : 1;
 *     }
 *
 * Contract:
 * 1. Every callback runs on the thread that called uffd_plugin_run, one at a
 *    time, in the order the broker sent the events; a packet's region, range
 *    and client events come before its page faults.
 * 2. A plugin object is not thread-safe: call the functions below from the
 *    thread running uffd_plugin_run (the delegation functions from callbacks),
 *    except uffd_plugin_answer, which any thread may call.
 * 3. Answers are batched: the decisions of one packet of faults leave in as
 *    few packets as fit (each at most 256 KiB, never an empty one) once the
 *    packet's events are handled; answers given later (uffd_plugin_answer)
 *    leave together each time the loop wakes for them.
 * 4. Page bytes are written straight into `buffer`, page aligned; by default
 *    it lies in a memfd shared with the broker, so a decision only names
 *    where the bytes are. Each half of that area is reused only after the
 *    broker reported (packets_applied) that it applied the packet naming it,
 *    and no fault answered later still holds a buffer there; otherwise the
 *    bytes travel inline from private memory. Should deferred faults hold
 *    every buffer there is (1 GiB), a new fault gets retry, never a hang.
 *    Huge pages (page_size 2 MiB, README "Huge pages"): a fault's buffer is one
 *    whole huge page, in the shared area only (its halves are 4 MiB; a huge
 *    page fits no packet); while no half is free such a fault gets retry. A
 *    plugin without a shared area refuses regions of pages larger than
 *    UFFD_PLUGIN_MAX_PREFETCH at RegionOpened, saying so.
 * 5. Functions that can fail return 0 (or a pointer) on success and -errno (or
 *    NULL, errno set) on failure; uffd_plugin_last_error() says why, for people.
 *
 * Build: `make -C sdk/c` gives libuffdplugin.a; link with
 * `pkg-config --libs uffd-plugin` (or -luffdplugin -lprotobuf-c).
 */
#ifndef UFFD_PLUGIN_H
#define UFFD_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The protocol version this SDK speaks. */
#define UFFD_PLUGIN_PROTOCOL_VERSION 2
/** The largest range one decision may fill (copy or zero), and the size of a fault's buffer,
 *  in a region of small pages; in a huge-page region both are one huge page (uffd_plugin_buffer_size). */
#define UFFD_PLUGIN_MAX_PREFETCH (128u << 10)
/** UFFD_PAGEFAULT_FLAG_WRITE in uffd_fault.flags: the fault is a write. */
#define UFFD_FAULT_WRITE 1u

typedef struct uffd_plugin uffd_plugin;

/** A region of a client's memory this plugin serves (RegionOpened). */
typedef struct uffd_region {
  uint64_t client_id;
  uint64_t region_id;
  uint64_t base;            /** where region offset 0 lies now (changes with mremap) */
  uint64_t length;          /** bytes, a multiple of page_size */
  uint32_t page_size;
  const char *plugin;       /** the plugin name the region names */
  const char *argument;     /** for the plugin: a file path, a store key... */
  uint64_t backing_offset;  /** where the region starts in the plugin's backing */
  int32_t pid;              /** the client's pid (0: a forked child) */
  uint64_t parent_client_id;  /** a forked child's parent client, else 0 */
  int has_credentials;      /** whether uid and gid are known */
  uint32_t uid, gid;        /** the client's, from the broker's SO_PEERCRED */
  uint64_t token_high, token_low;  /** the client's token: a key for data kept across broker restarts */
  void *context;            /** the plugin's own, set in region_opened */
  int shared_memory;        /** the region maps the client's shared-memory file (a memfd): filled once into
                                the file's cache, shared by every clone mapping it; served alike */
} uffd_region;

/** One page fault. */
typedef struct uffd_fault {
  uint64_t fault_id;  /** opaque: compare, never compute with it */
  uint64_t address;   /** the faulting page */
  uint64_t offset;    /** region offset of the faulting page */
  uint32_t flags;     /** UFFD_FAULT_WRITE */
  int32_t thread_id;  /** 0: unknown */
} uffd_fault;

typedef enum uffd_decision_kind {
  UFFD_DECISION_COPY = 1,    /** fill the range with the bytes written to the buffer */
  UFFD_DECISION_ZERO = 2,    /** fill the range with zero pages */
  UFFD_DECISION_RETRY = 3,   /** not ready: the broker delivers the fault again later */
  UFFD_DECISION_POISON = 4,  /** the content is lost: accesses get SIGBUS */
  UFFD_DECISION_LATER = 5,   /** from pagefault only: the plugin answers later, with uffd_plugin_answer */
} uffd_decision_kind;

/**
 * A page fault's answer. length 0: the faulting page alone (offset ignored).
 * Otherwise [offset, offset + length) in region offsets, page aligned, inside
 * the region, containing the faulting page, at most uffd_plugin_buffer_size(region)
 * bytes: a prefetch. A copy's bytes are at the start of the fault's buffer.
 * A copy (or reservation) longer than the buffer aborts the plugin with a message.
 */
typedef struct uffd_decision {
  uffd_decision_kind kind;
  uint64_t offset;
  uint64_t length;
} uffd_decision;

static inline uffd_decision uffd_copy(void) { return (uffd_decision){UFFD_DECISION_COPY, 0, 0}; }
static inline uffd_decision uffd_copy_range(uint64_t offset, uint64_t length) { return (uffd_decision){UFFD_DECISION_COPY, offset, length}; }
static inline uffd_decision uffd_zero(void) { return (uffd_decision){UFFD_DECISION_ZERO, 0, 0}; }
static inline uffd_decision uffd_zero_range(uint64_t offset, uint64_t length) { return (uffd_decision){UFFD_DECISION_ZERO, offset, length}; }
static inline uffd_decision uffd_retry(void) { return (uffd_decision){UFFD_DECISION_RETRY, 0, 0}; }
static inline uffd_decision uffd_poison(void) { return (uffd_decision){UFFD_DECISION_POISON, 0, 0}; }
/** Answer later (uffd_plugin_answer): the buffer's first page stays the plugin's until then. */
static inline uffd_decision uffd_later(void) { return (uffd_decision){UFFD_DECISION_LATER, 0, 0}; }
/** Answer later, keeping the buffer's first `length` bytes (≤ uffd_plugin_buffer_size(region)):
 *  the answer may then copy up to that much (a prefetch). */
static inline uffd_decision uffd_later_keeping(uint64_t length) { return (uffd_decision){UFFD_DECISION_LATER, 0, length}; }

/** The size of a fault's buffer in `region`, the most one decision fills: UFFD_PLUGIN_MAX_PREFETCH,
 *  or one page of a region of larger (huge) pages. */
static inline size_t uffd_plugin_buffer_size(const uffd_region *region) {
  return region->page_size > UFFD_PLUGIN_MAX_PREFETCH ? region->page_size : UFFD_PLUGIN_MAX_PREFETCH;
}

/**
 * The plugin's callbacks; any may be NULL except pagefault. `user` is the
 * pointer given to uffd_plugin_run. Strings passed in live until the callback returns.
 */
typedef struct uffd_callbacks {
  /** A region opened (a forked child's copy when parent_client_id is set).
   *  Return NULL to accept, or a message to refuse it (the client's Register
   *  fails; a forked child's faults fail closed). NULL callback: accept,
   *  except forked children, which are refused. Not called for a region whose
   *  pages no buffer holds (huge pages without a shared area): refused. */
  const char *(*region_opened)(uffd_region *region, void *user);
  /** Decide one fault. `buffer` is page aligned, `buffer_size` bytes
   *  (uffd_plugin_buffer_size(region): at least one page); a copy's bytes go at its start. Return
   *  uffd_later() to answer from another thread or when I/O completes
   *  (uffd_plugin_answer); the buffer then stays valid and the plugin's until then. */
  uffd_decision (*pagefault)(const uffd_fault *fault, uffd_region *region, void *buffer, size_t buffer_size, void *user);
  /** MADV_DONTNEED/REMOVE of region offsets [start, end): they read as zeros now
   *  (forget any stored copy). Never called for a swap-out's drop: see swapped_out. */
  void (*removed)(uffd_region *region, uint64_t start, uint64_t end, void *user);
  /** munmap of region offsets [start, end). */
  void (*unmapped)(uffd_region *region, uint64_t start, uint64_t end, void *user);
  /** mremap moved (part of) the region: region->base is updated already. */
  void (*remapped)(uffd_region *region, void *user);
  /** The region is gone: last call for it; free region->context here. */
  void (*region_closed)(uffd_region *region, void *user);
  /** The client is gone (after region_closed of each of its regions). */
  void (*closed)(uint64_t client_id, const char *reason, void *user);
  /** Swap-out: keep `length` bytes (whole pages) of the region from page-aligned
   *  `offset`; `data` lives until the callback returns. Until the region closes, a
   *  fault on these pages must be answered with them (a later store replaces them).
   *  Return NULL when stored, or a message to refuse (the client's swap-out fails,
   *  its pages stay resident). NULL callback: refused. */
  const char *(*store)(uffd_region *region, uint64_t offset, const void *data, size_t length, void *user);
  /** A swap-out dropped region offsets [start, end) from the client: from now on
   *  the plugin's stored copy is their only one. */
  void (*swapped_out)(uffd_region *region, uint64_t start, uint64_t end, void *user);
  /** A region opened again (the plugin or the broker restarted) names pages a
   *  swap-out released: return nonzero if the plugin still holds region offsets
   *  [start, end). NULL callback, or 0: they fail closed (SIGBUS). */
  int (*holds)(uffd_region *region, uint64_t start, uint64_t end, void *user);
  /** A decision (fault_id) or delegation (fault_id 0) was refused; a fault's is delivered again. */
  void (*decision_refused)(uint64_t fault_id, const char *cause, const char *reason, void *user);
} uffd_callbacks;

/**
 * Connects to the broker's plugin socket and says Hello as `name`.
 * socket_path NULL: $UFFD_BROKER_PLUGIN_FD (a connection inherited from a
 * broker that spawned this process), else $UFFD_BROKER_PLUGIN_SOCKET, else
 * $XDG_RUNTIME_DIR/uffd-broker/plugin.sock (/run/uffd-broker/plugin.sock as root).
 * The listener must run as root, as this process's uid, or as $UFFD_BROKER_UID:
 * nothing is sent to anyone else. Returns NULL with errno set on failure
 * (ECONNREFUSED/ENOENT: no broker; EACCES: untrusted listener; ETIMEDOUT: no
 * answer within 10 s; ECONNABORTED: the broker refused, e.g. the name is taken
 * or the uid not allowed, even when the refusal made the Hello's send fail with
 * EPIPE: uffd_plugin_last_error() gives the broker's message and code).
 */
uffd_plugin *uffd_plugin_connect(const char *socket_path, const char *name);

/** Serves events until the broker closes the connection (returns 0) or an
 *  error (returns -errno: an Error from the broker, a malformed packet, a failed send). */
int uffd_plugin_run(uffd_plugin *plugin, const uffd_callbacks *callbacks, void *user);

/** Closes the connection and frees the plugin. */
void uffd_plugin_free(uffd_plugin *plugin);

/**
 * Answers a fault the pagefault callback left for later (uffd_later()), from any
 * thread. A copy's bytes must be in that fault's buffer, written before this call
 * (the buffer is the plugin's until then, and is reused only after it). The
 * loop wakes, and sends the answers that came meanwhile together. Answer each
 * deferred fault exactly once and within the broker's deadline (5 s by default),
 * even if its region closed meanwhile: such an answer is dropped, as is any for a
 * fault not deferred or answered already. Returns 0 when queued, -EINVAL for a
 * decision that is not copy, zero, retry or poison, -ENOTCONN once
 * uffd_plugin_run has returned (the broker delivers the connection's faults
 * again to the next). Call uffd_plugin_free only once no thread will call this.
 */
int uffd_plugin_answer(uffd_plugin *plugin, uint64_t fault_id, uffd_decision decision);

/** Faults answered so far. */
uint64_t uffd_plugin_faults_served(const uffd_plugin *plugin);

/** Hands the broker region offsets [offset, offset + length) (page aligned) to
 *  serve as zero pages itself, with no round trip per fault. Sent with the
 *  next answer. prefetch_pages: pages filled per fault (0 or 1: one; at most 32). */
int uffd_plugin_delegate_zero(uffd_plugin *plugin, const uffd_region *region, uint64_t offset, uint64_t length, uint32_t prefetch_pages);

/** Hands the broker [offset, offset + length) to serve from `fd` (a regular file
 *  or memfd; region offset `offset` lies at `file_offset`). The SDK sends a
 *  duplicate of fd; the caller keeps its own. */
int uffd_plugin_delegate_file(uffd_plugin *plugin, const uffd_region *region, uint64_t offset, uint64_t length, int fd, uint64_t file_offset,
                              uint32_t prefetch_pages);

/* Delegations are sent with the plugin's next answer. Called from a pagefault
 * callback when that answer is full, they fail with -EAGAIN (call again from
 * another callback). */

/** Takes back a delegated range: its faults come to the plugin again. */
int uffd_plugin_revoke(uffd_plugin *plugin, const uffd_region *region, uint64_t offset, uint64_t length);

/*
 * The descriptor store: the broker keeps descriptors for this plugin's name
 * (as systemd's FDSTORE) and hands them back to the next connection under the
 * name, after a crash, a kill -9 or a restart of the plugin (not of the broker).
 * Data kept in a memfd so survives the plugin process.
 */

/** Asks the broker to keep a duplicate of `fd` (a memfd or regular file) under
 *  `name` (1 to 64 bytes), replacing what the name held; sent with the next
 *  answer, like a delegation (-EAGAIN from a full pagefault answer). The broker
 *  keeps at most 8 names (more closes the connection with ERROR_LIMIT). A memfd
 *  that only grows keeps its identity: keeping it once is enough. `fd` stays the caller's. */
int uffd_plugin_keep(uffd_plugin *plugin, int fd, const char *name);

/** The descriptor the broker kept under `name` for an earlier connection of this
 *  plugin name, handed back with its Hello: the caller owns it from now on. Each
 *  is handed out once; -ENOENT if there is none (a first start). Those never
 *  taken are closed by uffd_plugin_free. */
int uffd_plugin_take_kept(uffd_plugin *plugin, const char *name);

/** The last failure of this thread, for people ("" if none). */
const char *uffd_plugin_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
