"""Delegations and the descriptor store against the scripted broker: what
goes in which packet, with which descriptors attached."""

import os
import unittest

import uffd_plugin
from fake_broker import PAGE, FakeBroker
from uffd_plugin import broker_pb2 as pb


def memfd_with(data):
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


class Delegating(uffd_plugin.Plugin):
    """Delegates by the region's argument; revokes all on its first fault."""

    def __init__(self):
        self.file = memfd_with(b"F" * 2 * PAGE)
        self.store = None

    def connected(self, store):
        self.store = dict(store)

    def region_opened(self, region):
        if region.argument == "zero-file":
            region.delegate_zero(0, 2 * PAGE)
            region.delegate_file(self.file, file_offset=PAGE, start=2 * PAGE, end=4 * PAGE, prefetch_pages=2)
        elif region.argument == "then-refuse":
            region.delegate_file(self.file)
            raise uffd_plugin.Refused("no")
        elif region.argument == "misaligned":
            region.delegate_zero(1, PAGE)
        elif region.argument == "many-files":
            for page in range(10):
                region.delegate_file(self.file, start=page * PAGE, end=(page + 1) * PAGE)

    def pagefault(self, fault, region, buffer):
        region.revoke_delegation()
        return uffd_plugin.zero()


class DelegationTests(unittest.TestCase):
    def test_delegations_precede_the_reply_and_carry_their_file(self):
        plugin = Delegating()
        broker = FakeBroker(self, plugin)
        broker.events(broker.opened(3, 8, argument="zero-file"))
        answer, fds = broker.receive_with_fds()
        zero, file = answer.delegations
        self.assertEqual((zero.kind, zero.offset, zero.length, zero.revoke), (pb.DELEGATE_ZERO, 0, 2 * PAGE, False))
        self.assertEqual((file.kind, file.offset, file.length, file.file_offset, file.prefetch_pages),
                         (pb.DELEGATE_FILE, 2 * PAGE, 2 * PAGE, PAGE, 2))
        self.assertFalse(answer.region_replies[0].HasField("error"))
        # The attached descriptor is a duplicate of the plugin's file (which stays open).
        self.assertEqual(len(fds), 1)
        self.assertEqual(os.pread(fds[0], 4, PAGE), b"FFFF")
        self.assertEqual(os.fstat(fds[0]).st_ino, os.fstat(plugin.file).st_ino)
        os.close(fds[0])
        # A delegation made in pagefault rides with (after) the decision.
        broker.faults(3, 1, applied=2, first=5)
        answer = broker.receive()
        self.assertEqual(list(answer.batch.kind), [pb.DECISION_ZERO])
        revoke = answer.delegations[0]
        self.assertEqual((revoke.revoke, revoke.offset, revoke.length), (True, 0, 8 * PAGE))
        broker.finish()

    def test_a_refused_region_sends_no_delegation_and_bad_offsets_refuse(self):
        broker = FakeBroker(self, Delegating())
        broker.events(broker.opened(3, 8, argument="then-refuse"), broker.opened(4, 8, argument="misaligned"))
        answer, fds = broker.receive_with_fds()
        self.assertEqual((len(answer.delegations), fds), (0, []))
        self.assertEqual(answer.region_replies[0].error.message, "no")
        self.assertIn("not a page-aligned part of region 4", answer.region_replies[1].error.message)
        broker.finish()

    def test_file_delegations_split_at_eight_descriptors_a_packet(self):
        broker = FakeBroker(self, Delegating())
        broker.events(broker.opened(3, 16, argument="many-files"))
        first, first_fds = broker.receive_with_fds()
        second, second_fds = broker.receive_with_fds()
        self.assertEqual((len(first.delegations), len(first_fds)), (8, 8))
        self.assertEqual((len(second.delegations), len(second_fds)), (2, 2))
        self.assertEqual([d.offset for d in list(first.delegations) + list(second.delegations)], [page * PAGE for page in range(10)])
        self.assertEqual(len(second.region_replies), 1)
        for fd in first_fds + second_fds:
            os.close(fd)
        broker.finish()


class Keeper(uffd_plugin.Plugin):
    """Keeps a new memfd and re-keeps the restored one when connected."""

    def connected(self, store):
        self.restored = dict(store)
        self.pages = memfd_with(b"new")
        store.keep(self.pages, "log")
        store.keep(store["pages"], "pages")
        self.errors = []
        for name in ("", "x" * 65):
            try:
                store.keep(self.pages, name)
            except ValueError as error:
                self.errors.append(str(error))
        for number in range(6):
            store.keep(self.pages, f"extra{number}")  # 8 names in all, then a ninth
        try:
            store.keep(self.pages, "ninth")
        except ValueError as error:
            self.errors.append(str(error))

    def pagefault(self, fault, region, buffer):
        return uffd_plugin.zero()


class DescriptorStoreTests(unittest.TestCase):
    def test_restored_descriptors_and_keep(self):
        plugin = Keeper()
        broker = FakeBroker(self, plugin, kept={"pages": memfd_with(b"old")})
        answer, fds = broker.receive_with_fds()
        self.assertEqual(list(answer.keep.names), ["log", "pages"] + [f"extra{number}" for number in range(6)])
        self.assertEqual([os.pread(fd, 3, 0) for fd in fds], [b"new", b"old"] + [b"new"] * 6)
        self.assertEqual(os.pread(plugin.restored["pages"], 3, 0), b"old")
        self.assertEqual(len(plugin.errors), 3)
        self.assertIn("at most 8", plugin.errors[2])
        for fd in fds:
            os.close(fd)
        broker.finish()


if __name__ == "__main__":
    unittest.main()
