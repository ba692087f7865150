"""Measuring each layer's cost on a sample micro-batch, for ``balance="time"`` and ``balance="memory"``."""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_gpipe.checkpointing.state import unwrapped
from lightning_gpipe.engine.microbatch import _map, as_tuple, batch_size
from lightning_gpipe.engine.p2p import carries_grad
from lightning_gpipe.engine.skip import SkipTracker, use_tracker
from lightning_gpipe.instrument.memory import ActivationMeter, optimizer_state_bytes, tensor_bytes

__all__ = ["LayerCosts", "profile_layers", "fastest_pass", "predicted_efficiency", "optimizer_slots", "trial_optimizer"]


@dataclass
class LayerCosts:
    """Per layer: forward plus backward seconds on the sample (the median of its fastest pass), and the bytes it holds
    in training."""

    seconds: list[float]
    param_bytes: list[int]  # trainable parameters, counted once each for the weights, the gradients ...
    activation_bytes: list[int]  # ... and what autograd saves for backward for one sample micro-batch
    forward: list[float] = field(default_factory=list)  # of ``seconds``, the forward's share (median)
    output_bytes: list[int] = field(default_factory=list)  # what the layer returns for the sample
    rows: int = 0  # samples in the sample micro-batch
    cpu_share: list[float] = field(default_factory=list)  # of ``seconds``, the share this process's CPU was busy

    @property
    def backward(self) -> list[float]:
        """Seconds of each layer's backward: the rest of ``seconds``."""
        return [total - forward for total, forward in zip(self.seconds, self.forward)]

    def memory(self, optimizer_slots: float, held_microbatches: int) -> list[float]:
        """Bytes per layer: weights, gradients, ``optimizer_slots`` optimizer copies, and the activations of
        ``held_microbatches`` micro-batches (M without re-materialization, 1 with it)."""
        return [
            p * (2 + optimizer_slots) + a * held_microbatches for p, a in zip(self.param_bytes, self.activation_bytes)
        ]


def profile_layers(
    layers: Sequence[nn.Module], sample: Any, device: torch.device, repeats: int = 5, passes: int = 3
) -> LayerCosts:
    """Time and meter each layer's forward and backward in training mode, one layer at a time on ``device``.

    Each layer gets the previous layer's output on ``sample``. Layers go back where they were, with their
    gradients, buffers (batch-norm statistics) and every random stream as before: profiling changes nothing.
    Every layer is timed ``repeats`` times in each of ``passes`` passes over all layers, and its time is the median
    of its fastest pass: a machine slowed for a while (a shared host) only ever adds time, so a spell must last
    every pass to bias a layer, and otherwise slows no layer more than another.
    """
    if repeats < 1 or passes < 1:
        raise ValueError(f"profiling needs at least 1 repetition and 1 pass, got repeats={repeats}, passes={passes}")
    per_pass: list[LayerCosts] = []
    params: list[int] = []
    activations: list[int] = []
    outputs: list[int] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type), use_tracker(SkipTracker(keep=True)):
        for first_pass in [True] + [False] * (passes - 1):
            x = _to(sample, device)
            runs = []  # per layer: (forward, backward, CPU) seconds of each timed run
            for layer in layers:  # a skip stashed by one layer waits for the layer that pops it
                if any(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()]):
                    layer = _stand_in(layer, device)  # built without storage: measured on a copy, one at a time
                with _visiting(layer, device):
                    runs.append([_forward_backward(layer, x, device) for _ in range(repeats + 1)][1:])  # 1 warm-up
                    if first_pass:
                        activations.append(_saved_bytes(layer, x))
                        params.append(tensor_bytes(p for p in layer.parameters() if p.requires_grad))
                    with torch.no_grad():
                        x = layer(x)
                    if first_pass:
                        outputs.append(_bytes_of(x))
            seconds = [statistics.median(f + b for f, b, _ in r) for r in runs]
            forward = [statistics.median(f for f, _, _ in r) for r in runs]
            cpu = [min(statistics.median(c / (f + b) if f + b > 0 else 1.0 for f, b, c in r), 1.0) for r in runs]
            per_pass.append(LayerCosts(seconds, params, activations, forward, outputs, batch_size(sample), cpu))
    return fastest_pass(per_pass)


def fastest_pass(passes: Sequence[LayerCosts]) -> LayerCosts:
    """Per layer, its times in the pass that timed it fastest (forward plus backward): its seconds, forward and CPU
    share. The bytes are the first pass's (the same in every pass)."""
    first = passes[0]
    best = [min(passes, key=lambda costs: costs.seconds[i]) for i in range(len(first.seconds))]

    def pick(what: str) -> list[float]:
        return [getattr(costs, what)[i] for i, costs in enumerate(best)] if getattr(first, what) else []

    return dataclasses.replace(first, seconds=pick("seconds"), forward=pick("forward"), cpu_share=pick("cpu_share"))


def predicted_efficiency(stage_seconds: Sequence[float], m: int) -> float:
    """The share of the K devices' time spent computing when the slowest stage paces an F-then-B step of M
    micro-batches: ``M * sum(t) / (K * (M + K - 1) * max(t))``, which is M/(M+K-1) for equal stages."""
    k = len(stage_seconds)
    return m * sum(stage_seconds) / (k * (m + k - 1) * max(stage_seconds))


def optimizer_slots(optimizers: Sequence[torch.optim.Optimizer]) -> float:
    """How many parameter-sized tensors of state the optimizers keep (Adam 2, SGD with momentum 1), measured
    by stepping the same optimizer class, with the same settings, on a probe tensor."""
    slots = 0.0
    for optimizer in optimizers:
        probe = torch.zeros(4096, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        trial = trial_optimizer(optimizer, probe)
        trial.step()
        slots = max(slots, optimizer_state_bytes(trial) / tensor_bytes([probe]))
    return round(slots, 2)


def trial_optimizer(optimizer: torch.optim.Optimizer, probe: torch.Tensor) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class and settings over ``probe`` alone."""
    optimizer = unwrapped(optimizer)
    # ``defaults`` may hold settings the constructor does not take (AdamW's decoupled_weight_decay).
    accepted = inspect.signature(type(optimizer)).parameters
    return type(optimizer)([probe], **{k: v for k, v in optimizer.defaults.items() if k in accepted})


def _stand_in(layer: nn.Module, device: torch.device) -> nn.Module:
    """A copy of a meta-device layer with storage on ``device`` and small random values: its timings and sizes are
    those of the real layer."""
    copy = deepcopy(layer).to_empty(device=device)
    with torch.no_grad():
        for t in [*copy.parameters(), *copy.buffers()]:
            if t.is_floating_point():
                t.normal_(0.0, 0.02)
            else:
                t.zero_()
    return copy


@contextmanager
def _visiting(layer: nn.Module, device: torch.device) -> Iterator[None]:
    """``layer`` on ``device`` for the block; then back, with its gradients and buffers as they were."""
    home = next((t.device for t in [*layer.parameters(), *layer.buffers()]), device)
    grads = {p: p.grad for p in layer.parameters()}
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    training = layer.training
    layer.to(device).train()
    try:
        yield
    finally:
        layer.to(home).train(training)
        for p, grad in grads.items():
            p.grad = grad
        state = dict(layer.named_buffers())
        with torch.no_grad():
            for name, value in buffers.items():
                state[name].copy_(value)


def _forward_backward(layer: nn.Module, x: Any, device: torch.device) -> tuple[float, float, float]:
    """Seconds of ``layer``'s forward on ``x`` and of its backward (with making its output gradients, as
    ``balance="time"`` has always timed it), and the CPU seconds this process spent in them (all its threads)."""
    x = _leaves(x)
    _sync(device)
    cpu = time.process_time()
    start = time.perf_counter()
    outputs = [t for t in as_tuple(layer(x)) if t.requires_grad]
    _sync(device)
    middle = time.perf_counter()
    if outputs:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    _sync(device)
    end = time.perf_counter()
    return middle - start, end - middle, time.process_time() - cpu


def _saved_bytes(layer: nn.Module, x: Any) -> int:
    meter = ActivationMeter()
    meter.start(layer.parameters())
    with meter.saving():
        outputs = layer(_leaves(x))
    del outputs
    return meter.stop()


def _bytes_of(x: Any) -> int:
    found: list[torch.Tensor] = []
    _map(x, found.append)
    return tensor_bytes(found)


def _leaves(x: Any) -> Any:
    """Fresh leaves of ``x`` that collect gradients, as a stage's received input does."""
    return _map(x, lambda t: t.detach().requires_grad_(carries_grad(t)))


def _to(x: Any, device: torch.device) -> Any:
    return _map(x, lambda t: t.to(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
