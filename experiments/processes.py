"""Starting ranks of a process group on this machine: the variables that say which group a process joins."""

from __future__ import annotations

import os
import socket

__all__ = ["RENDEZVOUS", "free_port", "without_rendezvous"]

#: What tells a process which process group it joins; a parent's own must not leak into the ranks it starts.
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_rendezvous() -> dict[str, str]:
    """This process's environment less :data:`RENDEZVOUS`."""
    return {key: value for key, value in os.environ.items() if key not in RENDEZVOUS}
