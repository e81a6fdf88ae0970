"""The Runner against a scripted broker on a socket pair: what it sends, packet by packet.

Run with `python3 -m unittest discover sdk/python/tests` (PYTHONPATH=sdk/python).
"""

import array
import mmap
import os
import socket
import threading
import unittest

import uffd_plugin
from uffd_plugin import broker_pb2 as pb

PAGE = mmap.PAGESIZE
BASE = 0x7F0000000000


class Numbered(uffd_plugin.Plugin):
    """Each page's bytes are its offset's page number, repeated."""

    def __init__(self):
        self.opened = []

    def region_opened(self, region):
        if region.argument == "refuse":
            raise uffd_plugin.Refused("refused on purpose")
        self.opened.append(region.id)

    def pagefault(self, fault, region, buffer):
        buffer[:PAGE] = bytes([fault.offset // PAGE % 251]) * PAGE
        return uffd_plugin.copy()


class FakeBroker:
    """The broker's end of a socket pair handed to the runner as UFFD_BROKER_PLUGIN_FD."""

    def __init__(self, test, shared_memory):
        self.test = test
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.environ["UFFD_BROKER_PLUGIN_FD"] = str(theirs.detach())
        self.plugin = Numbered()
        self.failure = None
        self.thread = threading.Thread(target=self._run, args=(shared_memory,))
        self.thread.start()
        data, ancillary, _, _ = self.sock.recvmsg(1 << 18, socket.CMSG_SPACE(4))
        hello = pb.PluginToBroker.FromString(data).hello
        test.assertEqual((hello.version, hello.role, hello.name), (2, pb.ROLE_PLUGIN, "numbered"))
        self.memory = None
        if ancillary:
            fd = array.array("i", ancillary[0][2])[0]
            self.memory = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
            os.close(fd)
        test.assertEqual(self.memory is not None, shared_memory)
        self.send(pb.BrokerToPlugin(hello=pb.Hello(version=2, role=pb.ROLE_BROKER), packets_applied=1))

    def _run(self, shared_memory):
        try:
            uffd_plugin.run(self.plugin, "numbered", shared_memory=shared_memory)
        except BaseException as error:  # reported by finish()
            self.failure = error

    def send(self, message):
        self.sock.send(message.SerializeToString())

    def receive(self):
        data = self.sock.recv(1 << 20)
        self.test.assertTrue(0 < len(data) <= 256 << 10, f"a packet of {len(data)} bytes")
        return pb.PluginToBroker.FromString(data)

    def open_region(self, region_id, pages, argument=""):
        event = pb.Event(region_opened=pb.RegionOpened(client_id=1, pid=1, region=pb.Region(
            id=region_id, address=BASE, length=pages * PAGE, page_size=PAGE, plugin="numbered", argument=argument)))
        self.send(pb.BrokerToPlugin(events=[event]))
        return self.receive().region_replies[0]

    def faults(self, region_id, pages, applied):
        faults = pb.Faults(fault_id=[(page + 1) << 32 for page in range(pages)], client_id=[1] * pages,
                           region_id=[region_id] * pages, address=[BASE + page * PAGE for page in range(pages)],
                           offset=[page * PAGE for page in range(pages)], flags=[0] * pages, thread_id=[0] * pages)
        self.send(pb.BrokerToPlugin(faults=faults, packets_applied=applied))

    def answers(self, count):
        """Receives packets until `count` decisions came: {fault_id: page bytes}, and the packets."""
        pages, packets = {}, []
        while len(pages) < count:
            answer = self.receive()
            packets.append(answer)
            for decision in answer.decisions:
                self.test.assertEqual((decision.kind, decision.length), (pb.DECISION_COPY, PAGE))
                pages[decision.fault_id] = decision.data
            batch = answer.batch
            for index, fault_id in enumerate(batch.fault_id):
                self.test.assertEqual((batch.kind[index], batch.length[index]), (pb.DECISION_COPY, PAGE))
                offset = batch.shared_offset[index]
                pages[fault_id] = self.memory[offset:offset + PAGE]
        return pages, packets

    def finish(self):
        self.sock.close()
        self.thread.join(10)
        self.test.assertFalse(self.thread.is_alive())
        if self.failure is not None:
            raise self.failure


class RunnerTests(unittest.TestCase):
    def check(self, pages, count):
        self.assertEqual(len(pages), count)
        for fault_id, data in pages.items():
            page = (fault_id >> 32) - 1
            self.assertEqual(data, bytes([page % 251]) * PAGE, f"page {page}")

    def test_inline_answers_split_under_the_packet_limit(self):
        broker = FakeBroker(self, shared_memory=False)
        reply = broker.open_region(5, 200)
        self.assertFalse(reply.HasField("error"))
        broker.faults(5, 126, applied=2)
        pages, packets = broker.answers(126)
        self.check(pages, 126)
        self.assertGreater(len(packets), 1)
        broker.finish()

    def test_shared_halves_alternate_and_fall_back_to_inline(self):
        broker = FakeBroker(self, shared_memory=True)
        broker.open_region(5, 600)
        # 600 pages: more than one half (256 pages), and the broker says it applied
        # nothing new meanwhile, so the third packet's bytes must go inline.
        broker.faults(5, 600, applied=2)
        pages, packets = broker.answers(600)
        self.check(pages, 600)
        self.assertGreater(len(packets[0].batch.fault_id), 0)
        self.assertGreater(sum(len(packet.decisions) for packet in packets), 0)
        broker.finish()

    def test_a_refused_region_says_why(self):
        broker = FakeBroker(self, shared_memory=True)
        reply = broker.open_region(6, 1, argument="refuse")
        self.assertEqual((reply.error.code, reply.error.message), (pb.ERROR_PLUGIN_REFUSED, "refused on purpose"))
        # A fault of a region not open here is retried, never served.
        broker.faults(6, 1, applied=2)
        answer = broker.receive()
        self.assertEqual(list(answer.batch.kind), [pb.DECISION_RETRY])
        broker.finish()


if __name__ == "__main__":
    unittest.main()
