"""The Runner against a scripted broker on a socket pair: what it sends, packet by packet.

Run with `python3 -m unittest discover sdk/python/tests` (PYTHONPATH=sdk/python).
"""

import os
import socket
import unittest

import uffd_plugin
from fake_broker import PAGE, FakeBroker
from uffd_plugin import broker_pb2 as pb


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


class RunnerTests(unittest.TestCase):
    def check(self, pages, count):
        self.assertEqual(len(pages), count)
        for fault_id, data in pages.items():
            page = (fault_id >> 32) - 1
            self.assertEqual(data, bytes([page % 251]) * PAGE, f"page {page}")

    def test_inline_answers_split_under_the_packet_limit(self):
        broker = FakeBroker(self, Numbered(), shared_memory=False)
        reply = broker.open_region(5, 200)
        self.assertFalse(reply.HasField("error"))
        broker.faults(5, 126, applied=2)
        pages, packets = broker.answers(126)
        self.check(pages, 126)
        self.assertGreater(len(packets), 1)
        broker.finish()

    def test_shared_halves_alternate_and_fall_back_to_inline(self):
        broker = FakeBroker(self, Numbered(), shared_memory=True)
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
        broker = FakeBroker(self, Numbered(), shared_memory=True)
        reply = broker.open_region(6, 1, argument="refuse")
        self.assertEqual((reply.error.code, reply.error.message), (pb.ERROR_PLUGIN_REFUSED, "refused on purpose"))
        # A fault of a region not open here is retried, never served.
        broker.faults(6, 1, applied=2)
        answer = broker.receive()
        self.assertEqual(list(answer.batch.kind), [pb.DECISION_RETRY])
        broker.finish()

    def test_a_refusal_sent_before_hello_is_reported_not_the_broken_pipe(self):
        broker, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # As the broker refuses a peer: its Error queued, then the connection shut down, Hello unread.
        reason = "uid 4242 may not serve as a plugin of this broker"
        broker.send(pb.BrokerToPlugin(error=pb.Error(code=pb.ERROR_NOT_AUTHORIZED, message=reason)).SerializeToString())
        broker.shutdown(socket.SHUT_RDWR)
        os.environ["UFFD_BROKER_PLUGIN_FD"] = str(theirs.detach())
        with self.assertRaises(uffd_plugin.BrokerError) as raised:
            uffd_plugin.run(Numbered(), "refused")
        broker.close()
        self.assertEqual((raised.exception.code, str(raised.exception)), (pb.ERROR_NOT_AUTHORIZED, "the broker refused the connection: " + reason))
        self.assertIsInstance(raised.exception.__cause__, BrokenPipeError)  # the Hello's send did fail


if __name__ == "__main__":
    unittest.main()
