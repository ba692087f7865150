"""Measuring what the cost model needs: the layers at several micro-batch sizes, the optimizer's step, and the link
between two ranks."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from lightning_gpipe.advisor.costs import Link, ModelProfile
from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.microbatch import _map, batch_size, split
from lightning_gpipe.engine.p2p import StageLink
from lightning_gpipe.instrument.memory import tensor_bytes
from lightning_gpipe.model.profile import fastest_pass, optimizer_slots, profile_layers, trial_optimizer
from lightning_gpipe.schedule import GPipe

__all__ = [
    "profile_model", "optimizer_seconds_per_byte", "measure_link", "measure_floor", "action_overhead", "LINK_SIZES",
]  # fmt: skip

#: Message sizes (bytes) a link is timed at: a header's, then activations from 64 KiB to 4 MiB.
LINK_SIZES = (64, 2**16, 2**20, 2**22)


def profile_model(
    layers: Sequence[nn.Module], batch: Any, sizes: Sequence[int], device: torch.device,
    optimizers: Sequence[torch.optim.Optimizer], checkpoints: Sequence[str] = (), processes: int = 1,
    repeats: int = 3, passes: int = 3,
) -> ModelProfile:  # fmt: skip
    """Every layer measured on the first ``rows`` samples of ``batch`` (what ``self(x)`` gets for a whole batch), for
    each ``rows`` in ``sizes``, in ``passes`` passes over all sizes (each layer's fastest kept); the optimizers' slots
    and step time on a probe; the executor's time per action under each re-materialization mode of ``checkpoints``.
    On the CPU, ``processes`` of this machine that outnumber its cores share them: the profile's CPU-bound work then
    runs that many times slower per core."""
    rows = sorted(set(sizes))
    samples = batch_size(batch)
    if not rows or rows[0] < 1 or rows[-1] > samples:
        raise ValueError(f"profiling at micro-batch sizes {rows} needs sizes from 1 to the batch's {samples} samples")
    # Every size once per pass, so that a slow spell falls on all sizes alike; each layer and size keeps its
    # fastest pass.
    timed = [[profile_layers(layers, _first_rows(batch, r), device, repeats, 1) for r in rows] for _ in range(passes)]
    measured = tuple(fastest_pass([run[i] for run in timed]) for i in range(len(rows)))
    found: list[torch.Tensor] = []
    _map(batch, found.append)
    return ModelProfile(
        samples, measured, tensor_bytes(found) / samples, optimizer_slots(optimizers),
        optimizer_s_per_byte=optimizer_seconds_per_byte(optimizers, device),
        action_s={mode: action_overhead(device, mode) for mode in checkpoints},
        contention=max(processes / _cores(), 1.0) if device.type == "cpu" else 1.0,
    )  # fmt: skip


def optimizer_seconds_per_byte(
    optimizers: Sequence[torch.optim.Optimizer], device: torch.device, elements: int = 2**20, repeats: int = 5
) -> float:
    """Seconds per byte of parameters of a step of each optimizer's class and settings, timed on a probe tensor of
    ``elements`` floats (the median of ``repeats`` steps after one that builds the state), summed over optimizers."""
    total = 0.0
    for optimizer in optimizers:
        probe = torch.zeros(elements, device=device, requires_grad=True)
        probe.grad = torch.full_like(probe, 1e-3)
        trial = trial_optimizer(optimizer, probe)
        times = [_seconds(trial.step, device) for _ in range(repeats + 1)]
        total += statistics.median(times[1:]) / tensor_bytes([probe])
    return total


def measure_link(
    me: int, peer: int, device: torch.device, group: Optional[Any] = None, sizes: Sequence[int] = LINK_SIZES,
    repeats: int = 8,
) -> Optional[Link]:  # fmt: skip
    """The one-way cost of a message between global ranks ``me`` and ``peer``, fitted to ping-pongs of ``sizes``
    bytes (the median of ``repeats`` round trips, halved). Both ranks call it; the lower one gets the link, the other
    None. Point-to-point, as the pipeline's own messages are."""
    first = me < peer
    times: list[float] = []
    for size in sizes:
        buffer = torch.zeros(max(size // 4, 1), dtype=torch.float32, device=device)

        def trip(buffer: torch.Tensor = buffer) -> None:
            if first:
                dist.send(buffer, peer, group=group)
                dist.recv(buffer, peer, group=group)
            else:
                dist.recv(buffer, peer, group=group)
                dist.send(buffer, peer, group=group)

        trips = [_seconds(trip, device) for _ in range(repeats + 1)]
        times.append(statistics.median(trips[1:]) / 2)
    return Link.fit([4 * max(s // 4, 1) for s in sizes], times) if first else None


def measure_floor(
    stage: int, k: int, device: torch.device, group: Optional[Any] = None, n: int = 8, steps: int = 3, blocks: int = 5,
) -> Optional[float]:  # fmt: skip
    """The pipeline's own time per action on this machine in its steady state: what a forward or a backward costs,
    its messages included, when its layers cost nothing and every stage is at work. Every stage of a pipeline
    (``group``, or the default group) calls it at once, as in training; the stages run the executor over one small
    layer each, F-then-B on ``n`` and on ``2n`` one-row micro-batches, ``steps`` steps of each side by side,
    ``blocks`` times after a warm-up. The ``n`` micro-batches more add ``2n`` actions to each stage's step, without
    the fill and drain (where fewer stages run at once) or what a step costs besides its actions. Stage 0, which
    ends each step, gets the median over the blocks of their time per action; the others get None."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4).to(device)
    link = StageLink(stage, k, device, group) if k > 1 else None
    executor = StageExecutor([layer], stage, k, device, link, "never", schedule=GPipe("never"))
    x = torch.randn(2 * n, 4, device=device)
    keys = [("floor",)] * (2 * n)  # one shape: one header, in the warm-up
    shorter = partial(_train_one_row_each, executor, x, n, keys[:n])
    longer = partial(_train_one_row_each, executor, x, 2 * n, keys)
    shorter()
    longer()
    added = []
    for _ in range(blocks):  # side by side, so that the host's slow drift cancels
        base = _seconds(shorter, device, steps)
        added.append(_seconds(longer, device, steps) - base)
    return max(statistics.median(added), 0.0) / (2 * n) if stage == 0 else None


def action_overhead(device: torch.device, checkpoint: str, n: int = 16, repeats: int = 5) -> float:
    """Seconds the stage executor adds to each forward and each backward action, beyond the layers' own time:
    a one-stage executor over a small layer runs ``n`` one-row micro-batches, against the same layer called ``n``
    times by plain autograd (medians of ``repeats`` after a warm-up; never below 0)."""
    layer = nn.Linear(4, 4).to(device)
    x = torch.randn(n, 4, device=device)
    executor = StageExecutor([layer], 0, 1, device, None, checkpoint, schedule=GPipe(checkpoint))

    pipelined = partial(_train_one_row_each, executor, x, n)

    def plain() -> None:
        for row in x.split(1):
            layer(row).sum().backward()

    timed: dict = {fn: [] for fn in (pipelined, plain)}
    for _ in range(repeats + 1):
        for fn, times in timed.items():
            times.append(_seconds(fn, device))
    extra = statistics.median(timed[pipelined][1:]) - statistics.median(timed[plain][1:])
    return max(extra, 0.0) / (2 * n)


def _train_one_row_each(
    executor: StageExecutor, x: torch.Tensor, m: int, keys: Optional[Sequence[Any]] = None
) -> None:
    """One training step of ``executor``'s stage on the first ``m`` rows of ``x``, a micro-batch each; the last
    stage's outputs get gradients of ones."""
    outputs = executor.forward(split(x[:m], m) if executor.is_first else None, m, train=True, keys=keys)
    if executor.is_last:
        torch.autograd.backward(list(outputs), [torch.ones_like(y) for y in outputs])  # type: ignore[arg-type]
    executor.backward()


def _seconds(fn: Any, device: torch.device, times: int = 1) -> float:
    """Seconds per call of ``fn``, over ``times`` calls, the device's queued work included."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(times):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / times


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _first_rows(batch: Any, rows: int) -> Any:
    return _map(batch, lambda t: t.narrow(0, 0, rows))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
