"""uffd-broker plugins in Python (protocol version 2).

Subclass `Plugin`, answer `pagefault` with `copy`, `zero`, `retry` or
`poison` (or `later`, then `Runner.answer` from any thread), and call `run(plugin, name)`; see `Plugin` and `Runner` for the
contract, and examples/pattern_plugin.py for a whole plugin.
"""

from .connection import MAX_PACKET, socket_path
from .plugin import BrokerError, Decision, DescriptorStore, Fault, Plugin, Refused, Region, copy, later, poison, retry, zero
from .runner import PROTOCOL_VERSION, Runner, run

__all__ = [
    "BrokerError", "Decision", "DescriptorStore", "Fault", "MAX_PACKET", "PROTOCOL_VERSION", "Plugin", "Refused", "Region", "Runner",
    "copy", "later", "poison", "retry", "run", "socket_path", "zero",
]
