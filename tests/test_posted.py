"""engine.posted: what it holds, when it lets go, and what it says when an earlier run's message cannot complete.
Real messages between ranks, handles dropped included, are tests/test_comm.py's (one launch)."""

from __future__ import annotations

import pytest
import torch

from lightning_gpipe.engine import posted


class _Work:
    """A posted message's handle: complete once waited for, as gloo's are; ``fails`` (a negative tag, here): its
    wait raises instead."""

    def __init__(self, fails: bool = False) -> None:
        self.fails, self.done, self.waits = fails, False, 0

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> bool:
        self.waits += 1
        if self.fails:
            raise RuntimeError("Timed out waiting 1800000ms for recv operation to complete")
        self.done = True
        return True


@pytest.fixture
def works(monkeypatch):
    """posted's isend and irecv over handles of our own, and nothing held before the test."""
    made: list[_Work] = []

    def post(t, peer, group=None, tag=0):
        made.append(_Work(fails=tag < 0))
        return made[-1]

    monkeypatch.setattr(posted.dist, "isend", post)
    monkeypatch.setattr(posted.dist, "irecv", post)
    monkeypatch.setattr(posted, "_held", {})
    return made


def test_a_message_is_held_until_waited_for_or_known_complete(works):
    sent = posted.isend(torch.zeros(1), 1, tag=0)
    received = posted.irecv(torch.zeros(1), 1, tag=1)
    dropped = posted.irecv(torch.zeros(1), 1, tag=2)  # never waited for, as by a rank that raised
    assert posted.held() == 3
    sent.wait()
    assert posted.held() == 2
    assert not received.is_completed() and posted.held() == 2  # gloo: not before it is waited for
    works[1].done = True  # NCCL: as soon as it completed
    assert received.is_completed() and posted.held() == 1
    del dropped
    assert posted.held() == 1  # the handle is gone, the message is not
    posted.settle()
    assert [w.waits for w in works] == [1, 0, 1]  # none waited for twice: a second wait would hang on gloo
    assert posted.held() == 0


def test_settle_names_the_message_that_cannot_complete(works):
    posted.isend(torch.zeros(1), 1, tag=3)
    posted.irecv(torch.zeros(1), 2, tag=-1)
    with pytest.raises(RuntimeError) as raised:
        posted.settle()
    assert str(raised.value) == (
        "GPipeStrategy: an earlier run on this rank failed with 2 message(s) to or from other ranks still posted,"
        " and a receive from rank 2 (tag -1) did not complete (Timed out waiting 1800000ms for recv operation to"
        " complete). The ranks no longer agree on what they sent: start the processes again."
    )
    assert posted.held() == 0  # nothing is waited for twice
