"""The messages of a step between every two ranks, in the one order both post them in.

NCCL matches the operations two ranks post towards each other by order, on one stream per pair, each waiting for
its match (see `lightning_gpipe.engine.p2p`). When a rank holds one stage, the order of each direction follows from
the two neighbours' action lists. When it holds several chunks of the model (interleaved schedules), the two ranks
exchange activations and gradients in both directions, and a rank that posts each receive only where it needs it can
face its peer with a send while the peer faces it with another: both wait. So both ends derive one sequence per pair
of ranks from the same data, the schedule run on an ideal machine (`simulate`), where each message leaves when its
action ends: sorted by that time (ties by sender, then by stage boundary), it is an order in which any real run can
send them, since a message that another waited on left before it. Each rank posts its operations towards a peer in
that sequence: a send when its action runs, after posting every receive before it; a receive at the latest when it
is needed or when an operation after it is posted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lightning_gpipe.schedule.actions import Action, Phase, Schedule
from lightning_gpipe.schedule.simulate import simulate

__all__ = ["Kind", "Message", "pair_orders", "Forwards"]


class Kind(str, Enum):
    """What a message carries across a stage boundary."""

    ACTIVATION = "activation"  # forward: stage s's output of a micro-batch, to stage s + 1
    GRADIENT = "gradient"  # backward: the gradient of that output, from stage s + 1 back to stage s


@dataclass(frozen=True)
class Message:
    """Micro-batch ``i``'s message of ``kind`` across ``boundary``, the boundary between model stages ``boundary``
    and ``boundary + 1`` (stage s runs on rank s % K)."""

    kind: Kind
    boundary: int
    i: int

    def sender(self, k: int) -> int:
        return (self.boundary if self.kind is Kind.ACTIVATION else self.boundary + 1) % k

    def receiver(self, k: int) -> int:
        return (self.boundary + 1 if self.kind is Kind.ACTIVATION else self.boundary) % k

    def __repr__(self) -> str:
        arrow = "->" if self.kind is Kind.ACTIVATION else "<-"
        return f"{self.kind.value[0]}{self.i}@{self.boundary}{arrow}{self.boundary + 1}"


@dataclass(frozen=True)
class Forwards:
    """``schedule``'s forward actions alone, as an evaluation step runs them (no gradient, nothing recomputed): its
    ``forwards(k, m, stage)`` where it has one (an order for any M), else its training order's forwards."""

    schedule: Schedule

    @property
    def name(self) -> str:
        return self.schedule.name

    @property
    def stages_per_rank(self) -> int:
        return self.schedule.stages_per_rank

    loss_per_microbatch = False

    def actions(self, k: int, m: int, stage: int) -> list[Action]:
        own = getattr(self.schedule, "forwards", None)
        if own is not None:
            return own(k, m, stage)
        return [Action(a.phase, a.i, chunk=a.chunk) for a in self.schedule.actions(k, m, stage) if a.phase is Phase.FORWARD]


def pair_orders(schedule: Schedule, k: int, m: int, train: bool = True) -> dict[tuple[int, int], list[Message]]:
    """For every two ranks ``(a, b)``, ``a < b``, that exchange messages in a step of ``schedule`` over ``k`` ranks
    and ``m`` micro-batches (``train``: forwards and backwards; else the forwards alone), their messages in the
    order both post them."""
    ran = schedule if train else Forwards(schedule)
    timing = simulate(ran, k, m)  # ValueError for a schedule that cannot finish
    stages = k * schedule.stages_per_rank
    sent: list[tuple[float, int, int, int, Message]] = []
    for (rank, action), (_, end) in timing.spans.items():
        stage = action.chunk * k + rank
        if action.phase is Phase.FORWARD and stage < stages - 1:
            message = Message(Kind.ACTIVATION, stage, action.i)
        elif action.phase is Phase.BACKWARD and stage > 0:
            message = Message(Kind.GRADIENT, stage - 1, action.i)
        else:
            continue
        if message.sender(k) != message.receiver(k):
            sent.append((end, rank, message.boundary, action.phase is Phase.BACKWARD, message))
    orders: dict[tuple[int, int], list[Message]] = {}
    for *_, message in sorted(sent, key=lambda s: s[:4]):
        a, b = sorted((message.sender(k), message.receiver(k)))
        orders.setdefault((a, b), []).append(message)
    return orders
