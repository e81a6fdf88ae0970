#!/usr/bin/env python3
"""The conformance suite's plugin on the Python SDK: what it answers comes from
each region's argument; the table is in ../README.md.

    python3 conformance_plugin.py NAME      (PYTHONPATH=sdk/python)
"""

import os
import signal
import struct
import sys
from array import array

import uffd_plugin

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
FIRST_TIME_DIFFERS = ("retry-once", "invalid", "oversized")
# The stored pages, also in a memfd the broker keeps for this plugin's name (the
# descriptor store), so a restart after kill -9 finds them: an append-only log of
# records, this header (the client's token, the region id, the region offset,
# the page's length) then the page; a later record of the same page replaces an earlier one.
RECORD = struct.Struct("=16sQQQ")


def behaviour(argument):
    """(name, parameter) for a region's argument, or None if unknown."""
    if argument in ("", "pattern", "zero", "retry-once", "poison", "invalid", "oversized"):
        return (argument or "pattern", 0)
    name, _, value = argument.partition("=")
    if name in ("prefetch", "die") and value.isdigit() and (name == "die" or int(value) > 0):
        return (name, int(value))
    return None


class State:
    """Per region: its behaviour and what the client did to its pages."""

    def __init__(self, kind, parameter):
        self.kind = kind
        self.parameter = parameter
        self.removed = set()   # page offsets dropped (MADV_DONTNEED): read zeros
        self.stored = {}       # page offset -> the bytes a swap-out stored
        self.answered = set()  # page offsets answered once


class Conformance(uffd_plugin.Plugin):
    def __init__(self):
        self.faults = 0
        self.steps = {}  # page size -> the words' increments from a page's first word
        self.log = None  # the page log's memfd
        self.end = 0  # where its next record goes
        self.restored = {}  # (client token, region id) -> {page offset: bytes}, from earlier incarnations

    def connected(self, store):
        self.log = store.pop("pages", None)
        for fd in store.values():
            os.close(fd)
        if self.log is None:
            self.log = os.memfd_create("conformance-pages", os.MFD_CLOEXEC)
            store.keep(self.log, "pages")  # it only grows: kept once is enough
            return
        size = os.fstat(self.log).st_size
        while self.end + RECORD.size <= size:
            token, region_id, offset, length = RECORD.unpack(os.pread(self.log, RECORD.size, self.end))
            self.restored.setdefault((token, region_id), {})[offset] = os.pread(self.log, length, self.end + RECORD.size)
            self.end += RECORD.size + length

    def region_opened(self, region):
        parsed = behaviour(region.argument)
        if parsed is None:
            raise uffd_plugin.Refused(f"unknown conformance behaviour {region.argument!r}")
        region.context = State(*parsed)
        region.context.stored = dict(self.restored.get((region.token, region.id), {}))

    def holds(self, start, end, region):
        """Whether every page of [start, end) is stored (asked for pages a swap-out released before a restart)."""
        return all(offset in region.context.stored for offset in range(start, end, region.page_size))

    def pagefault(self, fault, region, buffer):
        state = region.context
        page = region.page_size
        self.faults += 1
        if fault.offset in state.stored:  # a page a swap-out stored comes back as it was stored, whatever the behaviour
            self.fill(buffer, fault.offset, 1, state, region)
            return uffd_plugin.copy()
        first_time = False
        if state.kind in FIRST_TIME_DIFFERS:
            first_time = fault.offset not in state.answered
            state.answered.add(fault.offset)
        if state.kind == "zero":
            return uffd_plugin.zero()
        if state.kind == "poison":
            return uffd_plugin.poison()
        if state.kind == "retry-once" and first_time:
            return uffd_plugin.retry()
        if state.kind == "invalid" and first_time:
            self.fill(buffer, fault.offset, 1, state, region)
            return uffd_plugin.copy(offset=fault.offset + 8, length=page)
        if state.kind == "oversized" and first_time:
            return uffd_plugin.zero(offset=0, length=region.length + page)
        if state.kind == "die" and self.faults > state.parameter:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-fault: this one and the rest of its packet stay unanswered
        if state.kind == "prefetch":
            block = min(state.parameter * page, len(buffer) // page * page)
            start = fault.offset // block * block
            length = min(block, region.length - start)
            self.fill(buffer, start, length // page, state, region)
            return uffd_plugin.copy(offset=start, length=length)
        self.fill(buffer, fault.offset, 1, state, region)
        return uffd_plugin.copy()

    def fill(self, buffer, offset, pages, state, region):
        """Writes `pages` pages from region offset `offset`: stored bytes, else
        zeros for dropped pages, else the pattern."""
        size = region.page_size
        steps = self.steps.get(size)
        if steps is None:
            steps = self.steps[size] = [index * 8 * GOLDEN & MASK for index in range(size // 8)]
        for index in range(pages):
            page = offset + index * size
            if page in state.stored:
                content = state.stored[page]
            elif page in state.removed:
                content = bytes(size)
            else:
                first = (region.backing_offset + page + 1) * GOLDEN & MASK
                content = array("Q", [(first + step) & MASK for step in steps]).tobytes()
            buffer[index * size:(index + 1) * size] = content

    def removed(self, start, end, region):
        state = region.context
        for page in range(start, end, region.page_size):
            state.removed.add(page)
            state.stored.pop(page, None)

    def store(self, data, offset, region):
        size = region.page_size
        for index in range(len(data) // size):
            page = bytes(data[index * size:(index + 1) * size])
            region.context.stored[offset + index * size] = page
            os.pwrite(self.log, RECORD.pack(region.token, region.id, offset + index * size, size) + page, self.end)
            self.end += RECORD.size + size

    def decision_refused(self, fault_id, cause, reason):
        print(f"refused {cause}", file=sys.stderr, flush=True)


def main():
    if len(sys.argv) != 2:
        print("usage: conformance_plugin.py NAME", file=sys.stderr)
        sys.exit(2)
    try:
        uffd_plugin.run(Conformance(), sys.argv[1])
    except uffd_plugin.BrokerError as error:
        print(f"conformance_plugin: {error} (code {error.code})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
