"""The socket to the broker: connect, check who serves it, send and receive packets with descriptors."""

from __future__ import annotations

import array
import os
import socket
import struct
from typing import Optional

from .plugin import BrokerError

MAX_PACKET = 256 << 10
"""The largest packet either side sends (broker.proto)."""

MAX_DESCRIPTORS = 16
"""Descriptors received with one packet, at most."""

SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def socket_path(path: Optional[str]) -> str:
    """`path`, else `UFFD_BROKER_PLUGIN_SOCKET`, else `plugin.sock` in
    `$XDG_RUNTIME_DIR/uffd-broker` (root: `/run/uffd-broker`), as the Swift SDK does."""
    if path:
        return path
    if os.environ.get("UFFD_BROKER_PLUGIN_SOCKET"):
        return os.environ["UFFD_BROKER_PLUGIN_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.environ["XDG_RUNTIME_DIR"] + "/uffd-broker/plugin.sock"
    if os.geteuid() == 0:
        return "/run/uffd-broker/plugin.sock"
    raise BrokerError(
        "no safe default for the plugin socket: XDG_RUNTIME_DIR is not set; set it or "
        "UFFD_BROKER_PLUGIN_SOCKET, or give the socket path", 1)


class Connection:
    """One SOCK_SEQPACKET connection to the broker's plugin socket.

    1. Its peer is root, this process's uid, or `UFFD_BROKER_UID` (SO_PEERCRED),
       checked before anything is sent: pages never go to whoever squats on the path.
    2. Its send buffer holds a whole 256 KiB packet (the default does not).
    3. A packet received with 0 bytes is the broker closing (`receive` returns None).
    """

    def __init__(self, sock: socket.socket, where: str, broker_uid: Optional[int] = None) -> None:
        self.sock = sock
        self._check_peer(where, broker_uid)
        for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, 1 << 20)
                break
            except PermissionError:
                continue

    @classmethod
    def connect(cls, path: Optional[str], broker_uid: Optional[int] = None) -> "Connection":
        """Connects to the plugin socket at `path` (see `socket_path`), or to the
        connection a broker that spawned this process handed it (`UFFD_BROKER_PLUGIN_FD`).
        `broker_uid`: a uid besides root and ours that may serve it (None: `UFFD_BROKER_UID`)."""
        inherited = os.environ.pop("UFFD_BROKER_PLUGIN_FD", None) if path is None else None
        if inherited is not None:
            try:
                sock = socket.socket(fileno=int(inherited))
            except (ValueError, OSError) as error:
                raise BrokerError(f"UFFD_BROKER_PLUGIN_FD={inherited} names no socket this process holds: {error}", 0)
            sock.set_inheritable(False)
            return cls(sock, f"the socket in UFFD_BROKER_PLUGIN_FD={inherited}", broker_uid)
        where = socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(where)
        except OSError as error:
            sock.close()
            raise BrokerError(f"cannot connect to {where}: {error}", 0)
        return cls(sock, where, broker_uid)

    def _check_peer(self, where: str, broker_uid: Optional[int]) -> None:
        _, uid, _ = struct.unpack("3i", self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        trusted = {0, os.getuid(), os.geteuid()}
        extra = os.environ.get("UFFD_BROKER_UID")
        if broker_uid is not None:
            trusted.add(broker_uid)
        elif extra:
            if not extra.isdigit():
                raise BrokerError(f"UFFD_BROKER_UID={extra} is not a uid (a whole number)", 1)
            trusted.add(int(extra))
        if uid not in trusted:
            self.sock.close()
            raise BrokerError(
                f"{where} is served by uid {uid}, not root or you (uid {os.geteuid()}); refusing to send it anything "
                f"(if uid {uid} runs your broker, say so with UFFD_BROKER_UID={uid})", 3)

    def send(self, packet: bytes, fds: tuple = ()) -> None:
        """Sends one packet (never empty: a 0-byte packet reads as EOF), with `fds` attached."""
        assert 0 < len(packet) <= MAX_PACKET, f"a packet of {len(packet)} bytes"
        if fds:
            self.sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(packet)

    def receive(self, timeout: Optional[float] = None):
        """The next packet and the descriptors attached to it, or None when the broker closed."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(MAX_DESCRIPTORS * 4))
        except socket.timeout:
            raise BrokerError("the broker did not answer Hello", 13)
        except ConnectionResetError:
            return None
        fds = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(received)
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        return data, fds

    def close(self) -> None:
        self.sock.close()
