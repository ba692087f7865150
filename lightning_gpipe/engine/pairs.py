"""Point-to-point transfers for a rank that holds several chunks of the model (interleaved schedules), posted in one
order per pair of ranks (:func:`~lightning_gpipe.schedule.messages.pair_orders`).

Each chunk's :class:`~lightning_gpipe.engine.executor.StageExecutor` talks through a :class:`ChunkLink`, which has
:class:`~lightning_gpipe.engine.p2p.StageLink`'s methods for the chunk's stage of the model; all of a rank's chunks
share one :class:`PairedLink`. A send is posted when its action runs, after every receive that comes before it in
its pair's order. A receive is posted as soon as everything before it in that order is, so that its data arrives
while the rank computes; one whose shapes come in a header waits until it is taken or until an operation after it
is posted, and reads the header then (it left before anything this rank posts next, in every run).
Headers follow `lightning_gpipe.engine.p2p`'s rules, one :class:`~lightning_gpipe.engine.p2p.ShapeMemory` per stage
boundary on each end; gradients are shaped like the activations this rank sent.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gpipe.engine.microbatch import Tensors
from lightning_gpipe.engine.p2p import (
    _ACTIVATION,
    _GRADIENT,
    _HEADER,
    _HEADER_LEN,
    Specs,
    Endpoint,
    _carries_grad,
    _decode_header,
    _encode_header,
    _specs,
    _tag,
    needs_header,
)
from lightning_gpipe.engine.posted import PostedWork
from lightning_gpipe.schedule import Schedule
from lightning_gpipe.schedule.messages import Kind, Message, pair_orders

__all__ = ["PairedLink", "ChunkLink"]

Posted = tuple[list[PostedWork], list[Optional[Tensor]]]


@dataclass
class _Pair:
    """This step's messages with one peer, in order, and how far this rank has posted them."""

    peer: int
    order: list[Message]
    next: int = 0
    received: dict[Message, Posted] = field(default_factory=dict)  # posted receives, not yet taken


class PairedLink(Endpoint):
    """The messages of one rank's chunks to and from the other ranks, posted in each pair's order; its streams are
    the stage boundaries.

    ``schedule`` gives every rank's actions (``stages_per_rank`` chunks each); :meth:`begin` starts a step.
    """

    def __init__(
        self, rank: int, k: int, device: torch.device, schedule: Schedule, group: Optional[dist.ProcessGroup] = None,
        headers: str = "auto",
    ) -> None:  # fmt: skip
        super().__init__(device, group, headers)
        self.rank, self.k, self.schedule = rank, k, schedule
        self._orders: dict[tuple[int, bool], dict[int, list[Message]]] = {}  # per (n, train): per peer
        self._pairs: dict[int, _Pair] = {}
        self._keys: list[Optional[Hashable]] = []
        self._sent: dict[tuple[int, int], Specs] = {}  # (boundary, micro-batch): activations sent, their gradients'

    def begin(self, n: int, keys: Optional[Sequence[Hashable]], train: bool) -> None:
        """Start a step of ``n`` micro-batches of input shapes ``keys``: training (forwards and backwards) or not."""
        if (n, train) not in self._orders:
            mine: dict[int, list[Message]] = {}
            for (a, b), order in pair_orders(self.schedule, self.k, n, train).items():
                if self.rank in (a, b):
                    mine[b if a == self.rank else a] = order
            self._orders[(n, train)] = mine
        self._pairs = {peer: _Pair(peer, order) for peer, order in self._orders[(n, train)].items()}
        self._keys = list(keys) if keys is not None else [None] * n
        self._sent = {}
        for pair in self._pairs.values():  # what the step starts with taking
            self._post_ahead(pair)

    def chunk(self, stage: int) -> ChunkLink:
        """The link of the chunk that runs model stage ``stage``."""
        return ChunkLink(self, stage)

    def send(self, message: Message, xs: Sequence[Tensor]) -> None:
        """Post ``message`` (``xs``), after every receive before it in its pair's order."""
        pair = self._pair(message)
        self._post_until(pair, message)
        if pair.order[pair.next] != message:
            raise RuntimeError(f"rank {self.rank} sends {message}, but {pair.order[pair.next]} comes first")
        peer, tag = pair.peer, self._tag(message)
        if message.kind is Kind.ACTIVATION:
            what = f"stage {message.boundary}'s output for micro-batch {message.i}"
            if needs_header(self._memory("out", message.boundary), self._keys[message.i], xs, what):
                self._isend(_encode_header(xs, self.device), peer, self._tag(message, _HEADER))
                self.headers_sent += 1
            self._sent[(message.boundary, message.i)] = _specs(xs)
        for x in xs:
            self._isend(x, peer, tag)
        pair.next += 1
        self._post_ahead(pair)

    def take(self, message: Message) -> list[Optional[Tensor]]:
        """Receive ``message``: its tensors (``None`` for an output that takes no gradient)."""
        pair = self._pair(message)
        if message not in pair.received:
            self._post_until(pair, message, including=True)
        self._post_ahead(pair)
        works, xs = pair.received.pop(message)
        for work in works:
            work.wait()
        return xs

    def _pair(self, message: Message) -> _Pair:
        peer = message.receiver(self.k) if message.sender(self.k) == self.rank else message.sender(self.k)
        return self._pairs[peer]

    def _post_until(self, pair: _Pair, message: Message, including: bool = False) -> None:
        """Post the receives of ``pair``'s order up to ``message`` (and it, ``including``)."""
        while pair.next < len(pair.order):
            due = pair.order[pair.next]
            if due == message and not including:
                return
            if due.sender(self.k) == self.rank:
                raise RuntimeError(f"rank {self.rank} waits for {message}, but must first send {due}")
            pair.received[due] = self._post_receive(pair.peer, due)
            pair.next += 1
            if due == message:
                return
        raise RuntimeError(f"rank {self.rank}: {message} is not among this step's messages with rank {pair.peer}")

    def _post_ahead(self, pair: _Pair) -> None:
        """Post the receives that come next in ``pair``'s order, up to its next send or a receive whose header has to
        be read first, so that their data lands while this rank works."""
        while pair.next < len(pair.order):
            due = pair.order[pair.next]
            if due.sender(self.k) == self.rank or (
                due.kind is Kind.ACTIVATION and self._memory("in", due.boundary).get(self._keys[due.i]) is None
            ):
                return
            pair.received[due] = self._post_receive(pair.peer, due)
            pair.next += 1

    def _post_receive(self, peer: int, message: Message) -> Posted:
        if message.kind is Kind.ACTIVATION:
            memory = self._memory("in", message.boundary)
            specs = memory.get(self._keys[message.i])
            if specs is None:  # its header comes first: read it now
                header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
                self._irecv(header, peer, self._tag(message, _HEADER)).wait()
                specs = _decode_header(header)
                memory.put(self._keys[message.i], specs)
                self.headers_received += 1
        else:
            specs = self._sent.pop((message.boundary, message.i))
        xs = [
            torch.empty(shape, dtype=dtype, device=self.device)
            if message.kind is Kind.ACTIVATION or _carries_grad(dtype) else None
            for shape, dtype in specs
        ]  # fmt: skip
        tag = self._tag(message)
        works = [self._irecv(x, peer, tag) for x in xs if x is not None]
        return works, xs  # type: ignore[return-value]

    def _tag(self, message: Message, kind: Optional[int] = None) -> int:
        if kind is None:
            kind = _ACTIVATION if message.kind is Kind.ACTIVATION else _GRADIENT
        return _tag(message.i, kind, message.boundary // self.k)  # one boundary per chunk in each direction


class ChunkLink:
    """:class:`~lightning_gpipe.engine.p2p.StageLink`'s methods for the chunk that runs model stage ``stage``,
    through the rank's :class:`PairedLink` (skips do not cross chunks: refused before)."""

    def __init__(self, paired: PairedLink, stage: int) -> None:
        self.paired, self.stage = paired, stage

    def send_activations(self, i: int, xs: Tensors, key: Optional[Hashable] = None) -> None:
        self.paired.send(Message(Kind.ACTIVATION, self.stage, i), xs)

    def recv_activations(
        self, i: int, ahead: Optional[int] = None, key: Optional[Hashable] = None, ahead_key: Optional[Hashable] = None
    ) -> Tensors:
        return tuple(self.paired.take(Message(Kind.ACTIVATION, self.stage - 1, i)))  # type: ignore[arg-type]

    def expect_gradients(self, i: int, sent: Sequence[tuple[torch.Size, torch.dtype]]) -> None:
        """Nothing to do: the gradient's receive is posted in its pair's order."""

    def recv_gradients(self, i: int) -> list[Optional[Tensor]]:
        return self.paired.take(Message(Kind.GRADIENT, self.stage, i))

    def send_gradients(self, i: int, grads: list[Tensor]) -> None:
        self.paired.send(Message(Kind.GRADIENT, self.stage - 1, i), grads)

    def flush(self) -> None:
        self.paired.flush()
