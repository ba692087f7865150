"""``GPipeStrategy(microbatches="auto")``: global rank 0 profiles the model on the first batch at every candidate M's
micro-batch size, predicts each candidate, and every rank takes the advisor's choice within the memory budget: the
fastest, or of those predicted within 5% of it, the fewest micro-batches."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer

from lightning_gpipe.advisor.choose import Advice, advise, candidate_balance, microbatch_choices, parse_budget
from lightning_gpipe.advisor.costs import Candidate, Link
from lightning_gpipe.advisor.measure import measure_floor, measure_link, profile_model
from lightning_gpipe.engine.microbatch import batch_size
from lightning_gpipe.integration.balancing import decided_by_global_zero, sample_input
from lightning_gpipe.integration.report import BalanceReport
from lightning_gpipe.model.partition import PROFILED_RULES, resolve_balance

__all__ = ["AUTO", "HOST_SHARE", "choose_microbatches", "memory_budget"]

AUTO = "auto"
#: On CPU, the default budget per process: this share of the machine's physical memory, split between its processes.
HOST_SHARE = 0.8


@dataclass
class _Choice:
    advice: Advice
    balance_report: Optional[BalanceReport]  # the chosen candidate's, when the balance rule is measured


def choose_microbatches(
    strategy: Any, kept: Any, module: LightningModule, seq: nn.Sequential, fitting: bool, optimizers: list[Optimizer]
) -> None:
    """Replace ``strategy.config``'s ``microbatches="auto"`` by the advisor's choice, the same on every rank (and a
    measured balance by the chosen candidate's). Raises :class:`~lightning_gpipe.advisor.AdvisorError` on every rank
    when nothing fits."""
    config, topology = strategy.config, strategy.topology
    k, chunks = topology.k, config.chunks
    measured = config.balance in PROFILED_RULES  # split again for each candidate; else the same for all
    checked = resolve_balance("uniform" if measured else config.balance, seq, k, chunks)  # on every rank alike
    fixed = None if measured else checked
    x = sample_input(strategy, module, fitting)  # every rank draws it, as the data loaders would
    link = _link(strategy) if k > 1 else Link()
    floor = _floor(strategy)
    choose = lambda: _choose(strategy, seq, x, optimizers, fixed, link, floor)  # noqa: E731
    outcome: _Choice = decided_by_global_zero(strategy, choose)
    chosen = outcome.advice.chosen.candidate
    strategy.config = dataclasses.replace(config, microbatches=chosen.m, memory_budget=None)
    kept.advice = outcome.advice
    if fixed is None:
        kept.balance, kept.balance_report = list(chosen.balance), outcome.balance_report
    if strategy.is_global_zero:
        _publish(module, outcome.advice)


def memory_budget(value: Any, device: torch.device, processes: int) -> int:
    """Bytes per process: ``value`` (a count or a string such as ``"24GiB"``), else the GPU's memory, else on CPU
    :data:`HOST_SHARE` of the physical memory split between this machine's ``processes``."""
    if value is not None:
        return parse_budget(value)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        raise ValueError(
            "GPipeStrategy(microbatches='auto'): this platform does not report its physical memory; pass"
            " memory_budget (bytes per process, or a string such as '24GiB')"
        ) from None
    return int(HOST_SHARE * physical / max(processes, 1))


def _choose(
    strategy: Any, seq: nn.Sequential, x: Any, optimizers: list[Optimizer], fixed: Optional[list[int]], link: Link,
    floor: float,
) -> _Choice:  # fmt: skip
    config, k, chunks = strategy.config, strategy.topology.k, strategy.config.chunks
    batch = batch_size(x)
    choices = microbatch_choices(batch, k, chunks)
    if not choices:
        raise ValueError(
            f"GPipeStrategy(microbatches='auto', schedule='interleaved'): M must be a multiple of K={k}, but the first"
            f" batch has {batch} samples"
        )
    sizes = [math.ceil(batch / m) for m in choices]
    with strategy.precision_plugin.train_step_context():  # autocast, as in training
        profile = profile_model(
            list(seq._modules.values()), x, sizes, strategy.root_device, optimizers, [config.checkpoint],
            strategy.num_processes,
        )
    profile = dataclasses.replace(profile, floor_s=floor)
    rule = config.balance if fixed is None else fixed
    balances = [candidate_balance(rule, profile, m, config.checkpoint, k * chunks) for m in choices]
    candidates = [Candidate(m, config.checkpoint, config.schedule, b, chunks) for m, b in zip(choices, balances)]
    budget = memory_budget(config.memory_budget, strategy.root_device, strategy.num_processes)
    advice = advise(profile, k, candidates, budget, link)
    chosen = advice.chosen.candidate
    report = None
    if fixed is None:  # the measured balance's report, at the chosen size
        measured = profile.measured[sizes.index(math.ceil(batch / chosen.m))]
        per_layer = measured.seconds if config.balance == "time" else _memory(profile, measured, chosen)
        report = BalanceReport.of(config.balance, per_layer, k * chunks, chosen.m, measured)
    return _Choice(advice, report)


def _memory(profile: Any, measured: Any, chosen: Candidate) -> list[float]:
    return measured.memory(profile.optimizer_slots, chosen.m if chosen.checkpoint == "never" else 1)


def _link(strategy: Any) -> Link:
    """The first replica's stages 0 and 1 time their link; the others go on."""
    topology = strategy.topology
    first, second = topology.rank_of(0, 0), topology.rank_of(1, 0)
    rank = strategy.global_rank
    if rank not in (first, second):
        return Link()
    peer = second if rank == first else first
    return measure_link(rank, peer, strategy.root_device, topology.pipeline_group) or Link()


def _floor(strategy: Any) -> float:
    """Every stage of every replica runs the pipeline on layers that cost nothing, all at once as in training;
    stage 0 gets the time per action (:func:`~lightning_gpipe.advisor.measure.measure_floor`), the others 0."""
    topology = strategy.topology
    return measure_floor(topology.stage, topology.k, strategy.root_device, topology.pipeline_group) or 0.0


def _publish(module: LightningModule, advice: Advice) -> None:
    """The choice, the runners-up and why the rest were excluded: to the log and TensorBoard's text tab."""
    chosen = advice.chosen
    text = (
        f"microbatches='auto' chose M={chosen.candidate.m}: predicted {chosen.samples_per_s:.1f} samples/s, bubble"
        f" {chosen.bubble:.2f}, peak {max(chosen.peak_bytes) / 2**20:.1f} MiB per stage.\n\n{advice.table()}"
    )
    rank_zero_info("GPipeStrategy: " + text)
    trainer = module.trainer
    for logger in trainer.loggers:
        if hasattr(getattr(logger, "experiment", None), "add_text"):
            logger.experiment.add_text("pipeline/advisor", text.replace("\n\n", "  \n\n"), 0)
