"""Point-to-point messages held until they complete, whoever drops their handles.

With gloo, a posted send or receive lives only as long as its work handle. Dropped before the message completed
(a rank that raises between posting and waiting), the send is never made, or the receive's buffer is freed
under the message coming into it; either way the connection between the two ranks carries nothing more,
collectives included: measured here, the next broadcast between them never completes. So every send and
receive the pipeline posts goes through :func:`isend` and :func:`irecv`, which hold it with its buffer until
it has completed. A run that fails leaves its messages here, still posted: its peers, failing alike, match
them. The next run on this rank first waits for them (:func:`settle`).

gloo marks a message complete only once waited for, so what the posting code waits for is released here, and
what it dropped stays until :func:`settle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
from torch import Tensor

__all__ = ["isend", "irecv", "settle", "held"]


@dataclass
class _Held:
    work: dist.Work
    buffer: Tensor
    what: str  # "a send to rank 1 (tag 7)"


_held: list[_Held] = []
_MIN_PRUNE = 256
_prune_at = _MIN_PRUNE  # how many held messages make the next post drop those that completed


def isend(t: Tensor, dst: int, group: Optional[dist.ProcessGroup] = None, tag: int = 0) -> dist.Work:
    """``dist.isend``, held until it completes."""
    work = dist.isend(t, dst, group=group, tag=tag)
    assert work is not None
    _hold(work, t, f"a send to rank {dst} (tag {tag})")
    return work


def irecv(t: Tensor, src: int, group: Optional[dist.ProcessGroup] = None, tag: int = 0) -> dist.Work:
    """``dist.irecv``, held until it completes."""
    work = dist.irecv(t, src, group=group, tag=tag)
    assert work is not None
    _hold(work, t, f"a receive from rank {src} (tag {tag})")
    return work


def held() -> int:
    """How many posted messages are held and not known to have completed."""
    return sum(not h.work.is_completed() for h in _held)


def settle() -> None:
    """Wait for every held message, each at most the process group's timeout, then release them all: what an
    earlier run on this rank posted before it failed. Raises if one cannot complete, naming it."""
    global _prune_at
    pending = [h for h in _held if not h.work.is_completed()]
    _held.clear()
    _prune_at = _MIN_PRUNE
    for h in pending:
        try:
            h.work.wait()
        except RuntimeError as error:  # gloo's and NCCL's errors alike (DistBackendError is one)
            raise RuntimeError(
                f"GPipeStrategy: an earlier run on this rank failed with {len(pending)} message(s) to or from other"
                f" ranks still posted, and {h.what} did not complete ({error}). The ranks no longer agree on what"
                " they sent: start the processes again."
            ) from error


def _hold(work: dist.Work, buffer: Tensor, what: str) -> None:
    global _prune_at
    _held.append(_Held(work, buffer, what))
    if len(_held) >= _prune_at:  # amortized: each post checks O(1) messages on average
        _held[:] = [h for h in _held if not h.work.is_completed()]
        _prune_at = max(_MIN_PRUNE, 2 * len(_held))
