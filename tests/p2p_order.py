"""Whether NCCL could match a run's point-to-point messages: the order each rank posts them, recorded, and checked
pair by pair under NCCL's rules.

NCCL matches the messages between two ranks by the order they are posted, and torch runs both directions between
two ranks on one communicator and stream, each operation waiting for its match before the next starts. So the
operations each of two ranks posts towards the other must pair up one by one: the n-th of rank a's is a send
where the n-th of rank b's is the matching receive (same size), or the reverse. Gloo, which also matches by tag
and lets operations overtake each other, passes orders that would deadlock on NCCL (two receives facing each
other), or swap buffers. This checks the stricter rule (a small send may complete early on NCCL; the check does
not count on it). It covers the step's messages (``dist.isend`` and ``dist.irecv``: activations, gradients, skips,
the last stage's logged calls and results), not the blocking object transfers of setup and checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist

Op = tuple[str, int, int]  # ("send" | "recv", the peer's global rank, bytes)


@contextmanager
def recorded(ops: list[Op]) -> Iterator[list[Op]]:
    """Inside the block, every ``dist.isend`` and ``dist.irecv`` of this process is appended to ``ops``."""
    isend, irecv = dist.isend, dist.irecv

    def peer(args: tuple, kwargs: dict, name: str) -> int:
        rank = args[0] if args else kwargs.get(name)
        group_rank = kwargs.get(f"group_{name}")
        return rank if group_rank is None else dist.get_global_rank(kwargs["group"], group_rank)

    def send(tensor, *args, **kwargs):
        ops.append(("send", peer(args, kwargs, "dst"), tensor.numel() * tensor.element_size()))
        return isend(tensor, *args, **kwargs)

    def recv(tensor, *args, **kwargs):
        ops.append(("recv", peer(args, kwargs, "src"), tensor.numel() * tensor.element_size()))
        return irecv(tensor, *args, **kwargs)

    dist.isend, dist.irecv = send, recv
    try:
        yield ops
    finally:
        dist.isend, dist.irecv = isend, irecv


def nccl_order_problems(ops: list[list[Op]]) -> list[str]:
    """For each pair of ranks (``ops[r]``: rank r's recorded operations), where their operations towards each other
    stop pairing up; empty when every pair matches to the end."""
    problems = []
    for a in range(len(ops)):
        for b in range(a + 1, len(ops)):
            mine = [(kind, size) for kind, peer, size in ops[a] if peer == b]
            theirs = [(kind, size) for kind, peer, size in ops[b] if peer == a]
            for n in range(max(len(mine), len(theirs))):
                x = mine[n] if n < len(mine) else None
                y = theirs[n] if n < len(theirs) else None
                if x is None or y is None or x[0] == y[0] or x[1] != y[1]:
                    problems.append(
                        f"ranks {a} and {b}, operation {n}: rank {a} posts {x}, rank {b} posts {y}"
                        f" (rank {a} from there: {mine[n : n + 4]}; rank {b}: {theirs[n : n + 4]})"
                    )
                    break
    return problems
