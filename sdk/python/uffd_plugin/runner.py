"""The plugin's side of the broker connection: Hello, then a loop that decodes
each packet of events, calls the Plugin, and answers."""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import struct
import sys
import threading
import time
from typing import NamedTuple, Optional

from google.protobuf.message import DecodeError

from . import broker_pb2 as pb
from .connection import MAX_PACKET, Connection
from .plugin import (
    DECISION_COPY,
    DECISION_LATER,
    DescriptorStore,
    DECISION_POISON,
    DECISION_RETRY,
    DECISION_ZERO,
    BrokerError,
    Decision,
    Fault,
    Plugin,
    Refused,
    Region,
)

PROTOCOL_VERSION = 2

# What one entry adds to a packet at most, beyond its bytes: a Decision
# message's fields, a Decisions entry in every array, a reply without its text.
_DECISION_OVERHEAD = 64
_ARRAYS_ENTRY = 48
_REPLY_OVERHEAD = 64
_OUTGOING_OVERHEAD = 80
# Descriptors one packet carries at most (the broker's limit).
_MAX_PACKET_DESCRIPTORS = 8


class _Answer:
    """The PluginToBroker packet being filled, with a bound on its encoded size."""

    def __init__(self) -> None:
        self.message = pb.PluginToBroker()
        self.size = 0
        self.entries = 0
        self.batch = ([], [], [], [], [])  # fault_id, kind, address, length, shared_offset
        self.delegation_fds: list = []
        self.keep_fds: list = []
        self.halves: set = set()  # the shared halves whose bytes its decisions name

    @property
    def descriptors(self) -> list:
        """The descriptors to attach, in the order the broker takes them: file delegations', then kept ones."""
        return self.delegation_fds + self.keep_fds

    def add_outgoing(self, item: tuple) -> None:
        """A delegation (pb.Delegation, fd or None) or a descriptor to keep (name, fd)."""
        what, fd = item
        if isinstance(what, pb.Delegation):
            self.message.delegations.append(what)
            if fd is not None:
                self.delegation_fds.append(fd)
        else:
            self.message.keep.names.append(what)
            self.keep_fds.append(fd)
        self.size += _OUTGOING_OVERHEAD + (0 if isinstance(what, pb.Delegation) else len(what.encode()))
        self.entries += 1

    def add_array(self, fault_id: int, kind: int, address: int, length: int, shared_offset: int = 0) -> None:
        for column, value in zip(self.batch, (fault_id, kind, address, length, shared_offset)):
            column.append(value)
        self.size += _ARRAYS_ENTRY
        self.entries += 1

    def add_inline(self, fault_id: int, address: int, data: bytes) -> None:
        self.message.decisions.add(fault_id=fault_id, kind=pb.DECISION_COPY, address=address, length=len(data), data=data)
        self.size += _DECISION_OVERHEAD + len(data)
        self.entries += 1

    def add_region_reply(self, client_id: int, region_id: int, error: Optional[pb.Error], lost: list) -> None:
        reply = self.message.region_replies.add(client_id=client_id, region_id=region_id)
        if error is not None:
            reply.error.CopyFrom(error)
        for offset, length in lost:
            reply.lost.add(offset=offset, length=length)
        self.size += _REPLY_OVERHEAD + (len(error.message) if error else 0) + 24 * len(lost)
        self.entries += 1

    def add_store_reply(self, store_id: int, error: Optional[pb.Error]) -> None:
        reply = self.message.store_replies.add(store_id=store_id)
        if error is not None:
            reply.error.CopyFrom(error)
        self.size += _REPLY_OVERHEAD + (len(error.message) if error else 0)
        self.entries += 1

    def encode(self) -> bytes:
        ids, kinds, addresses, lengths, offsets = self.batch
        if ids:
            batch = self.message.batch
            batch.fault_id.extend(ids)
            batch.kind.extend(kinds)
            batch.address.extend(addresses)
            batch.length.extend(lengths)
            batch.shared_offset.extend(offsets)
        return self.message.SerializeToString()


def _refusal(error: Exception) -> pb.Error:
    if isinstance(error, Refused):
        return pb.Error(code=error.code, message=error.message)
    return pb.Error(code=pb.ERROR_PLUGIN_REFUSED, message=f"{type(error).__name__}: {error}")


class _Wakeup:
    """Wakes the runner's loop from another thread: an eventfd (a pipe before Python 3.10)."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.read_fd = self.write_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:
            self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, (1).to_bytes(8, sys.byteorder))
        except BlockingIOError:
            pass  # a pipe full of wakeups: the loop wakes anyway

    def drain(self) -> None:
        try:
            os.read(self.read_fd, 4096)  # an eventfd: one read resets it
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        if self.write_fd != self.read_fd:
            os.close(self.write_fd)


class _Deferred(NamedTuple):
    """A fault answered `later()`: its buffer, and the shared half that buffer lies in (None: private)."""

    fault: Fault
    region: Region
    buffer: memoryview
    half: Optional[int]
    shared_offset: Optional[int]


class Runner:
    """Connects to the broker as plugin `name`, says Hello and calls
    `plugin.connected`; `serve()` then handles events until the broker closes.

    1. Every Plugin method is called on the thread that made the runner, in
       the order of the broker's events; a packet's events before its faults.
    2. Each packet of events is answered once all of it is handled, in as many
       packets as it takes (each at most 256 KiB); nothing is sent for a
       packet that needs no answer (an empty packet would read as EOF).
    3. Page bytes go, when possible, through a memfd shared with the broker
       (sent with Hello, sealed against resizing): a decision then names only
       where its bytes lie. The area's two halves alternate between packets,
       and a half is reused only once the broker's `packets_applied` says it
       applied the last packet that named bytes in it, and no deferred fault
       holds a buffer in it; until then bytes go inline.
    4. A fault whose `pagefault` returned `later()` is answered by `answer`,
       from any thread: the loop wakes, and sends the answers queued since it
       last looked together (split under the packet limit). Answers to faults
       of a region that closed meanwhile, to unknown or already answered
       faults, or to a runner whose connection ended (a plugin that connects
       again has a new runner, and new fault ids) are dropped.

    Raises `BrokerError` when the socket cannot be reached, is served by an
    untrusted uid, or the broker refuses the connection (its Error) or does
    not answer Hello within 10 s.

    `max_prefetch`: the largest range one decision fills (the `buffer` handed
    to `pagefault`), rounded down to pages, at most half a packet; a deferred
    fault holds that much of the shared area until answered. In a region of
    larger (huge) pages both are one page of the region (`buffer_size`), in
    the shared area only (a huge page fits no packet): while no half is free
    such a fault gets retry, and without a shared area such a region is refused. `broker_uid`: a
    uid besides root and this process's that may serve the socket (None:
    `UFFD_BROKER_UID`, if set). `stats_path`: a file kept holding `faults=N`
    and the plugin's `statistics()` as `name=value` lines, for monitoring.
    """

    SHARED_HALF = 4 << 20  # two 2 MiB huge pages

    def __init__(self, plugin: Plugin, name: str, socket_path: Optional[str] = None,
                 max_prefetch: int = 128 << 10, shared_memory: bool = True, broker_uid: Optional[int] = None,
                 stats_path: Optional[str] = None) -> None:
        self.plugin = plugin
        self.name = name
        self.stats_path = stats_path
        self._stats_written_at = 0.0
        self.page_size = mmap.PAGESIZE
        self.max_prefetch = max(max_prefetch // self.page_size, 1) * self.page_size
        if self.max_prefetch > MAX_PACKET // 2:
            raise ValueError("max_prefetch must fit half a packet")
        self.faults_served = 0
        plugin.runner = self
        self._pending: dict = {}  # fault_id -> _Deferred
        self._answers_lock = threading.Lock()
        self._answers: list = []  # (fault_id, decision) from answer(), for the loop; guarded by the lock
        self._ended = False  # guarded by the lock
        self._wakeup = _Wakeup()
        self._half_reserved = [0, 0]  # deferred faults holding a buffer in each shared half
        self._half_named_by = [0, 0]  # the last packet that named bytes in each half
        self._regions: dict = {}
        self._scratch = memoryview(bytearray(self.max_prefetch))
        self._answer = _Answer()
        self._outbox: list = []  # delegations and descriptors to keep, for the next packet
        self._connection = Connection.connect(socket_path, broker_uid)
        try:
            self._hello(shared_memory)
        except BaseException:
            self._close()
            raise

    def _hello(self, shared_memory: bool) -> None:
        """Says Hello (with the shared memfd), takes the broker's and the descriptors it kept, calls `connected`."""
        self._shared: Optional[memoryview] = None
        self._mapping: Optional[mmap.mmap] = None
        memfd = self._shared_memfd() if shared_memory else None
        try:
            hello = pb.PluginToBroker(hello=pb.Hello(version=PROTOCOL_VERSION, role=pb.ROLE_PLUGIN, name=self.name))
            self._connection.send(hello.SerializeToString(), (memfd,) if memfd is not None else ())
        except OSError as error:
            # A broker that refuses a connection sends why, then shuts it: the
            # send fails (EPIPE), but the Error is there to read.
            self._raise_refusal(error)
        finally:
            if memfd is not None:
                os.close(memfd)  # the mapping and the broker's copy keep the memory
        self._sent = 1  # the broker counts the Hello in packets_applied
        self._applied = 0
        self._choose_stage()
        received = self._connection.receive(timeout=10)
        if received is None:
            raise BrokerError("the broker closed the connection before answering Hello", 0)
        data, fds = received
        message = self._decode(data)
        restored = dict(zip(message.kept.names, fds))
        for fd in fds[len(restored):]:
            os.close(fd)
        if message.HasField("error"):
            for fd in restored.values():
                os.close(fd)
            raise self._refusal(message.error)
        if not message.HasField("hello") or message.hello.role != pb.ROLE_BROKER:
            raise BrokerError("the broker did not answer Hello", pb.ERROR_VERSION)
        self._connection.sock.settimeout(None)
        self.plugin.connected(DescriptorStore(restored, self._outbox))
        self._take_outbox()
        self._handle(message)
        self._flush()

    @staticmethod
    def _refusal(error) -> BrokerError:
        return BrokerError(f"the broker refused the connection: {error.message}", error.code)

    def _raise_refusal(self, failure: OSError) -> None:
        """Raises the broker's Error, if it sent one before shutting the connection, else the send's failure."""
        try:
            received = self._connection.receive(timeout=1)
        except (BrokerError, OSError):
            received = None
        if received is not None:
            for fd in received[1]:
                os.close(fd)
            try:
                message = pb.BrokerToPlugin.FromString(received[0])
            except DecodeError:
                message = pb.BrokerToPlugin()
            if message.HasField("error"):
                raise self._refusal(message.error) from failure
        raise BrokerError(f"cannot send Hello to the broker: {failure}", 0) from failure

    def _shared_memfd(self) -> Optional[int]:
        """A sealed memfd of two halves, mapped here; None if the kernel offers none."""
        size = 2 * self.SHARED_HALF
        try:
            fd = os.memfd_create("uffd-plugin-pages", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError):
            return None
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (AttributeError, OSError):
            os.close(fd)
            return None
        self._shared = memoryview(self._mapping)
        return fd

    def serve(self) -> None:
        """Handles packets until the broker closes the connection (returns).
        Raises `BrokerError` on a malformed packet or an Error from the broker
        (say it dropped this plugin for invalid decisions), and whatever a
        Plugin method other than region_opened, region_forked and store raises."""
        poller = select.poll()
        poller.register(self._connection.sock, select.POLLIN)
        poller.register(self._wakeup.read_fd, select.POLLIN)
        # With a stats file, wake up now and then to write it even when idle.
        timeout = None if self.stats_path is None else 200
        try:
            while True:
                ready = {fd for fd, _ in poller.poll(timeout)}
                if not ready:
                    self._write_statistics(force=True)
                    continue
                if self._wakeup.read_fd in ready:
                    self._take_answers()
                if ready - {self._wakeup.read_fd}:
                    received = self._connection.receive()
                    if received is None:
                        return
                    data, fds = received
                    for fd in fds:
                        os.close(fd)
                    message = self._decode(data)
                    if message.HasField("error"):
                        raise BrokerError(f"the broker ended the connection: {message.error.message}", message.error.code)
                    self._handle(message)
                self._flush()
                self._write_statistics(force=False)
        finally:
            self._write_statistics(force=True)
            self._close()

    def _close(self) -> None:
        """Ends the connection: answers from now on are dropped."""
        with self._answers_lock:
            self._ended = True
            self._answers.clear()
            self._wakeup.close()
        self._connection.close()

    def _write_statistics(self, force: bool) -> None:
        """Replaces the stats file (at most every 100 ms unless forced)."""
        if self.stats_path is None:
            return
        now = time.monotonic()
        if not force and now - self._stats_written_at < 0.1:
            return
        self._stats_written_at = now
        lines = [("faults", self.faults_served)] + list(self.plugin.statistics())
        try:
            with open(self.stats_path + ".tmp", "w") as file:
                file.write("".join(f"{name}={value}\n" for name, value in lines))
            os.replace(self.stats_path + ".tmp", self.stats_path)
        except OSError:
            pass  # monitoring only: never stop serving over it

    def answer(self, fault_id: int, decision: Decision) -> None:
        """Answers a fault whose `pagefault` returned `later()`; callable from
        any thread (an asyncio coroutine too: it never blocks). A copy's bytes
        are `decision.data`, else the first bytes of the buffer `pagefault` was
        handed. Each deferred fault must be answered once, even after its region
        closed (the answer is then dropped): until then its buffer stays
        reserved. Raises TypeError or ValueError for a malformed decision (a
        copy larger than its buffer ends `serve`)."""
        deferred = self._pending.get(fault_id)  # one dict read: safe from any thread
        self._check(decision, self.page_size, self.max_prefetch if deferred is None else len(deferred.buffer))
        if decision.kind == DECISION_LATER:
            raise ValueError("answer() takes a decision, not later()")
        with self._answers_lock:
            if self._ended:
                return
            self._answers.append((fault_id, decision))
            if len(self._answers) == 1:
                self._wakeup.wake()

    def _take_answers(self) -> None:
        """Adds the answers queued by `answer` to the packet being filled."""
        self._wakeup.drain()
        with self._answers_lock:
            answers, self._answers = self._answers, []
        for fault_id, decision in answers:
            deferred = self._pending.pop(fault_id, None)
            if deferred is None:
                continue  # not a deferred fault of this connection, or answered already
            if deferred.half is not None:
                self._half_reserved[deferred.half] -= 1
            fault, region = deferred.fault, deferred.region
            if self._regions.get((fault.client_id, fault.region_id)) is not region:
                continue  # the region closed: the broker forgot the fault
            self._check(decision, region.page_size or self.page_size, len(deferred.buffer))
            self._make_room(_ARRAYS_ENTRY if deferred.half is not None else _DECISION_OVERHEAD + self.max_prefetch)
            self._decide(fault, region, deferred.buffer, deferred.shared_offset, decision)
            if deferred.half is not None:
                self._answer.halves.add(deferred.half)

    def _decode(self, data: bytes) -> pb.BrokerToPlugin:
        try:
            message = pb.BrokerToPlugin.FromString(data)
        except DecodeError as error:
            raise BrokerError(f"a malformed packet from the broker: {error}", pb.ERROR_MALFORMED)
        if message.packets_applied > self._applied:
            self._applied = message.packets_applied
            if self._answer.entries == 0:
                self._choose_stage()  # the broker caught up: a shared half may be free again
        return message

    # MARK: answers

    def _flush(self) -> None:
        if self._answer.entries == 0:
            return
        packet = self._answer.encode()
        if len(packet) > MAX_PACKET:
            raise AssertionError(f"an answer of {len(packet)} bytes exceeds the packet limit")
        descriptors = self._answer.descriptors
        try:
            self._connection.send(packet, tuple(descriptors))
        finally:
            for fd in descriptors:
                os.close(fd)  # the broker has its own copies now
        self._sent += 1
        for half in self._answer.halves:
            self._half_named_by[half] = self._sent
        self._answer = _Answer()
        self._choose_stage()

    def _choose_stage(self) -> None:
        """Where the next packet's bytes go: a shared half whose bytes the
        broker has applied and no deferred fault holds (the other half than
        the last packet's, first), else inline."""
        upcoming = self._sent + 1
        self._stage_offset: Optional[int] = None
        if self._shared is not None:
            for half in (upcoming % 2, 1 - upcoming % 2):
                # Not one whose bytes the packet being filled names (a deferred fault's answer).
                if self._half_reserved[half] == 0 and self._applied >= self._half_named_by[half] and half not in self._answer.halves:
                    self._stage_offset = half * self.SHARED_HALF
                    self._stage_half = half
                    break
        self._staged = 0

    # MARK: events

    def _handle(self, message: pb.BrokerToPlugin) -> None:
        for event in message.events:
            kind = event.WhichOneof("kind")
            if kind == "region_opened":
                self._region_opened(event.region_opened)
            elif kind in ("removed", "unmapped"):
                change = getattr(event, kind)
                region = self._regions.get((change.client_id, change.region_id))
                if region is not None:
                    start, end = change.start_offset, change.start_offset + (change.end - change.start)
                    if kind == "unmapped":
                        self.plugin.unmapped(start, end, region)
                    elif change.swapped_out:
                        self.plugin.swapped_out(start, end, region)
                    else:
                        self.plugin.removed(start, end, region)
            elif kind == "remapped":
                region = self._regions.get((event.remapped.client_id, event.remapped.region_id))
                if region is not None:
                    region.base = event.remapped.new_base
                    self.plugin.remapped(region)
            elif kind == "region_closed":
                region = self._regions.pop((event.region_closed.client_id, event.region_closed.region_id), None)
                if region is not None:
                    self.plugin.region_closed(region)
            elif kind == "closed":
                # The broker closed the client's regions before (RegionClosed), if any are left.
                for key in [key for key in self._regions if key[0] == event.closed.client_id]:
                    del self._regions[key]
                self.plugin.closed(event.closed.client_id, event.closed.reason)
            elif kind == "store":
                self._store(event.store)
            elif kind == "decision_refused":
                refused = event.decision_refused
                self.plugin.decision_refused(refused.fault_id, refused.cause, refused.reason)
            if self._outbox:
                self._take_outbox()
        faults = message.faults
        count = len(faults.fault_id)
        columns = (faults.client_id, faults.region_id, faults.address, faults.offset, faults.flags, faults.thread_id)
        if any(len(column) != count for column in columns):
            raise BrokerError("a malformed packet from the broker: the fault arrays differ in length", pb.ERROR_MALFORMED)
        for index in range(count):
            self._pagefault(Fault(faults.fault_id[index], faults.client_id[index], faults.region_id[index],
                                  faults.address[index], faults.offset[index], faults.flags[index], faults.thread_id[index]))
            if self._outbox:
                self._take_outbox()  # after the decision: a flush moves the stage its bytes are in

    def _region_opened(self, opened: pb.RegionOpened) -> None:
        spec = opened.region
        has_client = opened.HasField("client")
        region = Region(
            client_id=opened.client_id, id=spec.id, base=spec.address, length=spec.length, page_size=spec.page_size,
            plugin=spec.plugin, argument=spec.argument, backing_offset=spec.backing_offset, pid=opened.pid,
            uid=opened.client.uid if has_client else None, gid=opened.client.gid if has_client else None,
            token=struct.pack(">QQ", opened.token_high, opened.token_low), parent_client_id=opened.parent_client_id,
            swapped_out=[(extent.offset, extent.length) for extent in spec.swapped_out],
            shared_memory=spec.backing == pb.BACKING_SHARED_MEMORY, _outbox=self._outbox)
        error = None
        try:
            if spec.page_size > self.max_prefetch and (self._shared is None or spec.page_size > self.SHARED_HALF):
                # A huge page's bytes fit no packet: they go through the shared area only.
                raise Refused(f"region {spec.id} has {spec.page_size}-byte pages, more than this plugin's buffers hold"
                              + ("" if self._shared is not None else " (it has no shared area)"))
            if opened.parent_client_id == 0:
                self.plugin.region_opened(region)
            else:
                parent = self._regions.get((opened.parent_client_id, spec.id))
                if parent is None:
                    raise Refused(f"the parent's region {spec.id} of client {opened.parent_client_id} is not open here")
                region.base = parent.base
                self.plugin.region_forked(region, parent)
            self._regions[(opened.client_id, spec.id)] = region
        except Exception as refusal:
            error = _refusal(refusal)
            self._drop_delegations(region)
        self._take_outbox()  # its delegations go first: the region's first faults find them
        # A forked child's stored pages are its parent's (region_forked copied them).
        lost = [] if error is not None or opened.parent_client_id != 0 else [
            (offset, length) for offset, length in region.swapped_out if not self.plugin.holds(offset, offset + length, region)]
        self._make_room(_REPLY_OVERHEAD + (len(error.message) if error else 0) + 24 * len(lost))
        self._answer.add_region_reply(opened.client_id, spec.id, error, lost)

    def _store(self, store: pb.Store) -> None:
        region = self._regions.get((store.client_id, store.region_id))
        error = None
        try:
            if region is None:
                raise Refused(f"region {store.region_id} of client {store.client_id} is not open here", pb.ERROR_BAD_REGION)
            self.plugin.store(bytes(store.data), store.offset, region)
        except Exception as refusal:
            error = _refusal(refusal)
        self._make_room(_REPLY_OVERHEAD + (len(error.message) if error else 0))
        self._answer.add_store_reply(store.store_id, error)

    def _take_outbox(self) -> None:
        """Moves what Plugin methods queued (delegations, descriptors to keep) into the answer."""
        for item in self._outbox:
            if item[1] is not None and len(self._answer.descriptors) >= _MAX_PACKET_DESCRIPTORS:
                self._flush()
            self._make_room(_OUTGOING_OVERHEAD + 64)
            self._answer.add_outgoing(item)
        self._outbox.clear()

    def _drop_delegations(self, region: Region) -> None:
        """Forgets the delegations a refused region queued: the broker would refuse them."""
        kept = []
        for what, fd in self._outbox:
            if isinstance(what, pb.Delegation) and (what.client_id, what.region_id) == (region.client_id, region.id):
                if fd is not None:
                    os.close(fd)
            else:
                kept.append((what, fd))
        self._outbox[:] = kept

    def _make_room(self, size: int) -> None:
        if self._answer.size + size > MAX_PACKET - 1024:
            self._flush()

    # MARK: faults

    def buffer_size(self, region: Region) -> int:
        """The bytes of a fault's buffer in `region`, the most one decision fills:
        `max_prefetch`, or one page of a region of larger (huge) pages."""
        return max(self.max_prefetch, region.page_size or self.page_size)

    def _pagefault(self, fault: Fault) -> None:
        region = self._regions.get((fault.client_id, fault.region_id))
        room = self.max_prefetch if region is None else self.buffer_size(region)
        huge = room > self.max_prefetch  # its bytes fit no packet: a shared half or nothing
        # Room for the largest answer: its bytes in the stage (shared) or in the packet (inline).
        if huge and self._stage_offset is None:
            self._choose_stage()  # the broker may have freed a half since; this packet names none
        elif self._stage_offset is not None and self.SHARED_HALF - self._staged < room:
            self._flush()
            if self._staged:
                self._choose_stage()  # nothing was sent: deferred faults' buffers filled the half
        self._make_room(_ARRAYS_ENTRY if self._stage_offset is not None else _DECISION_OVERHEAD + self.max_prefetch)
        if region is None or (huge and (self._stage_offset is None or self.SHARED_HALF - self._staged < room)):
            # No region, or a huge page while no shared half is free: asked again later.
            self._answer.add_array(fault.fault_id, DECISION_RETRY, fault.address, 0)
            return
        shared_offset = None
        if self._stage_offset is not None:
            shared_offset = self._stage_offset + self._staged
            buffer = self._shared[shared_offset:shared_offset + room]
        else:
            buffer = self._scratch
        self.faults_served += 1
        decision = self.plugin.pagefault(fault, region, buffer)
        self._check(decision, region.page_size or self.page_size, room)
        if decision.kind == DECISION_LATER:
            # The buffer stays the fault's until it is answered.
            if shared_offset is not None:
                self._half_reserved[self._stage_half] += 1
                self._staged += room
                self._pending[fault.fault_id] = _Deferred(fault, region, buffer, self._stage_half, shared_offset)
            else:
                self._scratch = memoryview(bytearray(self.max_prefetch))
                self._pending[fault.fault_id] = _Deferred(fault, region, buffer, None, None)
            return
        self._staged += self._decide(fault, region, buffer, shared_offset, decision)
        if shared_offset is not None:
            self._answer.halves.add(self._stage_half)

    def _check(self, decision: Decision, page: int, capacity: int) -> None:
        """Raises for a decision that is not one, or a copy its buffer (`capacity` bytes) cannot hold."""
        if not isinstance(decision, Decision):
            raise TypeError(f"{decision!r} is not a Decision (copy(), zero(), retry(), poison(), later())")
        if decision.kind == DECISION_COPY:
            length = page if decision.length is None else decision.length
            if not 0 < length <= capacity:
                raise ValueError(f"a copy of {length} bytes: at most its buffer's {capacity} bytes")
            if decision.data is not None and len(decision.data) != length:
                raise ValueError(f"a copy of {length} bytes given {len(decision.data)} bytes")
        elif decision.kind not in (DECISION_LATER, DECISION_ZERO, DECISION_RETRY, DECISION_POISON):
            raise ValueError(f"a decision of unknown kind {decision.kind}")

    def _decide(self, fault: Fault, region: Region, buffer: memoryview, shared_offset: Optional[int], decision: Decision) -> int:
        """Adds `decision` (checked) to the answer; a copy's bytes go at
        `shared_offset` of the shared area (where `buffer` lies), else inline.
        Returns the bytes it used there."""
        page = region.page_size or self.page_size
        offset = fault.offset if decision.offset is None else decision.offset
        address = fault.address - fault.offset + offset
        if decision.kind == DECISION_COPY:
            length = page if decision.length is None else decision.length
            if shared_offset is not None:
                if decision.data is not None:
                    buffer[:length] = decision.data
                self._answer.add_array(fault.fault_id, DECISION_COPY, address, length, shared_offset)
                return -(-length // page) * page
            data = bytes(decision.data) if decision.data is not None else bytes(buffer[:length])
            self._answer.add_inline(fault.fault_id, address, data)
        elif decision.kind == DECISION_ZERO:
            self._answer.add_array(fault.fault_id, DECISION_ZERO, address, page if decision.length is None else decision.length)
        elif decision.kind == DECISION_RETRY:
            self._answer.add_array(fault.fault_id, DECISION_RETRY, fault.address, 0)
        else:
            self._answer.add_array(fault.fault_id, DECISION_POISON, fault.address, page)
        return 0


def run(plugin: Plugin, name: str, socket_path: Optional[str] = None, max_prefetch: int = 128 << 10,
        shared_memory: bool = True, broker_uid: Optional[int] = None, stats_path: Optional[str] = None) -> None:
    """Connects as plugin `name` and serves until the broker closes the
    connection: the one-call form of a plugin's main. `socket_path` None: the
    connection a broker that spawned this process handed it
    (`UFFD_BROKER_PLUGIN_FD`), else `UFFD_BROKER_PLUGIN_SOCKET`, else the default path."""
    Runner(plugin, name, socket_path, max_prefetch, shared_memory, broker_uid, stats_path).serve()
