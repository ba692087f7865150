"""Point-to-point messages held until they complete, whoever drops their handles.

With gloo, a posted send or receive lives only as long as its work handle. Dropped before the message completed
(a rank that raises between posting and waiting), the send is never made, or the receive's buffer is freed
under the message coming into it; either way the connection between the two ranks carries nothing more,
collectives included: measured here, the next broadcast between them never completes. So every send and
receive the pipeline posts goes through :func:`isend` and :func:`irecv`, which hold it with its buffer until
it is waited for. A run that fails leaves its messages here, still posted: its peers, failing alike, match
them. The next run on this rank first waits for them (:func:`settle`).
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor

__all__ = ["PostedWork", "isend", "irecv", "settle", "held"]


class PostedWork:
    """A posted message's handle, held (with its buffer) from :func:`isend` or :func:`irecv` until waited for."""

    __slots__ = ("work", "buffer", "peer", "tag", "sent")

    def __init__(self, work: dist.Work, buffer: Tensor, peer: int, tag: int, sent: bool) -> None:
        self.work, self.buffer, self.peer, self.tag, self.sent = work, buffer, peer, tag, sent
        _held[id(self)] = self

    def wait(self) -> bool:
        """Until the message completed (at most the process group's timeout); then no longer held. A message that
        fails stays held: :func:`settle` names it."""
        done = self.work.wait()
        _held.pop(id(self), None)
        return done

    def is_completed(self) -> bool:
        """Whether the message completed; then no longer held. gloo says so only once it was waited for; NCCL
        as soon as it has."""
        done = self.work.is_completed()
        if done:
            _held.pop(id(self), None)
        return done

    @property
    def what(self) -> str:
        """``"a send to rank 1 (tag 7)"``, ``"a receive from rank 0 (tag 3)"``."""
        direction = f"a send to rank {self.peer}" if self.sent else f"a receive from rank {self.peer}"
        return f"{direction} (tag {self.tag})"


_held: dict[int, PostedWork] = {}


def isend(t: Tensor, dst: int, group: Optional[dist.ProcessGroup] = None, tag: int = 0) -> PostedWork:
    """``dist.isend``, held until waited for."""
    work = dist.isend(t, dst, group=group, tag=tag)
    assert work is not None
    return PostedWork(work, t, dst, tag, sent=True)


def irecv(t: Tensor, src: int, group: Optional[dist.ProcessGroup] = None, tag: int = 0) -> PostedWork:
    """``dist.irecv``, held until waited for."""
    work = dist.irecv(t, src, group=group, tag=tag)
    assert work is not None
    return PostedWork(work, t, src, tag, sent=False)


def held() -> int:
    """How many posted messages are held: posted and not waited for."""
    return len(_held)


def settle() -> None:
    """Wait for every held message, each at most the process group's timeout: what an earlier run on this rank
    posted and dropped when it failed. Raises if one cannot complete, naming it; nothing is held after."""
    pending = list(_held.values())
    try:
        for message in pending:
            try:
                message.wait()
            except RuntimeError as error:  # gloo's and NCCL's errors alike (DistBackendError is one)
                raise RuntimeError(
                    f"GPipeStrategy: an earlier run on this rank failed with {len(pending)} message(s) to or from"
                    f" other ranks still posted, and {message.what} did not complete ({error}). The ranks no"
                    " longer agree on what they sent: start the processes again."
                ) from error
    finally:
        _held.clear()
