"""Measured balance (``balance="time"`` or ``"memory"``): a sample micro-batch, the layers profiled on it, one answer
for every rank."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.optim import Optimizer

from lightning_gpipe.engine.microbatch import split
from lightning_gpipe.engine.rng import rank_random_state, set_rank_random_state
from lightning_gpipe.errors import BalanceError
from lightning_gpipe.integration.logs import muted_logs
from lightning_gpipe.integration.report import BalanceReport
from lightning_gpipe.model.partition import PROFILED_RULES, resolve_balance
from lightning_gpipe.model.profile import optimizer_slots, profile_layers
from lightning_gpipe.parallel.collectives import Failure
from lightning_gpipe.patching import patched

__all__ = ["profiled_balance", "decided_by_global_zero", "sample_microbatch", "sample_input", "input_of_step", "untouched_random"]


def profiled_balance(
    strategy: Any, module: LightningModule, seq: nn.Sequential, fitting: bool, optimizers: list[Optimizer]
) -> tuple[list[int], Optional[BalanceReport]]:
    """Global rank 0 measures every layer on a sample micro-batch and splits; every rank takes its answer."""
    k, chunks = strategy.topology.k, strategy.config.chunks
    resolve_balance("uniform", seq, k, chunks)  # enough layers for K*v stages, checked on every rank
    if k == 1:
        return [len(seq)], None
    # Every rank draws the sample, so whatever drawing it does to the data loader, it does everywhere.
    sample = sample_microbatch(strategy, module, fitting)
    report: BalanceReport = decided_by_global_zero(strategy, lambda: _measure(strategy, seq, sample, optimizers))
    return report.balance, report


def decided_by_global_zero(strategy: Any, decide: Callable[[], Any]) -> Any:
    """``decide()`` on global rank 0, its answer on every rank; its error, if it raised, raised on every rank
    instead of leaving the others waiting for an answer."""
    outcome: Any = None
    if strategy.is_global_zero:
        try:
            outcome = decide()
        except Exception as error:
            outcome = Failure.of(error)
    outcome = strategy.broadcast(outcome)
    if isinstance(outcome, Failure):
        raise outcome.error
    return outcome


def _measure(strategy: Any, seq: nn.Sequential, sample: Any, optimizers: list[Optimizer]) -> BalanceReport:
    config = strategy.config
    with strategy.precision_plugin.train_step_context():  # autocast, as in training
        costs = profile_layers(list(seq._modules.values()), sample, strategy.root_device)
    if config.balance == "time":
        per_layer = costs.seconds
    else:
        held = config.microbatches if config.checkpoint == "never" else 1
        per_layer = costs.memory(optimizer_slots(optimizers), held)
    stages = strategy.topology.k * config.chunks
    return BalanceReport.of(config.balance, per_layer, stages, config.microbatches, costs)


def sample_microbatch(strategy: Any, module: LightningModule, fitting: bool) -> Any:
    """The first micro-batch of what ``self(x)`` gets (see :func:`sample_input`)."""
    return split(sample_input(strategy, module, fitting), strategy.config.microbatches)[0]


def sample_input(strategy: Any, module: LightningModule, fitting: bool) -> Any:
    """What ``self(x)`` gets for a whole batch. When fitting: the first training batch passed through the user's
    ``training_step`` up to ``self(x)``; otherwise ``example_input_array``.

    Random streams, including the data loaders' own generators, are left as they were, so a profiled run
    shuffles as any other does."""
    if not fitting:
        x = module.example_input_array
        if x is None:
            config = strategy.config
            asked = [f"balance={config.balance!r}"] if config.balance in PROFILED_RULES else []
            remedies = ["the balance as a list of layer counts"] if asked else []
            if config.microbatches == "auto":
                asked, remedies = asked + ["microbatches='auto'"], remedies + ["microbatches as a number"]
            raise BalanceError(
                f"GPipeStrategy({', '.join(asked)}) profiles the layers on a sample input: set"
                f" {type(module).__name__}.example_input_array, or pass {' and '.join(remedies)}"
            )
        return x
    loaders = module.trainer.fit_loop._data_source.dataloader()
    with untouched_random(loaders, strategy.root_device):
        batch, batch_idx, _ = next(iter(CombinedLoader(loaders, "max_size_cycle")))
        return input_of_step(module, strategy.batch_to_device(batch), batch_idx)


class _StepInput(BaseException):
    """Carries the input of ``self(x)`` out of a user's step that is only run to find it."""


def input_of_step(module: Any, batch: Any, batch_idx: int) -> Any:
    """What the LightningModule's ``training_step(batch, batch_idx)`` passes to ``self(x)``; the rest of the
    step does not run, and nothing it logs is kept."""

    def capture(x: Any, *args: Any, **kwargs: Any) -> Any:
        raise _StepInput(x)

    with patched(module, "forward", capture), muted_logs(module):
        try:
            module.training_step(batch, batch_idx)
        except _StepInput as found:
            return found.args[0]
    raise RuntimeError(
        f"GPipeStrategy: {type(module).__name__}.training_step never called self(...), so balance cannot be"
        " profiled on its input"
    )


@contextmanager
def untouched_random(loaders: Any, device: torch.device) -> Iterator[None]:
    """Every random stream, the data loaders' own generators included, as it was before the block."""
    state = rank_random_state(device)
    generators = [(g, g.get_state()) for g in _generators(loaders)]
    try:
        yield
    finally:
        set_rank_random_state(state, device)
        for generator, saved in generators:
            generator.set_state(saved)


def _generators(loaders: Any) -> list[torch.Generator]:
    """The random generators of data loaders (and their samplers), wherever they sit in ``loaders``."""
    if isinstance(loaders, Mapping):
        return [g for value in loaders.values() for g in _generators(value)]
    if isinstance(loaders, (list, tuple)):
        return [g for value in loaders for g in _generators(value)]
    found: list[torch.Generator] = []
    batch_sampler = getattr(loaders, "batch_sampler", None)
    for owner in (loaders, getattr(loaders, "sampler", None), getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found
