"""Measuring the pipeline: timed events per stage, bubble fractions, Gantt charts and Chrome traces."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch

__all__ = ["Event", "Timeline", "COMPUTE", "bubble", "makespan", "theoretical_bubble", "draw_schedule", "chrome_trace"]

#: Event kinds that keep a stage busy; the others (``recv``, ``send``, ``logs``, ``results``, ``allreduce``, ``allgather``)
#: are time spent waiting on a peer or making its logged calls.
COMPUTE = ("forward", "backward", "recompute")


@dataclass
class Event:
    """One timed piece of a stage's work in a step; times in seconds from the step's common start."""

    stage: int
    kind: str  # forward | backward | recompute | recv | send | logs, results (last stage's) | allreduce | allgather
    i: int  # micro-batch, or -1 for work that belongs to no single one
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


class Timeline:
    """Records :class:`Event` s while :attr:`active`; costs one attribute check per span otherwise.

    On a GPU each recorded span waits for the device at its start and its end, so that it measures the device's
    work rather than the host's queuing of it: observed steps are slower there, the others untouched.
    """

    def __init__(self, stage: int, device: Optional[torch.device] = None) -> None:
        self.stage = stage
        self._cuda = device if device is not None and device.type == "cuda" else None
        self.active = False
        self.events: list[Event] = []
        self._t0 = 0.0

    def start(self) -> None:
        """Begin recording a step; ranks call this right after a barrier, so their clocks roughly agree."""
        self.events = []
        self._t0 = time.perf_counter()
        self.active = True

    def stop(self) -> list[Event]:
        self.active = False
        return self.events

    def span(self, kind: str, i: int = -1) -> ContextManager[None]:
        return self._record(kind, i) if self.active else nullcontext()

    @contextmanager
    def _record(self, kind: str, i: int) -> Iterator[None]:
        self._wait()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._wait()
            now = time.perf_counter()
            self.events.append(Event(self.stage, kind, i, start - self._t0, now - self._t0))


    def _wait(self) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)


def theoretical_bubble(k: int, m: int, chunks: int = 1) -> float:
    """The idle fraction with equal stages and free communication: GPipe's and 1F1B's (K-1) / (M+K-1); with
    ``chunks`` v per rank (interleaved 1F1B) the fill and drain shrink to (K-1)/v: ((K-1)/v) / (M + (K-1)/v)."""
    fill = (k - 1) / chunks
    return fill / (m + fill)


def makespan(events: Sequence[Event]) -> float:
    """From the earliest event start to the latest event end, over all stages."""
    return max(e.end for e in events) - min(e.start for e in events)


def bubble(events: Sequence[Event], k: int) -> tuple[float, list[float]]:
    """Measured idle fraction, overall and per stage: 1 - (a stage's compute time) / (the step's makespan).

    The makespan runs from the earliest event start to the latest event end over all stages.
    """
    if not events:
        raise ValueError("no events recorded")
    span = makespan(events)
    busy = [sum(e.duration for e in events if e.stage == j and e.kind in COMPUTE) for j in range(k)]
    per_stage = [1 - b / span for b in busy]
    return sum(per_stage) / k, per_stage


def draw_schedule(events: Sequence[Event], k: int, title: str = "") -> Any:
    """A Gantt chart of ``events``: one row per stage, labelled blocks per micro-batch, idle time blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"forward": "#4c72b0", "backward": "#55a868", "recompute": "#dd8452", "recv": "#d0d0d0", "send": "#a0a0a0",
               "logs": "#e5d8a0", "results": "#c4ad66", "allreduce": "#8172b3",
               "allgather": "#64b5cd"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(10, 0.6 * k + 1.2))
    for e in events:
        waiting = e.kind not in COMPUTE
        height = 0.3 if waiting else 0.8
        ax.barh(e.stage, e.duration, left=e.start, height=height, color=colours[e.kind], edgecolor="white", linewidth=0.5)
        if not waiting and e.i >= 0:
            label = {"forward": "F", "backward": "B", "recompute": "R"}[e.kind] + str(e.i)
            ax.text(e.start + e.duration / 2, e.stage, label, ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(k), [f"stage {j}" for j in range(k)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=7, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def chrome_trace(steps: dict[int, Sequence[Event]], path: Path) -> None:
    """Write the sampled steps as a Chrome/Perfetto trace: one track (thread) per stage, steps one after another."""
    trace: list[dict[str, Any]] = []
    offset = 0.0
    for step, events in sorted(steps.items()):
        for e in events:
            name = e.kind if e.i < 0 else f"{e.kind} {e.i}"
            trace.append({"name": name, "cat": e.kind, "ph": "X", "pid": 0, "tid": e.stage,
                          "ts": (offset + e.start) * 1e6, "dur": e.duration * 1e6, "args": {"step": step}})  # fmt: skip
        offset += max(e.end for e in events) * 1.05
    stages = sorted({e.stage for events in steps.values() for e in events})
    trace += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": j, "args": {"name": f"stage {j}"}} for j in stages]
    path.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}))
