"""Regions of 2 MiB huge pages against the scripted broker: a fault's buffer is
one whole huge page, in the shared area only; without one, such a region is refused."""

import queue
import unittest

import uffd_plugin
from fake_broker import BASE, FakeBroker
from uffd_plugin import broker_pb2 as pb

HUGE = 2 << 20


def huge_page(page):
    return bytes([page % 251 + 1]) * HUGE


class Huge(uffd_plugin.Plugin):
    """Fills one whole page of the region (as the README's examples do); defers the pages `deferred` names."""

    def __init__(self, deferred=()):
        self.deferred = set(deferred)
        self.buffers = []
        self.later = queue.Queue()

    def pagefault(self, fault, region, buffer):
        self.buffers.append(len(buffer))
        page = fault.offset // region.page_size
        buffer[:region.page_size] = huge_page(page)
        if page in self.deferred:
            self.later.put(fault)
            return uffd_plugin.later()
        return uffd_plugin.copy()


def open_huge(broker, region_id, pages):
    region = pb.Region(id=region_id, address=BASE, length=pages * HUGE, page_size=HUGE, plugin="numbered")
    broker.events(pb.Event(region_opened=pb.RegionOpened(client_id=1, pid=1, region=region, token_low=1)))
    return broker.receive().region_replies[0]


def huge_faults(broker, region_id, pages, applied):
    faults = pb.Faults(fault_id=[(page + 1) << 32 for page in pages], client_id=[1] * len(pages), region_id=[region_id] * len(pages),
                       address=[BASE + page * HUGE for page in pages], offset=[page * HUGE for page in pages],
                       flags=[0] * len(pages), thread_id=[0] * len(pages))
    broker.send(pb.BrokerToPlugin(faults=faults, packets_applied=applied))


class HugePageTests(unittest.TestCase):
    def answers(self, broker, count):
        """{fault_id: a copy's bytes (from the shared area: it never goes inline), or another decision's kind}."""
        found = {}
        while len(found) < count:
            answer = broker.receive()
            self.assertEqual(len(answer.decisions), 0, "a huge page inline")
            for index, fault_id in enumerate(answer.batch.fault_id):
                if answer.batch.kind[index] != pb.DECISION_COPY:
                    found[fault_id] = answer.batch.kind[index]
                    continue
                self.assertEqual((answer.batch.address[index], answer.batch.length[index]), (BASE + ((fault_id >> 32) - 1) * HUGE, HUGE))
                offset = answer.batch.shared_offset[index]
                found[fault_id] = broker.memory[offset:offset + HUGE]
        return found

    def test_each_fault_gets_a_whole_huge_page_of_the_shared_area(self):
        plugin = Huge()
        broker = FakeBroker(self, plugin)
        self.assertFalse(open_huge(broker, 5, 6).HasField("error"))
        # Two halves of two huge pages each, and the broker applies nothing past Hello
        # meanwhile: the last two faults find no free half (nor a packet to go in) and are retried.
        huge_faults(broker, 5, range(6), applied=1)
        first = self.answers(broker, 6)
        served = {fault_id: data for fault_id, data in first.items() if data != pb.DECISION_RETRY}
        self.assertEqual(sorted((fault_id >> 32) - 1 for fault_id in served), [0, 1, 2, 3])
        for fault_id, data in served.items():
            self.assertEqual(data, huge_page((fault_id >> 32) - 1))
        # The broker caught up: the retried ones are served.
        retried = [(fault_id >> 32) - 1 for fault_id in first if fault_id not in served]
        huge_faults(broker, 5, retried, applied=10)
        for fault_id, data in self.answers(broker, len(retried)).items():
            self.assertEqual(data, huge_page((fault_id >> 32) - 1))
        self.assertEqual(set(plugin.buffers), {HUGE})
        broker.finish()

    def test_a_deferred_huge_page_keeps_its_buffer_until_answered(self):
        plugin = Huge(deferred={0})
        broker = FakeBroker(self, plugin)
        open_huge(broker, 5, 3)
        huge_faults(broker, 5, [0, 1], applied=2)
        self.assertEqual(set(self.answers(broker, 1)), {2 << 32})
        fault = plugin.later.get(timeout=10)
        plugin.runner.answer(fault.fault_id, uffd_plugin.copy(offset=0, length=HUGE))
        self.assertEqual(self.answers(broker, 1), {1 << 32: huge_page(0)})
        broker.finish()

    def test_without_a_shared_area_a_huge_page_region_is_refused(self):
        broker = FakeBroker(self, Huge(), shared_memory=False)
        reply = open_huge(broker, 5, 2)
        self.assertEqual(reply.error.code, pb.ERROR_PLUGIN_REFUSED)
        self.assertEqual(reply.error.message, "region 5 has 2097152-byte pages, more than this plugin's buffers hold (it has no shared area)")
        broker.finish()


if __name__ == "__main__":
    unittest.main()
