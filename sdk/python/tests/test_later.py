"""Decisions that come later: faults answered from another thread, in any
order, against the scripted broker."""

import queue
import threading
import unittest

import uffd_plugin
from fake_broker import PAGE, FakeBroker
from uffd_plugin import broker_pb2 as pb


def page_bytes(page):
    return bytes([page % 251]) * PAGE


class Deferring(uffd_plugin.Plugin):
    """Writes each page's bytes into its buffer at once; answers the pages
    `deferred(page)` says later (queued for the test), the others now."""

    def __init__(self, deferred):
        self.deferred = deferred
        self.queue = queue.Queue()

    def pagefault(self, fault, region, buffer):
        page = fault.offset // PAGE
        buffer[:PAGE] = page_bytes(page)
        if not self.deferred(page):
            return uffd_plugin.copy()
        self.queue.put((fault, buffer))
        return uffd_plugin.later()

    def take(self, count):
        return [self.queue.get(timeout=10) for _ in range(count)]


def answer_from_a_thread(runner, answers):
    """Calls runner.answer for each (fault_id, decision) on a thread of its own."""
    thread = threading.Thread(target=lambda: [runner.answer(fault_id, decision) for fault_id, decision in answers])
    thread.start()
    thread.join(10)


class LaterTests(unittest.TestCase):
    def check(self, pages, numbers):
        self.assertEqual(sorted(pages), sorted((page + 1) << 32 for page in numbers))
        for fault_id, data in pages.items():
            self.assertEqual(data, page_bytes((fault_id >> 32) - 1), f"page {(fault_id >> 32) - 1}")

    def test_a_deferred_fault_keeps_its_shared_buffer_until_answered(self):
        # 4 faults answered now, 4 deferred (each holding a buffer of max_prefetch bytes).
        plugin = Deferring(lambda page: page < 8 and page % 2 == 0)
        broker = FakeBroker(self, plugin)
        broker.open_region(5, 600)
        broker.faults(5, 8, applied=2)
        self.check(broker.answers(4)[0], range(1, 8, 2))
        deferred = plugin.take(4)
        # More faults than a half holds, the broker applying everything: the other
        # half serves some, and the half of the deferred buffers is never reused (inline instead).
        broker.faults(5, 592, applied=3, first=8)
        pages, packets = broker.answers(592)
        self.check(pages, range(8, 600))
        self.assertGreater(sum(len(packet.batch.fault_id) for packet in packets), 0, "no shared-memory answers")
        # Answered from another thread, in reverse order, with the bytes written before.
        answer_from_a_thread(plugin.runner, [(fault.fault_id, uffd_plugin.copy()) for fault, _ in reversed(deferred)])
        pages, packets = broker.answers(4)
        self.check(pages, range(0, 8, 2))
        self.assertEqual([fault_id for packet in packets for fault_id in packet.batch.fault_id],
                         [fault.fault_id for fault, _ in reversed(deferred)])
        broker.finish()

    def test_answers_inline_split_under_the_packet_limit(self):
        plugin = Deferring(lambda page: True)
        broker = FakeBroker(self, plugin, shared_memory=False)
        broker.open_region(5, 150)
        broker.faults(5, 150, applied=2)
        deferred = plugin.take(150)
        answers = [(fault.fault_id, uffd_plugin.copy()) for fault, _ in reversed(deferred[1:])]
        answers.append((deferred[0][0].fault_id, uffd_plugin.copy(page_bytes(0))))  # bytes given with the answer
        answer_from_a_thread(plugin.runner, answers)
        pages, packets = broker.answers(150)
        self.check(pages, range(150))
        self.assertGreater(len(packets), 1)
        broker.finish()

    def test_late_answers_for_a_closed_region_or_unknown_faults_are_dropped(self):
        plugin = Deferring(lambda page: page < 2)
        broker = FakeBroker(self, plugin)
        broker.open_region(5, 8)
        broker.open_region(6, 8)
        broker.faults(5, 2, applied=2)
        deferred = plugin.take(2)
        broker.events(pb.Event(region_closed=pb.RegionClosed(client_id=1, region_id=5)))
        broker.faults(6, 1, applied=3, first=4)  # answered once the close is handled
        self.check(broker.answers(1)[0], [4])
        answers = [(fault.fault_id, uffd_plugin.zero()) for fault, _ in deferred]
        answer_from_a_thread(plugin.runner, answers + [(99 << 32, uffd_plugin.zero())])
        broker.faults(6, 1, applied=4, first=5)
        answer = broker.receive()
        self.assertEqual(list(answer.batch.fault_id), [6 << 32])
        with self.assertRaises(ValueError):
            plugin.runner.answer(1, uffd_plugin.later())
        with self.assertRaises(TypeError):
            plugin.runner.answer(1, "copy")
        runner = plugin.runner
        broker.finish()
        runner.answer(deferred[0][0].fault_id, uffd_plugin.zero())  # after the connection ended: dropped


if __name__ == "__main__":
    unittest.main()
