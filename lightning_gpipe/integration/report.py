"""Turning the stages' measurements of an observed step into scalars, a schedule picture and a trace."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_gpipe.checkpointing.state import unwrapped
from lightning_gpipe.instrument.memory import host_peak_bytes, optimizer_state_bytes, tensor_bytes
from lightning_gpipe.instrument.timeline import (
    COMPUTE,
    Event,
    bubble,
    chrome_trace,
    draw_schedule,
    makespan,
    theoretical_bubble,
)
from lightning_gpipe.integration.contract import stage_parameters
from lightning_gpipe.model.partition import stage_layers
from lightning_gpipe.model.profile import LayerCosts, predicted_efficiency
from lightning_gpipe.parallel.collectives import gather_pipeline
from lightning_gpipe.schedule.split import optimal_split, uniform_split

__all__ = ["StageReport", "summarize", "Reporter", "BalanceReport", "start_observing", "publish_observed"]


@dataclass
class StageReport:
    """What one stage measured during an observed training step."""

    stage: int
    events: list[Event]
    activation_bytes_peak: int
    param_bytes: int
    optimizer_bytes: int
    cuda_max_allocated: Optional[int] = None
    host_peak_bytes: Optional[int] = None  # the process's peak resident memory so far (None where unknown)


def summarize(reports: Sequence[StageReport], m: int, samples: int, chunks: int = 1) -> dict[str, float]:
    """Scalars for the logger: measured and theoretical bubble (``chunks`` of the model per rank), per-stage compute,
    waits and memory."""
    k = len(reports)
    events = [e for r in reports for e in r.events]
    overall, per_stage = bubble(events, k)
    span = makespan(events)
    scalars = {
        "pipeline/bubble_measured": overall,
        "pipeline/bubble_theory": theoretical_bubble(k, m, chunks),
        "pipeline/step_s": span,
        "pipeline/samples_per_s": samples / span,
    }
    for r in reports:
        j = r.stage
        scalars[f"pipeline/bubble_measured_stage{j}"] = per_stage[j]
        scalars[f"pipeline/compute_s_stage{j}"] = sum(e.duration for e in r.events if e.kind in COMPUTE)
        scalars[f"pipeline/comm_wait_s_stage{j}"] = sum(e.duration for e in r.events if e.kind not in COMPUTE)
        averaged = [e.duration for e in r.events if e.kind == "allreduce"]
        if averaged:  # data-parallel replicas: the wait for this stage's gradient average
            scalars[f"pipeline/allreduce_s_stage{j}"] = sum(averaged)
        gathered = [e.duration for e in r.events if e.kind == "allgather"]
        if gathered:  # shard="full": the wait for this stage's parameters, gathered whole
            scalars[f"pipeline/allgather_s_stage{j}"] = sum(gathered)
        scalars[f"memory/activation_bytes_peak_stage{j}"] = r.activation_bytes_peak
        scalars[f"memory/param_bytes_stage{j}"] = r.param_bytes
        scalars[f"memory/optimizer_bytes_stage{j}"] = r.optimizer_bytes
        if r.cuda_max_allocated is not None:
            scalars[f"memory/cuda_max_allocated_stage{j}"] = r.cuda_max_allocated
        if r.host_peak_bytes is not None:
            scalars[f"memory/host_peak_bytes_stage{j}"] = r.host_peak_bytes
    return scalars


class Reporter:
    """Publishes observed steps on global rank 0: scalars to every logger, the schedule picture to
    TensorBoard, and all observed steps so far as a Chrome trace in the log folder."""

    def __init__(self) -> None:
        self.steps: dict[int, list[Event]] = {}

    def publish(
        self, trainer: Any, reports: Sequence[StageReport], m: int, samples: int, chunks: int = 1
    ) -> dict[str, float]:
        step = trainer.global_step
        scalars = summarize(reports, m, samples, chunks)
        events = [e for r in reports for e in r.events]
        self.steps[step] = events
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if hasattr(getattr(logger, "experiment", None), "add_figure"):
                title = (f"step {step}: K={len(reports)}, M={m}, bubble {scalars['pipeline/bubble_measured']:.2f}"
                         f" (theory {scalars['pipeline/bubble_theory']:.2f})")  # fmt: skip
                logger.experiment.add_figure("pipeline/schedule", draw_schedule(events, len(reports), title), step)
        # Not trainer.log_dir: it broadcasts, and only this rank is here.
        folder = next((logger.log_dir for logger in trainer.loggers if getattr(logger, "log_dir", None)), None)
        folder = Path(folder or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        chrome_trace(self.steps, folder / "pipeline_trace.json")
        return scalars


@dataclass
class BalanceReport:
    """The balance a measured rule chose, what each stage is predicted to cost, and the uniform split beside it."""

    rule: str
    balance: list[int]
    stage_costs: list[float]  # seconds per micro-batch (time) or bytes (memory)
    efficiency: float  # predicted from the measured times: M * sum(t) / (K * (M + K - 1) * max(t))
    uniform: list[int]
    uniform_costs: list[float]
    uniform_efficiency: float
    m: int

    @classmethod
    def of(cls, rule: str, layer_costs: Sequence[float], k: int, m: int, measured: LayerCosts) -> BalanceReport:
        uniform = uniform_split(len(layer_costs), k)
        balance = optimal_split(layer_costs, k)

        def per_stage(costs: Sequence[float], counts: Sequence[int]) -> list[float]:
            return [sum(costs[i] for i in stage_layers(counts, j)) for j in range(len(counts))]

        def efficiency(counts: Sequence[int]) -> float:
            return predicted_efficiency(per_stage(measured.seconds, counts), m)

        return cls(rule, balance, per_stage(layer_costs, balance), efficiency(balance),
                   uniform, per_stage(layer_costs, uniform), efficiency(uniform), m)  # fmt: skip

    def text(self) -> str:
        if self.rule == "time":
            unit, scale, what = "ms", 1e3, "forward+backward per micro-batch"
        else:
            unit, scale, what = "MiB", 1 / 2**20, "weights, gradients, optimizer state and activations"
        show = lambda costs: ", ".join(f"{c * scale:.2f}" for c in costs)  # noqa: E731
        return (
            f"balance={self.rule!r} chose balance={self.balance}; copy it into balance=... to reuse it.\n"
            f"Stage costs ({unit}, {what}): {show(self.stage_costs)}; predicted pipeline efficiency"
            f" {self.efficiency:.2f} at M={self.m}.\n"
            f"Uniform {self.uniform} would cost {show(self.uniform_costs)}, efficiency {self.uniform_efficiency:.2f}."
        )

    def publish(self, trainer: Any) -> None:
        """Log the report, and put it in TensorBoard's text tab (call on global rank 0)."""
        text = self.text()
        rank_zero_info("GPipeStrategy: " + text.replace("\n", " "))
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text("pipeline/balance", text.replace("\n", "  \n"), 0)


def start_observing(strategy: Any, run: Any, kept: Any) -> None:
    """Start timing and metering this step if it is one to observe (the same decision on every rank)."""
    every, step = strategy.config.observe_every_n_steps, run.module.trainer.global_step
    if not every or step == 0 or step % every or step == kept.observed_step:
        return
    kept.observed_step, run.observing = step, True
    if strategy.root_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(strategy.root_device)
    run.executor.meter.start(stage_parameters(run.module))
    strategy.barrier()  # a common start, so the stages' timelines line up
    run.executor.timeline.start()


def publish_observed(strategy: Any, run: Any, kept: Any) -> None:
    """Gather what every stage measured in the observed step and publish it from global rank 0."""
    executor, device, parameters = run.executor, strategy.root_device, stage_parameters(run.module)
    run.observing = False
    report = StageReport(
        stage=executor.stage,
        events=executor.timeline.stop(),
        activation_bytes_peak=executor.meter.stop(),
        param_bytes=tensor_bytes(parameters),
        optimizer_bytes=sum(optimizer_state_bytes(unwrapped(o)) for o in strategy.optimizers),
        cuda_max_allocated=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        host_peak_bytes=host_peak_bytes(),
    )
    topology = strategy.topology
    if topology.replica != 0:  # the first replica's steps stand for all
        return
    reports = gather_pipeline(report, topology)
    if strategy.is_global_zero:
        call = run.flow.call
        kept.reporter.publish(run.module.trainer, reports, call.n, call.samples, strategy.config.chunks)
