# SPDX-License-Identifier: Apache-2.0
"""The control plane: a ZeroMQ coordinator that owns versions, handle leases and commit votes
(it never carries tensor bytes), its client, and its backends (memory, Redis).

See docs/coordinator.md for the protocol, the state machine, HA and security.
"""

from .backends import Backend, BackendError, MemoryBackend, NotLeader, RedisBackend
from .client import Client, EventSubscriber
from .protocol import PROTOCOL_VERSION, CoordinatorError, CoordinatorUnavailable
from .server import Coordinator, embedded, start_embedded

__all__ = [
    "Client", "Coordinator", "CoordinatorError", "CoordinatorUnavailable", "EventSubscriber",
    "Backend", "BackendError", "MemoryBackend", "NotLeader", "RedisBackend", "PROTOCOL_VERSION",
    "embedded", "start_embedded",
]
