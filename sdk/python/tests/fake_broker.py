"""A scripted broker: the broker's end of a socket pair, handed to a Runner
(on a thread of its own) as UFFD_BROKER_PLUGIN_FD."""

import array
import mmap
import os
import socket
import threading

import uffd_plugin
from uffd_plugin import broker_pb2 as pb

PAGE = mmap.PAGESIZE
BASE = 0x7F0000000000


class FakeBroker:
    """Says Hello (handing back `kept` {name: fd}), then sends what a test
    scripts and decodes what the runner answers."""

    def __init__(self, test, plugin, shared_memory=True, name="numbered", kept=None, **options):
        self.test = test
        self.plugin = plugin
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)  # a runner that fails to answer fails the test, never hangs it
        os.environ["UFFD_BROKER_PLUGIN_FD"] = str(theirs.detach())
        self.failure = None
        self.thread = threading.Thread(target=self._run, args=(name, shared_memory, options))
        self.thread.start()
        data, ancillary, _, _ = self.sock.recvmsg(1 << 18, socket.CMSG_SPACE(4))
        hello = pb.PluginToBroker.FromString(data).hello
        test.assertEqual((hello.version, hello.role, hello.name), (2, pb.ROLE_PLUGIN, name))
        self.memory = None
        if ancillary:
            fd = array.array("i", ancillary[0][2])[0]
            self.memory = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
            os.close(fd)
        test.assertEqual(self.memory is not None, shared_memory)
        reply = pb.BrokerToPlugin(hello=pb.Hello(version=2, role=pb.ROLE_BROKER), packets_applied=1)
        kept = kept or {}
        reply.kept.names.extend(kept.keys())
        self.send(reply, fds=list(kept.values()))

    def _run(self, name, shared_memory, options):
        try:
            uffd_plugin.run(self.plugin, name, shared_memory=shared_memory, **options)
        except BaseException as error:  # reported by finish()
            self.failure = error

    def send(self, message, fds=()):
        if fds:
            self.sock.sendmsg([message.SerializeToString()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.send(message.SerializeToString())

    def receive_with_fds(self):
        """The next packet from the runner and the descriptors attached to it."""
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4))
        self.test.assertTrue(0 < len(data) <= 256 << 10, f"a packet of {len(data)} bytes")
        fds = []
        for _, _, payload in ancillary:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        return pb.PluginToBroker.FromString(data), fds

    def receive(self):
        message, fds = self.receive_with_fds()
        self.test.assertEqual(fds, [], "descriptors nobody asked for")
        return message

    def events(self, *events, applied=0):
        self.send(pb.BrokerToPlugin(events=list(events), packets_applied=applied))

    def open_region(self, region_id, pages, argument="", client_id=1, parent_client_id=0, swapped_out=(), token_low=0):
        self.events(self.opened(region_id, pages, argument, client_id, parent_client_id, swapped_out, token_low))
        return self.receive().region_replies[0]

    @staticmethod
    def opened(region_id, pages, argument="", client_id=1, parent_client_id=0, swapped_out=(), token_low=0):
        """A RegionOpened event of a region at BASE."""
        region = pb.Region(id=region_id, address=BASE, length=pages * PAGE, page_size=PAGE, plugin="numbered", argument=argument,
                           swapped_out=[pb.Extent(offset=offset, length=length) for offset, length in swapped_out])
        return pb.Event(region_opened=pb.RegionOpened(client_id=client_id, pid=1, region=region, parent_client_id=parent_client_id,
                                                      token_low=token_low or client_id))

    def faults(self, region_id, pages, applied, client_id=1, first=0, flags=0):
        """Faults on pages [first, first + pages), fault id (page + 1) << 32."""
        numbers = range(first, first + pages)
        faults = pb.Faults(fault_id=[(page + 1) << 32 for page in numbers], client_id=[client_id] * pages,
                           region_id=[region_id] * pages, address=[BASE + page * PAGE for page in numbers],
                           offset=[page * PAGE for page in numbers], flags=[flags] * pages, thread_id=[0] * pages)
        self.send(pb.BrokerToPlugin(faults=faults, packets_applied=applied))

    def answers(self, count):
        """Receives packets until `count` decisions came: {fault_id: a copy's page bytes, or the kind of any
        other decision}, and the packets."""
        pages, packets = {}, []
        while len(pages) < count:
            answer = self.receive()
            packets.append(answer)
            for decision in answer.decisions:
                self.test.assertEqual((decision.kind, decision.length), (pb.DECISION_COPY, PAGE))
                pages[decision.fault_id] = decision.data
            batch = answer.batch
            for index, fault_id in enumerate(batch.fault_id):
                if batch.kind[index] == pb.DECISION_COPY:
                    self.test.assertEqual(batch.length[index], PAGE)
                    offset = batch.shared_offset[index]
                    pages[fault_id] = self.memory[offset:offset + PAGE]
                else:
                    pages[fault_id] = batch.kind[index]
        return pages, packets

    def finish(self):
        self.sock.close()
        self.thread.join(10)
        self.test.assertFalse(self.thread.is_alive())
        if self.failure is not None:
            raise self.failure
