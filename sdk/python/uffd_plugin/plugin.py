"""What a plugin sees and answers: faults, regions, decisions, and the Plugin base class."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from . import broker_pb2 as pb


class Refused(Exception):
    """Raise from `region_opened`, `region_forked` or `store` to refuse.

    The broker passes `message` on to the client (or the swap-out); `code` is an
    `ErrorCode` of broker.proto (default ERROR_PLUGIN_REFUSED). Any other
    exception refuses the same way, with its text as the message.
    """

    def __init__(self, message: str, code: int = 7) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class BrokerError(Exception):
    """The connection failed: the broker refused it (its Error's `code` and
    message), did not answer, or is served by someone untrusted."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Fault:
    """One page fault: a thread of client `client_id` touched `address` (page
    aligned), `offset` bytes into region `region_id`.

    `fault_id` is opaque: compare it, never compute with it. `flags`:
    UFFD_PAGEFAULT_FLAG_* (1 write, 2 write-protect, 4 minor); `thread_id` 0: unknown.
    """

    fault_id: int
    client_id: int
    region_id: int
    address: int
    offset: int
    flags: int
    thread_id: int

    @property
    def is_write(self) -> bool:
        """Whether the access was a write."""
        return bool(self.flags & 1)


@dataclass
class Region:
    """A region of a client's memory that this plugin serves, from
    `region_opened` to `region_closed`. `context` is the plugin's own.

    `base` is where region offset 0 lies now (an mremap moves it; see `remapped`).
    `uid`/`gid` are the client's (a forked child: its parent's), None if the
    broker did not say: act with the client's rights, never the plugin's own.
    """

    client_id: int
    id: int
    base: int
    length: int
    page_size: int
    plugin: str
    argument: str
    backing_offset: int
    pid: int
    uid: Optional[int]
    gid: Optional[int]
    token: bytes
    parent_client_id: int = 0
    swapped_out: list = field(default_factory=list)
    # The region maps the client's shared-memory file (a memfd): its pages are
    # filled once into the file's cache and shared by every clone mapping it.
    # Served alike: the bytes of the backing at each fault's offset.
    shared_memory: bool = False
    context: Any = None
    # The runner's queue of what to send with its next packet (set by the runner).
    _outbox: Optional[list] = field(default=None, repr=False, compare=False)

    def delegate_zero(self, start: int = 0, end: Optional[int] = None) -> None:
        """Hands region offsets [start, end) (default: all) to the broker to
        serve with zero pages by itself: no round trip per fault. Removes,
        unmaps and remaps still come here; a removed or unmapped part comes back.
        Sent with the runner's next packet; call it from a Plugin method."""
        self._delegate(start, end, pb.DELEGATE_ZERO)

    def delegate_file(self, fd: int, file_offset: int = 0, start: int = 0, end: Optional[int] = None,
                      prefetch_pages: int = 1) -> None:
        """Hands region offsets [start, end) (default: all) to the broker to
        serve from `fd` (a regular file or memfd), region offset `start` at
        `file_offset`; past the file's end pages read as zeros. `prefetch_pages`
        (at most 32) fills an aligned block per fault. `fd` stays the caller's:
        the runner sends a duplicate (OSError if it cannot make one)."""
        if file_offset % self.page_size:
            raise ValueError(f"file offset {file_offset} is not page aligned")
        if not 1 <= prefetch_pages <= 32:
            raise ValueError(f"prefetch_pages {prefetch_pages}: 1 to 32")
        self._delegate(start, end, pb.DELEGATE_FILE, os.dup(fd), file_offset, prefetch_pages)

    def revoke_delegation(self, start: int = 0, end: Optional[int] = None) -> None:
        """Takes back region offsets [start, end) (default: all): their faults come here again."""
        self._delegate(start, end, pb.DELEGATE_UNSPECIFIED, revoke=True)

    def _delegate(self, start: int, end: Optional[int], kind: int, fd: Optional[int] = None, file_offset: int = 0,
                  prefetch_pages: int = 1, revoke: bool = False) -> None:
        end = self.length if end is None else end
        if not (0 <= start < end <= self.length and start % self.page_size == 0 and end % self.page_size == 0):
            if fd is not None:
                os.close(fd)
            raise ValueError(f"offsets [{start}, {end}) are not a page-aligned part of region {self.id} ({self.length} bytes)")
        delegation = pb.Delegation(client_id=self.client_id, region_id=self.id, offset=start, length=end - start, kind=kind,
                                   file_offset=file_offset, prefetch_pages=prefetch_pages, revoke=revoke)
        self._outbox.append((delegation, fd))


class DescriptorStore(dict):
    """The broker's descriptor store for this plugin's name (as systemd's
    FDSTORE), handed to `Plugin.connected`: memfds or regular files the broker
    keeps and hands back when a plugin connects again under the same name
    (after a crash, a kill, a restart), so data kept in them survives the
    plugin process (not the broker's own restart).

    As a dict, it maps names to the descriptors kept by earlier connections;
    the plugin owns them. `keep` asks the broker to keep one more.
    """

    MAX_NAMES = 8
    """Names the broker keeps for one plugin name: its Hello carries them all, at most 8 descriptors."""

    def __init__(self, restored: dict, outbox: list) -> None:
        super().__init__(restored)
        self._outbox = outbox
        self._names = set(restored)

    def keep(self, fd: int, name: str) -> None:
        """Asks the broker to keep a duplicate of `fd` (a memfd or regular
        file) as `name` (1 to 64 bytes of UTF-8), replacing what `name` held.
        Sent with the runner's next packet; call it from a Plugin method. A
        memfd that only grows keeps its identity: keeping it once is enough.
        `fd` stays the caller's. ValueError for a bad name or a ninth name."""
        if not 1 <= len(name.encode()) <= 64:
            raise ValueError(f"a kept descriptor's name must be 1 to 64 bytes, not {name!r}")
        if name not in self._names and len(self._names) >= self.MAX_NAMES:
            raise ValueError(f"the broker keeps at most {self.MAX_NAMES} descriptors per plugin; {sorted(self._names)} are kept")
        self._names.add(name)
        self._outbox.append((name, os.dup(fd)))


@dataclass(frozen=True)
class Decision:
    """The answer to a fault; build it with `copy`, `zero`, `retry` or `poison`.

    `offset`/`length`: the region range it fills (None: the faulting page);
    `data`: a copy's bytes when given here instead of written into the buffer.
    """

    kind: int
    offset: Optional[int] = None
    length: Optional[int] = None
    data: Optional[bytes] = None


DECISION_LATER = 0  # never sent: the answer comes through Runner.answer
DECISION_COPY = 1
DECISION_ZERO = 2
DECISION_RETRY = 3
DECISION_POISON = 4


def copy(data: Optional[bytes] = None, offset: Optional[int] = None, length: Optional[int] = None) -> Decision:
    """Fill a range with bytes: those of `data`, or else the first `length`
    bytes of the buffer `pagefault` was handed. Without `offset`, the range
    starts at the faulting page; without `length`, it is `len(data)` or one
    page. A range of several pages prefetches the fault's neighbours: it must
    be page aligned, lie inside the region, contain the faulting page, and be
    at most `max_prefetch` bytes."""
    if data is not None and length is None:
        length = len(data)
    return Decision(DECISION_COPY, offset, length, data)


def zero(offset: Optional[int] = None, length: Optional[int] = None) -> Decision:
    """Fill a range (default: the faulting page) with zero pages."""
    return Decision(DECISION_ZERO, offset, length)


def retry() -> Decision:
    """Not ready: the broker delivers the fault again later."""
    return Decision(DECISION_RETRY)


def poison() -> Decision:
    """The content is lost: accesses to the faulting page get SIGBUS."""
    return Decision(DECISION_POISON)


_LATER = Decision(DECISION_LATER)


def later() -> Decision:
    """No answer yet: the plugin answers with `runner.answer(fault.fault_id,
    decision)`, from any thread, within the broker's deadline (5 s by
    default). The `buffer` that `pagefault` was handed stays the fault's
    until then: write a copy's bytes there (from any thread) before answering,
    and never after. Take the runner (`self.runner`) in `pagefault`: after a
    reconnect the plugin has a new runner, and only the old one knows the
    fault (it drops the answer; the new one might hold a fault of the same id)."""
    return _LATER


class Plugin:
    """A page-fault handler. `run` calls every method on the thread that called
    it, one at a time, in the order the broker sent the events; a packet's
    events come before its faults (a fault read after a remove sees it).

    Override `pagefault`; every other method has a default. An exception from
    `region_opened`, `region_forked` or `store` refuses that region or store
    (see `Refused`), never the loop; one from any other method ends `run`.

    `runner` is the `Runner` serving the plugin (set before `connected`):
    a `pagefault` that returns `later()` answers through `runner.answer`.
    """

    runner: Any = None

    def connected(self, store: DescriptorStore) -> None:
        """Once, before any event: `store` maps names to the descriptors the
        broker kept for this plugin name from earlier connections (the plugin
        owns them), and keeps more (`store.keep`). The default closes them."""
        for fd in store.values():
            os.close(fd)

    def region_opened(self, region: Region) -> None:
        """A client registered a region this plugin serves: return to accept,
        raise to refuse (the client's Register fails). No fault of it comes before."""

    def region_forked(self, child: Region, parent: Region) -> None:
        """A forked child's copy of `parent`: its faults must read what the
        parent's would have at the fork. The default refuses (they fail closed)."""
        raise Refused("this plugin does not serve forked children")

    def pagefault(self, fault: Fault, region: Region, buffer: memoryview) -> Decision:
        """Answer one fault. Write a copy's bytes at the start of `buffer`
        (writable, `max_prefetch` bytes, page aligned; shared with the broker
        when it can be, so the bytes never cross the socket) and return
        `copy()` or `copy(offset=, length=)`; or return `copy(data)`, `zero()`,
        `retry()` or `poison()`; or `later()` and answer through `self.runner.answer`."""
        raise NotImplementedError("a Plugin must answer pagefault")

    def removed(self, start: int, end: int, region: Region) -> None:
        """The client dropped region offsets [start, end) (MADV_DONTNEED/REMOVE):
        they read as zeros now, unless the plugin serves them again."""

    def swapped_out(self, start: int, end: int, region: Region) -> None:
        """A swap-out dropped region offsets [start, end); their content is what `store` received."""

    def store(self, data: bytes, offset: int, region: Region) -> None:
        """Keep `data` (a swap-out) at region offset `offset`; raise to refuse."""
        raise Refused("this plugin does not keep swapped-out pages")

    def holds(self, start: int, end: int, region: Region) -> bool:
        """Whether this plugin still holds the stored pages of [start, end)
        (asked when a region is opened with swapped-out pages); those it does not fail closed."""
        return False

    def unmapped(self, start: int, end: int, region: Region) -> None:
        """The client unmapped region offsets [start, end)."""

    def remapped(self, region: Region) -> None:
        """The client moved part of the region; `region.base` is updated already."""

    def region_closed(self, region: Region) -> None:
        """The region is gone (removed by the client, or the client exited)."""

    def closed(self, client_id: int, reason: str) -> None:
        """The client is gone; nothing more comes for it."""

    def statistics(self) -> list:
        """Counters of the plugin's own, (name, value) pairs written to the
        runner's stats file (`stats_path`) beside `faults`. Default: none."""
        return []

    def decision_refused(self, fault_id: int, cause: str, reason: str) -> None:
        """The broker refused a decision (fault_id) or a delegation (fault_id 0)
        of this plugin; a refused fault is delivered again. Default: a line on stderr."""
        what = "a delegation" if fault_id == 0 else f"the decision for fault {fault_id}"
        print(f"uffd-broker refused {what} ({cause}): {reason}", file=sys.stderr, flush=True)
