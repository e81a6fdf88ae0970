"""Every event of the protocol reaches its Plugin method, and swap's store,
swapped_out and holds work end to end (the example swap plugin, scripted)."""

import contextlib
import io
import os
import sys
import tempfile
import unittest

import uffd_plugin
from fake_broker import BASE, PAGE, FakeBroker
from uffd_plugin import broker_pb2 as pb

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import swap_plugin  # noqa: E402


class Recorder(uffd_plugin.Plugin):
    """Records each call; holds the first stored page only; answers faults with zeros."""

    def __init__(self):
        self.calls = []

    def region_opened(self, region):
        self.calls.append(("opened", region.id, region.swapped_out))

    def region_forked(self, child, parent):
        self.calls.append(("forked", child.client_id, parent.client_id, child.base))

    def pagefault(self, fault, region, buffer):
        self.calls.append(("fault", fault.offset, fault.is_write))
        return uffd_plugin.zero()

    def removed(self, start, end, region):
        self.calls.append(("removed", start, end))

    def swapped_out(self, start, end, region):
        self.calls.append(("swapped_out", start, end))

    def store(self, data, offset, region):
        self.calls.append(("store", offset, len(data)))

    def holds(self, start, end, region):
        return start == 0 and end == PAGE

    def unmapped(self, start, end, region):
        self.calls.append(("unmapped", start, end))

    def remapped(self, region):
        self.calls.append(("remapped", region.base))

    def region_closed(self, region):
        self.calls.append(("closed region", region.client_id, region.id))

    def closed(self, client_id, reason):
        self.calls.append(("closed client", client_id, reason))

    def decision_refused(self, fault_id, cause, reason):
        self.calls.append(("refused", fault_id, cause))


def range_event(start_offset, pages, swapped_out=False):
    return pb.RangeEvent(client_id=1, region_id=3, start=BASE + start_offset, end=BASE + start_offset + pages * PAGE,
                         start_offset=start_offset, swapped_out=swapped_out)


class EventTests(unittest.TestCase):
    def test_every_event_reaches_its_method_in_order(self):
        plugin = Recorder()
        broker = FakeBroker(self, plugin)
        reply = broker.open_region(3, 8, swapped_out=[(0, PAGE), (PAGE, 2 * PAGE)])
        # The plugin holds [0, PAGE) only: the other extent is lost (fails closed).
        self.assertEqual([(extent.offset, extent.length) for extent in reply.lost], [(PAGE, 2 * PAGE)])
        broker.events(
            pb.Event(removed=range_event(0, 1)),
            pb.Event(removed=range_event(PAGE, 2, swapped_out=True)),
            pb.Event(unmapped=range_event(3 * PAGE, 1)),
            pb.Event(remapped=pb.Remapped(client_id=1, region_id=3, new_base=BASE + (1 << 30))),
            pb.Event(store=pb.Store(client_id=1, region_id=3, offset=4 * PAGE, data=bytes(2 * PAGE), store_id=9)),
            pb.Event(store=pb.Store(client_id=1, region_id=77, offset=0, data=bytes(PAGE), store_id=10)),
            pb.Event(decision_refused=pb.DecisionRefused(fault_id=5, cause="badRange", reason="for the test")),
            broker.opened(3, 8, client_id=2, parent_client_id=1),
            applied=2)
        answer = broker.receive()
        self.assertEqual(answer.store_replies[0].store_id, 9)
        self.assertFalse(answer.store_replies[0].HasField("error"))
        self.assertEqual((answer.store_replies[1].store_id, answer.store_replies[1].error.code), (10, pb.ERROR_BAD_REGION))
        # The forked child is accepted; its stored pages are its parent's, so it reports none lost.
        self.assertEqual([(reply.client_id, reply.HasField("error"), len(reply.lost)) for reply in answer.region_replies], [(2, False, 0)])
        broker.faults(3, 1, applied=3, first=5, flags=1)
        self.assertEqual(list(broker.receive().batch.kind), [pb.DECISION_ZERO])
        broker.events(pb.Event(region_closed=pb.RegionClosed(client_id=1, region_id=3)),
                      pb.Event(closed=pb.Closed(client_id=2, reason="exited")))
        # A fault of the closed region is retried and never reaches the plugin.
        broker.faults(3, 1, applied=4)
        self.assertEqual(list(broker.receive().batch.kind), [pb.DECISION_RETRY])
        broker.finish()
        self.assertEqual(plugin.calls, [
            ("opened", 3, [(0, PAGE), (PAGE, 2 * PAGE)]),
            ("removed", 0, PAGE),
            ("swapped_out", PAGE, 3 * PAGE),
            ("unmapped", 3 * PAGE, 4 * PAGE),
            ("remapped", BASE + (1 << 30)),
            ("store", 4 * PAGE, 2 * PAGE),
            ("refused", 5, "badRange"),
            ("forked", 2, 1, BASE + (1 << 30)),
            ("fault", 5 * PAGE, True),
            ("closed region", 1, 3),
            ("closed client", 2, "exited"),
        ])

    def test_a_plugin_that_keeps_nothing_refuses_stores_and_forks(self):
        broker = FakeBroker(self, uffd_plugin.Plugin())
        broker.open_region(3, 4)
        broker.events(pb.Event(store=pb.Store(client_id=1, region_id=3, offset=0, data=bytes(PAGE), store_id=1)),
                      broker.opened(3, 4, client_id=2, parent_client_id=1),
                      broker.opened(4, 4, client_id=3, parent_client_id=1), applied=2)
        answer = broker.receive()
        self.assertEqual(answer.store_replies[0].error.code, pb.ERROR_PLUGIN_REFUSED)
        self.assertEqual([reply.error.message for reply in answer.region_replies],
                         ["this plugin does not serve forked children", "the parent's region 4 of client 1 is not open here"])
        broker.finish()

    def test_swap_plugin_serves_back_what_it_stored(self):
        plugin = swap_plugin.Swap()
        stats = tempfile.NamedTemporaryFile(prefix="swap-stats")
        broker = FakeBroker(self, plugin, stats_path=stats.name)
        # Its log of pages: a memfd the broker is asked to keep, first thing.
        keep, (log,) = broker.receive_with_fds()
        self.assertEqual(list(keep.keep.names), ["pages"])
        broker.open_region(3, 8)
        stored = bytes(range(256)) * (2 * PAGE // 256)
        broker.events(pb.Event(store=pb.Store(client_id=1, region_id=3, offset=PAGE, data=stored, store_id=1)),
                      pb.Event(removed=range_event(PAGE, 2, swapped_out=True)), applied=2)
        self.assertFalse(broker.receive().store_replies[0].HasField("error"))
        broker.faults(3, 3, applied=3)
        pages, _ = broker.answers(3)
        # Page 0 was never stored: a zero page (a read), not a copy.
        self.assertEqual(pages, {1 << 32: pb.DECISION_ZERO, 2 << 32: stored[:PAGE], 3 << 32: stored[PAGE:]})
        # A write to a page never stored gets a copied zero page.
        broker.faults(3, 1, applied=4, first=4, flags=1)
        self.assertEqual(broker.answers(1)[0], {5 << 32: bytes(PAGE)})
        # A forked child reads the parent's stored pages; the parent, after a remove, zeros.
        broker.events(broker.opened(3, 8, client_id=2, parent_client_id=1), pb.Event(removed=range_event(PAGE, 1)), applied=5)
        self.assertFalse(broker.receive().region_replies[0].HasField("error"))
        broker.faults(3, 1, applied=6, client_id=2, first=1)
        self.assertEqual(broker.answers(1)[0], {2 << 32: stored[:PAGE]})
        broker.faults(3, 1, applied=7, first=1)
        self.assertEqual(broker.answers(1)[0], {2 << 32: pb.DECISION_ZERO})
        # Opened again (say the client re-attached): it still holds page 2, no longer page 1.
        reply = broker.open_region(3, 8, swapped_out=[(PAGE, PAGE), (2 * PAGE, PAGE)])
        self.assertEqual([(extent.offset, extent.length) for extent in reply.lost], [(PAGE, PAGE)])
        broker.finish()
        # The runner writes its stats file a last time as it ends.
        with open(stats.name) as file:
            self.assertEqual(file.read(), "faults=6\npages_held=3\npages_stored=2\npages_restored=3\n")
        # Its next process (this one killed) gets the log back from the broker and holds every page.
        with contextlib.redirect_stderr(io.StringIO()) as said:
            broker = FakeBroker(self, swap_plugin.Swap(), kept={"pages": log})
            reply = broker.open_region(3, 8, swapped_out=[(2 * PAGE, PAGE)])
        self.assertEqual(said.getvalue(), "swap_plugin: recovered 3 stored pages\n")
        self.assertEqual(len(reply.lost), 0)
        broker.open_region(3, 8, client_id=2)
        broker.faults(3, 1, applied=2, first=2)
        self.assertEqual(broker.answers(1)[0], {3 << 32: stored[PAGE:]})
        broker.faults(3, 2, applied=3, first=1, client_id=2)  # the forked child's
        self.assertEqual(broker.answers(2)[0], {2 << 32: stored[:PAGE], 3 << 32: stored[PAGE:]})
        broker.finish()


if __name__ == "__main__":
    unittest.main()
