"""One rank's several chunks of the model under an interleaved schedule: a stage executor per chunk, driven in the
rank's one order of actions, all talking through one :class:`~lightning_gpipe.engine.pairs.PairedLink`."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.microbatch import TensorOrTensors
from lightning_gpipe.engine.pairs import PairedLink
from lightning_gpipe.engine.rng import StageRandom
from lightning_gpipe.instrument.memory import ActivationMeter
from lightning_gpipe.instrument.timeline import Timeline
from lightning_gpipe.schedule import Action, Phase, Schedule
from lightning_gpipe.schedule.messages import Forwards

__all__ = ["RankChunks", "ChunkOrder"]


@dataclass(frozen=True)
class ChunkOrder:
    """What a chunk's executor reads of its schedule (its last forward, for deferred batch norms): an interleaved
    schedule runs a chunk's forwards in micro-batch order, and its backwards too. The rank's order, which interleaves
    them, comes from :class:`RankChunks`."""

    name: str
    loss_per_microbatch = True
    stages_per_rank = 1

    def actions(self, k: int, m: int, stage: int) -> list[Action]:
        return [Action(phase, i) for phase in (Phase.FORWARD, Phase.BACKWARD) for i in range(m)]


class RankChunks:
    """The executor of a rank with ``v`` chunks: chunk c runs model stage c*K + rank (``layers[c]`` its layers).

    It offers :class:`StageExecutor`'s interface to the step: ``is_first`` is the rank with the model's first stage,
    ``is_last`` the rank with its last, where the loss runs (on the last chunk: :meth:`holds_loss`); actions carry
    their chunk. Skips between stages are not supported (refused before it is built).
    """

    def __init__(
        self, layers: Sequence[Sequence[nn.Module]], rank: int, k: int, device: torch.device, link: PairedLink,
        schedule: Schedule, random: Optional[StageRandom] = None,
    ) -> None:  # fmt: skip
        self.v = len(layers)
        if schedule.stages_per_rank != self.v:
            raise ValueError(f"schedule {schedule.name!r} runs {schedule.stages_per_rank} chunks per rank, given {self.v}")
        self.stage, self.k, self.device, self.link, self.schedule = rank, k, device, link, schedule
        self.random = random if random is not None else StageRandom(rank, device)
        self.timeline = Timeline(rank, device)
        self.meter = ActivationMeter()
        self.chunks = []
        for c, chunk_layers in enumerate(layers):
            stage = c * k + rank
            executor = StageExecutor(
                chunk_layers, stage, k * self.v, device, link.chunk(stage), random=self.random,  # type: ignore[arg-type]
                schedule=ChunkOrder(schedule.name),  # type: ignore[arg-type]
            )  # fmt: skip
            executor.timeline, executor.meter = self.timeline, self.meter  # one record for the rank
            self.chunks.append(executor)
        self.layers = [layer for chunk in self.chunks for layer in chunk.layers]
        self.deferred_norms = [norm for chunk in self.chunks for norm in chunk.deferred_norms]
        self._orders: dict[tuple[int, bool], list[Action]] = {}
        self._n, self._done = 0, set[Action]()  # this step's micro-batches, and the actions that ran

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.k - 1

    def holds_loss(self, action: Action) -> bool:
        """Whether ``action`` runs the model's last stage, whose output the loss takes."""
        return self.is_last and action.chunk == self.v - 1

    def actions(self, n: int, train: bool = True) -> list[Action]:
        """This rank's actions for ``n`` micro-batches, in order: a training step's, or evaluation's forwards."""
        if (n, train) not in self._orders:
            schedule = self.schedule if train else Forwards(self.schedule)
            try:
                self._orders[(n, train)] = schedule.actions(self.k, n, self.stage)
            except ValueError as error:  # a batch of fewer rows than M splits into fewer micro-batches
                raise ValueError(
                    f"GPipeStrategy(schedule={self.schedule.name!r}): this batch splits into {n} micro-batches: {error}."
                    " Every batch needs at least M rows (DataLoader(drop_last=True) drops a short last one)"
                ) from None
        return self._orders[(n, train)]

    def begin(self, n: int, keys: Optional[Sequence[Hashable]] = None, train: bool = True) -> None:
        """Start a step of ``n`` micro-batches (of input shapes ``keys``); raises, before any message, for an ``n``
        the schedule cannot order."""
        self.actions(n, train)
        self.link.begin(n, keys, train)
        for chunk in self.chunks:
            chunk.begin(n, keys)
        self._n, self._done = n, set()

    def forward(
        self, inputs: Optional[Sequence[Any]], n: int, train: bool, keys: Optional[Sequence[Hashable]] = None
    ) -> Optional[list[TensorOrTensors]]:
        """The forward actions for ``n`` micro-batches (``inputs`` on the first rank); the last rank returns the last
        chunk's outputs, in micro-batch order."""
        with self.random.active():
            self.begin(n, keys, train)
            outputs: dict[int, TensorOrTensors] = {}
            for action in self.actions(n, train):
                if action.phase is Phase.FORWARD:
                    y = self.forward_one(action, self._input(inputs, action), train)
                    if self.holds_loss(action):
                        outputs[action.i] = y  # type: ignore[assignment]
            self.flush()
        return [outputs[i] for i in range(n)] if self.is_last else None

    def run(self, inputs: Optional[Sequence[Any]], n: int, keys: Optional[Sequence[Hashable]] = None) -> None:
        """Train on ``n`` micro-batches, every action in order, on a rank without the loss."""
        with self.random.active():
            self.begin(n, keys)
            for action in self.actions(n):
                if action.phase is Phase.FORWARD:
                    self.forward_one(action, self._input(inputs, action), train=True)
                else:
                    self.backward_one(action)
            self.flush()

    def forward_one(self, action: Action, x: Any, train: bool) -> Optional[TensorOrTensors]:
        y = self.chunks[action.chunk].forward_one(_plain(action), x, train)
        self._done.add(action)
        return y

    def backward_one(self, action: Action) -> None:
        self.chunks[action.chunk].backward_one(_plain(action))
        self._done.add(action)

    def drain(self) -> None:
        """The rest of a failed training step on the last rank: the last chunk drains as a last stage does
        (:meth:`StageExecutor.drain`); the other chunks run their actions, since later stages wait for their
        outputs and send their gradients."""
        with self.random.active():
            for action in self.actions(self._n):
                if action in self._done:
                    continue
                if self.holds_loss(action):
                    self.chunks[-1].drain_one(_plain(action))
                elif action.phase is Phase.FORWARD:
                    self.forward_one(action, None, train=True)
                else:
                    self.backward_one(action)
            self.flush()

    def post_receives(self) -> None:
        """Nothing to post ahead: each pair's receives are posted in its order."""

    def flush(self) -> None:
        with self.timeline.span("send"):
            self.link.flush()

    def parameters(self) -> list[Tensor]:
        return list({id(p): p for chunk in self.chunks for p in chunk.parameters()}.values())

    def trainable_parameters(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def _input(self, inputs: Optional[Sequence[Any]], action: Action) -> Any:
        return inputs[action.i] if self.is_first and action.chunk == 0 else None  # type: ignore[index]


def _plain(action: Action) -> Action:
    return Action(action.phase, action.i, action.recompute)
