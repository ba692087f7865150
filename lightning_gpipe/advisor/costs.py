"""The cost model: from a model's measured profile and a link's measured cost, a candidate configuration's step time,
bubble and peak memory per rank. Pure arithmetic over :func:`~lightning_gpipe.schedule.simulate`: nothing runs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lightning_gpipe.model.partition import stage_layers
from lightning_gpipe.model.profile import LayerCosts
from lightning_gpipe.schedule import SCHEDULES, Interleaved1F1B, Phase, Schedule, simulate

__all__ = ["Link", "ModelProfile", "Candidate", "Prediction", "predict", "peak_activations"]


@dataclass(frozen=True)
class Link:
    """What one message between two ranks costs: ``latency_s`` plus ``per_byte_s`` for each byte."""

    latency_s: float = 0.0
    per_byte_s: float = 0.0

    def cost(self, nbytes: float) -> float:
        return self.latency_s + nbytes * self.per_byte_s

    @classmethod
    def fit(cls, sizes: Sequence[float], seconds: Sequence[float]) -> Link:
        """The least-squares line through measured one-way times of messages of ``sizes`` bytes (at least two
        sizes), kept non-negative: a noisy measurement never makes a message cost less than nothing."""
        if len(set(sizes)) < 2 or len(sizes) != len(seconds):
            raise ValueError(f"a link's cost needs times of at least two message sizes, got sizes {list(sizes)}")
        n = len(sizes)
        mean_x, mean_y = sum(sizes) / n, sum(seconds) / n
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / sum((x - mean_x) ** 2 for x in sizes)
        slope = max(slope, 0.0)
        return cls(max(mean_y - slope * mean_x, 0.0), slope)


@dataclass(frozen=True)
class ModelProfile:
    """A model measured layer by layer: times at several micro-batch sizes (rows), bytes per row, and the optimizer.

    Times are not linear in rows (a small micro-batch uses a device less well), so each candidate's micro-batch size
    is measured; a size between two measured ones is interpolated, one outside them scaled from the nearest."""

    batch: int  # samples per step
    measured: tuple[LayerCosts, ...]  # one per micro-batch size, in increasing rows
    input_bytes_per_row: float  # the model's input, which the first stage keeps under re-materialization
    optimizer_slots: float  # parameter-sized optimizer tensors (Adam 2, SGD with momentum 1, SGD 0)
    optimizer_s_per_byte: float = 0.0  # the optimizer step's time per byte of parameters
    step_s: float = 0.0  # a fixed cost of every step, the same for every candidate (Lightning's loop)
    # How many times slower the CPU's work runs in training than when profiled alone: the processes per core of
    # this machine where they outnumber its cores (a rank waiting on a message keeps polling), else 1.
    contention: float = 1.0
    # What the stage executor adds to each forward and each backward beyond the layers, per re-materialization mode.
    action_s: Mapping[str, float] = field(default_factory=dict)
    # The pipeline's own time per forward or backward, its messages included, on layers that cost nothing, measured
    # with all of training's processes at work (advisor.measure.measure_floor): no action takes less.
    floor_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.measured:
            raise ValueError("a model profile needs the layers measured at one micro-batch size at least")
        rows = [costs.rows for costs in self.measured]
        if rows != sorted(set(rows)) or rows[0] < 1:
            raise ValueError(f"a model profile's sizes must be distinct, positive and increasing, got rows {rows}")

    @property
    def layers(self) -> int:
        return len(self.measured[0].seconds)

    @property
    def param_bytes(self) -> list[int]:
        return self.measured[0].param_bytes

    def per_row(self, what: str) -> list[float]:
        """``activation_bytes`` or ``output_bytes`` per sample, per layer, from the largest measured size."""
        largest = self.measured[-1]
        return [b / largest.rows for b in getattr(largest, what)]

    def times(self, rows: int) -> tuple[list[float], list[float]]:
        """Each layer's forward and backward seconds on a micro-batch of ``rows`` samples, its CPU-bound share
        slowed by :attr:`contention`."""
        sizes = [costs.rows for costs in self.measured]
        if rows in sizes:
            return self._contended(self.measured[sizes.index(rows)])
        above = next((i for i, size in enumerate(sizes) if size > rows), len(sizes))
        if above in (0, len(sizes)):  # outside what was measured: in proportion to the nearest
            nearest = self.measured[min(above, len(sizes) - 1)]
            forward, backward = self._contended(nearest)
            scale = rows / nearest.rows
            return [t * scale for t in forward], [t * scale for t in backward]
        (low_f, low_b), (high_f, high_b) = self._contended(self.measured[above - 1]), self._contended(self.measured[above])
        w = (rows - sizes[above - 1]) / (sizes[above] - sizes[above - 1])
        mix = lambda a, b: [x + w * (y - x) for x, y in zip(a, b)]  # noqa: E731
        return mix(low_f, high_f), mix(low_b, high_b)

    def _contended(self, costs: LayerCosts) -> tuple[list[float], list[float]]:
        shares = costs.cpu_share or [0.0] * len(costs.seconds)
        slow = [1 + (self.contention - 1) * share for share in shares]
        return [t * s for t, s in zip(costs.forward, slow)], [t * s for t, s in zip(costs.backward, slow)]


@dataclass(frozen=True)
class Candidate:
    """One configuration to predict: M, re-materialization, schedule (chunks per rank) and layers per stage."""

    m: int
    checkpoint: str
    schedule: str
    balance: tuple[int, ...]
    chunks: int = 1

    def make_schedule(self) -> Schedule:
        if self.schedule == "interleaved":
            return Interleaved1F1B(self.checkpoint, self.chunks)
        return SCHEDULES[self.schedule](self.checkpoint)

    @property
    def label(self) -> str:
        chunks = f" v={self.chunks}" if self.chunks > 1 else ""
        return f"M={self.m} {self.checkpoint} {self.schedule}{chunks}"


@dataclass(frozen=True)
class Prediction:
    """What the cost model expects of one candidate on K ranks."""

    candidate: Candidate
    step_s: float  # one optimizer step: the schedule's makespan, the optimizer's step and the fixed cost per step
    samples_per_s: float
    bubble: float  # idle fraction of the ranks over the makespan
    peak_bytes: tuple[float, ...]  # per rank: weights, gradients, optimizer state and saved activations at the peak
    state_bytes: tuple[float, ...]  # per rank: the weights, gradients and optimizer state alone

    @property
    def peak(self) -> float:
        return max(self.peak_bytes)


def predict(profile: ModelProfile, candidate: Candidate, k: int, link: Link = Link()) -> Prediction:
    """The step time, bubble and per-rank peak memory of ``candidate`` on ``k`` ranks.

    Every micro-batch is costed at the largest one's size (``ceil(batch / M)`` rows); each stage's forward and
    backward are its layers' measured times at that size, plus the executor's own time per action; a message across
    boundary b carries the output of the last layer before it, at the link's measured cost; the schedule runs them
    on :func:`simulate`'s ideal machine; the optimizer's step and the fixed cost per step follow. CPU work is slowed
    by the profile's :attr:`~ModelProfile.contention`, and no forward or backward takes less than the profile's
    :attr:`~ModelProfile.floor_s`."""
    stages = k * candidate.chunks
    balance = list(candidate.balance)
    if len(balance) != stages or sum(balance) != profile.layers:
        raise ValueError(
            f"balance {balance} for {stages} stages of a {profile.layers}-layer model: need {stages} counts summing"
            f" to {profile.layers}"
        )
    n = min(candidate.m, profile.batch)  # micro-batches a batch gives
    rows = math.ceil(profile.batch / n)
    forward, backward = profile.times(rows)
    stage_sum = lambda per_layer, s: sum(per_layer[i] for i in stage_layers(balance, s))  # noqa: E731
    outputs = profile.per_row("output_bytes")
    sends = [link.cost(outputs[stage_layers(balance, b)[-1]] * rows) for b in range(stages - 1)]
    schedule = candidate.make_schedule()
    extra = profile.action_s.get(candidate.checkpoint, 0.0) * profile.contention  # Python: CPU-bound
    action = lambda per_layer, s: max(stage_sum(per_layer, s) + extra, profile.floor_s)  # noqa: E731
    timing = simulate(
        schedule, k, n, [action(forward, s) for s in range(stages)], [action(backward, s) for s in range(stages)], sends
    )
    params = [sum(stage_sum(profile.param_bytes, c * k + r) for c in range(candidate.chunks)) for r in range(k)]
    state = [p * (2 + profile.optimizer_slots) for p in params]  # weights, gradients, optimizer state
    step = timing.makespan + (max(params) * profile.optimizer_s_per_byte + profile.step_s) * profile.contention
    activations = peak_activations(profile, candidate, k, n, rows)
    peaks = tuple(s + a for s, a in zip(state, activations))
    return Prediction(candidate, step, profile.batch / step, timing.bubble, peaks, tuple(state))


def peak_activations(profile: ModelProfile, candidate: Candidate, k: int, n: int, rows: int) -> list[float]:
    """Per rank, the most saved-activation bytes held at once over the schedule's order: a forward keeps its layers'
    saved tensors, or only its input when re-materialized, until its backward; a re-materialized backward holds the
    micro-batch's saved tensors again while it runs."""
    saved, outputs, balance = profile.per_row("activation_bytes"), profile.per_row("output_bytes"), candidate.balance
    schedule, peaks = candidate.make_schedule(), []
    for r in range(k):
        live, peak, held = 0.0, 0.0, {}
        for action in schedule.actions(k, n, r):
            stage = action.chunk * k + r
            layers = stage_layers(balance, stage)
            full = sum(saved[i] for i in layers) * rows
            if action.phase is Phase.FORWARD:
                first = layers[0]
                kept = (outputs[first - 1] if first else profile.input_bytes_per_row) * rows
                held[(stage, action.i)] = (kept, full) if action.recompute else (full, 0.0)
                live += held[(stage, action.i)][0]
                peak = max(peak, live)
            else:
                kept, again = held.pop((stage, action.i))
                peak = max(peak, live + again)
                live -= kept
        peaks.append(peak)
    return peaks
