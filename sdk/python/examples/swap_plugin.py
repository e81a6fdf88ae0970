#!/usr/bin/env python3
"""Userspace swap: keeps the pages a client swaps out and serves them back on
its next touch; pages never stored (or dropped by the client) read as zeros.

    python3 swap_plugin.py [NAME] [--stats PATH] [--socket PATH]

The pages live in this process only: after a restart `holds` says no, and
the client's swapped-out pages fail closed (SIGBUS) instead of reading zeros.
"""

import argparse
import sys

import uffd_plugin


class Swap(uffd_plugin.Plugin):
    def __init__(self):
        self.pages = {}  # (client token, region id, offset) -> a page's bytes
        self.pages_stored = 0
        self.pages_restored = 0

    def store(self, data, offset, region):
        page = region.page_size
        for start in range(0, len(data), page):
            self.pages[(region.token, region.id, offset + start)] = data[start:start + page]
            self.pages_stored += 1

    def pagefault(self, fault, region, buffer):
        stored = self.pages.get((region.token, region.id, fault.offset))
        if stored is not None:
            self.pages_restored += 1
            return uffd_plugin.copy(stored)
        if fault.is_write:  # a copied zero page spares the write a second, copy-on-write fault
            return uffd_plugin.copy(bytes(region.page_size))
        return uffd_plugin.zero()

    def statistics(self):
        return [("pages_held", len(self.pages)), ("pages_stored", self.pages_stored), ("pages_restored", self.pages_restored)]

    def holds(self, start, end, region):
        return all((region.token, region.id, offset) in self.pages for offset in range(start, end, region.page_size))

    def region_forked(self, child, parent):
        # The child's pages read what the parent's held at the fork.
        for (token, region_id, offset), data in list(self.pages.items()):
            if token == parent.token and region_id == parent.id:
                self.pages[(child.token, region_id, offset)] = data

    # Pages the client dropped itself read as zeros from now on: forget their copies.
    def removed(self, start, end, region):
        self._forget(region, start, end)

    def unmapped(self, start, end, region):
        self._forget(region, start, end)

    def region_closed(self, region):
        self._forget(region, 0, region.length)

    def _forget(self, region, start, end):
        for offset in range(start, end, region.page_size):
            self.pages.pop((region.token, region.id, offset), None)


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
