#!/usr/bin/env python3
"""Userspace swap: keeps the pages a client swaps out and serves them back on
its next touch; pages never stored (or dropped by the client) read as zeros.

    python3 swap_plugin.py [NAME] [--stats PATH] [--socket PATH]

The pages live in a memfd the broker keeps for the plugin (its descriptor
store), as a log of records: a crash or kill -9 of the plugin loses none of
them, and its next start finds them all again. (The log only grows: a real
plugin would compact it.)
"""

import argparse
import os
import struct
import sys

import uffd_plugin

# A record: the client's token, the region id, the region offset, the length of
# the page bytes that follow (0: the page was forgotten).
RECORD = struct.Struct("=16sQQI")


class Swap(uffd_plugin.Plugin):
    def __init__(self):
        self.log = None  # the memfd
        self.end = 0  # where the next record goes
        self.index = {}  # (client token, region id, offset) -> (where its bytes are in the log, their length)
        self.pages_stored = 0
        self.pages_restored = 0

    def connected(self, store):
        self.log = store.pop("pages", None)
        for fd in store.values():
            os.close(fd)
        if self.log is None:
            self.log = os.memfd_create("swap-pages", os.MFD_CLOEXEC)
            store.keep(self.log, "pages")  # it only grows: kept once is enough
        else:
            self.recover()
            print(f"swap_plugin: recovered {len(self.index)} stored pages", file=sys.stderr, flush=True)

    def recover(self):
        """Replays the log; a record cut short (the plugin died writing it) was never acknowledged."""
        size = os.fstat(self.log).st_size
        while self.end + RECORD.size <= size:
            token, region_id, offset, length = RECORD.unpack(os.pread(self.log, RECORD.size, self.end))
            if self.end + RECORD.size + length > size:
                break
            if length:
                self.index[(token, region_id, offset)] = (self.end + RECORD.size, length)
            else:
                self.index.pop((token, region_id, offset), None)
            self.end += RECORD.size + length

    def append(self, key, data=b""):
        os.pwrite(self.log, RECORD.pack(*key, len(data)) + data, self.end)
        if data:
            self.index[key] = (self.end + RECORD.size, len(data))
        else:
            self.index.pop(key, None)
        self.end += RECORD.size + len(data)

    def store(self, data, offset, region):
        page = region.page_size
        for start in range(0, len(data), page):
            self.append((region.token, region.id, offset + start), data[start:start + page])
            self.pages_stored += 1

    def pagefault(self, fault, region, buffer):
        stored = self.index.get((region.token, region.id, fault.offset))
        if stored is not None:
            self.pages_restored += 1
            return uffd_plugin.copy(os.pread(self.log, stored[1], stored[0]))
        if fault.is_write:  # a copied zero page spares the write a second, copy-on-write fault
            return uffd_plugin.copy(bytes(region.page_size))
        return uffd_plugin.zero()

    def holds(self, start, end, region):
        return all((region.token, region.id, offset) in self.index for offset in range(start, end, region.page_size))

    def region_forked(self, child, parent):
        # The child's pages read what the parent's held at the fork.
        for (token, region_id, offset), (where, length) in list(self.index.items()):
            if token == parent.token and region_id == parent.id:
                self.append((child.token, region_id, offset), os.pread(self.log, length, where))

    def statistics(self):
        return [("pages_held", len(self.index)), ("pages_stored", self.pages_stored), ("pages_restored", self.pages_restored)]

    # Pages the client dropped itself read as zeros from now on: forget their copies.
    def removed(self, start, end, region):
        self.forget(region, start, end)

    def unmapped(self, start, end, region):
        self.forget(region, start, end)

    def region_closed(self, region):
        self.forget(region, 0, region.length)

    def forget(self, region, start, end):
        for offset in range(start, end, region.page_size):
            if (region.token, region.id, offset) in self.index:
                self.append((region.token, region.id, offset))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="swap")
    parser.add_argument("--stats", help="a file to keep the plugin's counters in")
    parser.add_argument("--socket", help="the broker's plugin socket (default: UFFD_BROKER_PLUGIN_SOCKET)")
    arguments = parser.parse_args()
    try:
        uffd_plugin.run(Swap(), arguments.name, socket_path=arguments.socket, stats_path=arguments.stats)
    except uffd_plugin.BrokerError as error:
        print(f"swap_plugin: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
