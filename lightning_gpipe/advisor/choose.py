"""Choosing a configuration: the candidates, each predicted, the fastest that fits a memory budget, and a table that
says why."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

from lightning_gpipe.advisor.costs import Candidate, Link, ModelProfile, Prediction, predict
from lightning_gpipe.schedule import optimal_split

__all__ = [
    "TIE", "AdvisorError", "Advice", "microbatch_choices", "candidate_balance", "advise", "format_bytes",
    "parse_budget",
]  # fmt: skip


#: Candidates predicted within this share of the fastest that fits are a tie the prediction cannot break. The costs
#: it leaves out (the strategy's own work per step and per micro-batch) grow with M, so the fewest micro-batches win.
TIE = 0.05


class AdvisorError(ValueError):
    """No candidate configuration fits the memory budget."""


def microbatch_choices(batch: int, k: int, chunks: int = 1, largest: int = 32) -> list[int]:
    """The M to try for a batch of ``batch`` samples: powers of two up to ``max(largest, 4K)`` and the batch; under an
    interleaved schedule (``chunks`` > 1) K times powers of two, as M must be a multiple of K."""
    top = min(batch, max(largest, 4 * k))
    step = k if chunks > 1 else 1
    found = [step * 2**j for j in range(int(math.log2(max(top // step, 1))) + 1)]
    return [m for m in found if m <= top]


def candidate_balance(
    rule: Union[str, Sequence[int]], profile: ModelProfile, m: int, checkpoint: str, stages: int
) -> tuple[int, ...]:
    """Layers per stage for one candidate: a measured rule splits the profile at the candidate's micro-batch size
    (``"time"``: forward plus backward seconds; ``"memory"``: weights, gradients, optimizer state and the saved
    activations the candidate holds), a list of counts is kept."""
    if not isinstance(rule, str):
        return tuple(rule)
    rows = math.ceil(profile.batch / min(m, profile.batch))
    if rule == "time":
        forward, backward = profile.times(rows)
        return tuple(optimal_split([f + b for f, b in zip(forward, backward)], stages))
    if rule == "memory":
        held = m if checkpoint == "never" else 1
        per_row = profile.per_row("activation_bytes")
        state = [p * (2 + profile.optimizer_slots) for p in profile.param_bytes]
        return tuple(optimal_split([s + a * rows * held for s, a in zip(state, per_row)], stages))
    raise ValueError(f"balance rule {rule!r} is not measured: resolve it to layer counts first")


@dataclass(frozen=True)
class Advice:
    """Every candidate predicted, the budget, and the choice: of the candidates that fit and are predicted within
    :data:`TIE` of the fastest that fits, the one with the fewest micro-batches (the fastest of them)."""

    predictions: tuple[Prediction, ...]  # fastest first
    budget: float  # bytes per rank
    k: int

    @property
    def fitting(self) -> list[Prediction]:
        return [p for p in self.predictions if p.peak <= self.budget]

    @property
    def chosen(self) -> Prediction:
        if not self.fitting:
            smallest = min(self.predictions, key=lambda p: p.peak)
            raise AdvisorError(
                f"no candidate fits the memory budget of {format_bytes(self.budget)} per rank: the smallest predicted"
                f" peak is {format_bytes(smallest.peak)} ({smallest.candidate.label}). Raise memory_budget, use more"
                " stages, or re-materialize (checkpoint='always')"
            )
        fastest = self.fitting[0].samples_per_s
        return min((p for p in self.fitting if p.samples_per_s >= (1 - TIE) * fastest), key=lambda p: p.candidate.m)

    def reason(self, prediction: Prediction) -> str:
        """Why a candidate is or is not the choice."""
        if prediction.peak > self.budget:
            return f"over budget ({format_bytes(prediction.peak)} > {format_bytes(self.budget)})"
        chosen = self.chosen
        if prediction is chosen:
            if prediction is self.fitting[0]:
                return "chosen: the fastest that fits"
            return f"chosen: the fewest micro-batches within {TIE:.0%} of the fastest that fits"
        slower = chosen.samples_per_s / prediction.samples_per_s
        if slower < 1:
            return f"{1 / slower:.2f}x faster than the choice: a tie, with more micro-batches"
        return f"{slower:.2f}x slower than the choice"

    def table(self, rows: int = 0) -> str:
        """A Markdown table of the candidates (the first ``rows``, 0 for all), fastest first."""
        shown = self.predictions[:rows] if rows else self.predictions
        lines = [
            f"| K | M | checkpoint | schedule | balance | samples/s | step ms | bubble | peak per stage"
            f" (budget {format_bytes(self.budget)}) | |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in shown:
            c = p.candidate
            schedule = c.schedule + (f" v={c.chunks}" if c.chunks > 1 else "")
            peaks = ", ".join(format_bytes(b) for b in p.peak_bytes)
            lines.append(
                f"| {self.k} | {c.m} | {c.checkpoint} | {schedule} | {list(c.balance)} | {p.samples_per_s:.1f} |"
                f" {p.step_s * 1e3:.1f} | {p.bubble:.2f} | {peaks} | {self.reason(p)} |"
            )
        return "\n".join(lines)


def advise(
    profile: ModelProfile, k: int, candidates: Iterable[Candidate], budget: float, link: Link = Link()
) -> Advice:
    """Predict every candidate on ``k`` ranks and rank them, fastest first (ties: fewer micro-batches)."""
    predictions = sorted((predict(profile, c, k, link) for c in candidates), key=lambda p: (p.step_s, p.candidate.m))
    if not predictions:
        raise ValueError("the advisor needs at least one candidate configuration")
    return Advice(tuple(predictions), float(budget), k)


_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_budget(value: Union[int, float, str]) -> int:
    """Bytes from a count or a string such as ``"24GiB"`` or ``"512 MiB"`` (units B, KiB, MiB, GiB, TiB)."""
    number: Union[int, float, None] = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]iB|B)?\s*", value)
        if found:
            number = float(found.group(1)) * _UNITS[found.group(2) or ""]
    if number is None or number <= 0:
        units = ", ".join(u for u in _UNITS if u)
        raise ValueError(f"memory_budget={value!r}: need a positive number of bytes, or a string such as '24GiB' ({units})")
    return int(number)


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
