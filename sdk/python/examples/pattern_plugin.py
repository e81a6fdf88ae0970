#!/usr/bin/env python3
"""Serves every region with the broker fixture's pattern: the 8-byte word at
backing offset b is (b + 1) * 0x9E3779B97F4A7C15 mod 2^64, in native byte order (as the fixture client reads it).

    python3 pattern_plugin.py [NAME] [--inline | --delegate-file | --later] [--socket PATH]

--inline sends page bytes in the packets instead of the shared memfd;
--delegate-file writes each region's pattern into a memfd and delegates the
whole region to the broker (a fault that still reaches the plugin is poisoned);
--later answers every fault later, from a pool of 4 threads (in whatever order they finish).
"""

import argparse
import mmap
import os
import sys
from array import array
from concurrent.futures import ThreadPoolExecutor

import uffd_plugin

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


class Pattern(uffd_plugin.Plugin):
    def __init__(self, delegate_file=False, pool=None):
        self.delegate_file = delegate_file
        self.pool = pool
        self.steps = {}  # page size -> the words' increments from a page's first word

    def page(self, region, offset):
        page = region.page_size
        steps = self.steps.get(page)
        if steps is None:
            steps = self.steps[page] = [index * 8 * GOLDEN & MASK for index in range(page // 8)]
        first = (region.backing_offset + offset + 1) * GOLDEN & MASK
        return array("Q", [(first + step) & MASK for step in steps]).tobytes()

    def region_opened(self, region):
        if self.delegate_file:
            fd = os.memfd_create(f"pattern-{region.id}", os.MFD_CLOEXEC)
            try:
                for offset in range(0, region.length, region.page_size):
                    os.write(fd, self.page(region, offset))
                region.delegate_file(fd)
            finally:
                os.close(fd)  # the delegation holds a duplicate

    def pagefault(self, fault, region, buffer):
        if self.delegate_file:
            return uffd_plugin.poison()  # the broker serves these pages: a fault here is a bug
        if self.pool is not None:
            self.pool.submit(self.answer_later, self.runner, fault, region, buffer)
            return uffd_plugin.later()
        buffer[:region.page_size] = self.page(region, fault.offset)
        return uffd_plugin.copy()

    def answer_later(self, runner, fault, region, buffer):
        """On a pool thread: the buffer stays the fault's until it is answered (through the runner that sent it)."""
        buffer[:region.page_size] = self.page(region, fault.offset)
        runner.answer(fault.fault_id, uffd_plugin.copy())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="pattern")
    parser.add_argument("--inline", action="store_true", help="page bytes in the packets, not shared memory")
    parser.add_argument("--delegate-file", action="store_true", help="delegate each region to the broker, from a memfd")
    parser.add_argument("--later", action="store_true", help="answer every fault later, from a pool of threads")
    parser.add_argument("--socket", help="the broker's plugin socket (default: UFFD_BROKER_PLUGIN_SOCKET)")
    arguments = parser.parse_args()
    try:
        pool = ThreadPoolExecutor(4) if arguments.later else None
        # A deferred fault holds its buffer (max_prefetch bytes of the shared area) until answered: one page each.
        uffd_plugin.run(Pattern(arguments.delegate_file, pool), arguments.name, socket_path=arguments.socket,
                        shared_memory=not arguments.inline, max_prefetch=mmap.PAGESIZE if arguments.later else 128 << 10)
    except uffd_plugin.BrokerError as error:
        print(f"pattern_plugin: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
