"""One rank of the benchmark: runs every row of a K group in turn and measures it (started by benchmark.py).

Usage: python experiments/bench_worker.py SPEC.json, on K ranks with MASTER_ADDR, MASTER_PORT, WORLD_SIZE
and LOCAL_RANK set, as torchrun would. The process group is created once; every row reuses it. Each row
trains the same model on the same batch: ``warmup`` steps, then timed steps (nothing measured but the
clock), with every ``observe_every``-th step observed instead (timeline and activation meter on), so the
measurements never slow the timed steps. Every row runs ``rounds`` times, the rows in turn, so that slow
drifts of the machine's speed spread over all rows.
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
from lightning.pytorch.loggers import Logger

from experiments.bench_report import ALONE, VIRTUAL_STAGES
from experiments.models.emulated import EmulatedBlock
from lightning_gpipe import GPipeStrategy
from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.microbatch import merge, split
from lightning_gpipe.engine.p2p import StageLink
from lightning_gpipe.instrument.memory import ActivationMeter, state_bytes
from lightning_gpipe.instrument.timeline import bubble
from lightning_gpipe.schedule import GPipe, Interleaved1F1B, OneFOneB, Schedule, simulate

LR = 1e-3  # small enough that a few dozen SGD steps on random targets stay finite


# -- the model and its data ---------------------------------------------------------------------


class Block(nn.Module):
    """One layer of the benchmark MLP: Linear then ReLU, He-initialised so activations keep their scale."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.linear.weight, nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.linear(x))  # (B, width)


def build_net(width: int, depth: int, seconds_per_row: float = 0.0) -> nn.Sequential:
    """The whole model, identical on every rank and in every row; emulated blocks where ``seconds_per_row``."""
    torch.manual_seed(0)
    if seconds_per_row:
        return nn.Sequential(*[EmulatedBlock(width, seconds_per_row) for _ in range(depth)])
    return nn.Sequential(*[Block(width) for _ in range(depth)])


def make_batch(batch: int, width: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)


class BenchModule(L.LightningModule):
    """What a user would write: the MLP, a mean-squared-error loss, plain SGD."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


# -- what every rank knows ---------------------------------------------------------------------


@dataclass
class Context:
    """This rank's place and the settings shared by all rows of the group."""

    rank: int
    k: int
    device: torch.device
    width: int
    depth: int
    batch: int
    warmup: int
    observe_every: int
    steps: int
    traces: Path
    threads: int  # this rank's intra-op threads outside the rows that run alone
    seconds_per_row: float = 0.0  # each block's emulated forward cost per sample; 0 computes for real

    def net(self) -> nn.Sequential:
        return build_net(self.width, self.depth, self.seconds_per_row)

    def observed(self, step: int) -> bool:
        """The steps ``GPipeStrategy(observe_every_n_steps=observe_every)`` observes; every implementation observes these."""
        return step > 0 and step % self.observe_every == 0

    def timed_durations(self, ends: list[float]) -> list[float]:
        """Durations of the timed steps (after the warm-up, not observed): from the end of the step before to
        the end of the step. An observed step publishes before it ends, so the next step's time excludes it."""
        return [ends[s] - ends[s - 1] for s in range(max(self.warmup, 1), self.steps) if not self.observed(s)]

    def stage_layers(self, net: nn.Module, chunk: int = 0, chunks: int = 1) -> list[nn.Module]:
        """This rank's layers: of its ``chunk`` when it holds ``chunks`` (stage chunk * K + rank of K * chunks)."""
        per, stage = self.depth // (self.k * chunks), chunk * self.k + self.rank
        return list(net)[stage * per : (stage + 1) * per]


@dataclass
class Measured:
    """What one rank brings back from a row; rank 0 merges them."""

    durations: list[float]  # timed steps, seconds (rank 0's clock)
    bubbles: list[float] | None  # per observed step; None where no timeline exists
    activation: list[int]  # this rank's peak saved-activation bytes, per observed step
    activation_stages: list[int] | None = None  # filled on rank 0 when it already knows every stage's peak
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds (all its threads) per timed step
    state: int = 0  # the most training-state bytes (parameters, gradients, optimizer) held right after a step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- plain Lightning and GPipeStrategy -----------------------------------------------------------


class _MemoryLogger(Logger):
    """Keeps what is logged in memory: the strategy's observations arrive here on global rank 0."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append({key: float(value) for key, value in metrics.items()})


class _StepClock(L.Callback):
    """The end time of every training step and the process's CPU time then; on observed steps of ``single``, also
    the activation meter."""

    def __init__(self, ctx: Context, meter: ActivationMeter | None = None) -> None:
        self.ctx, self.meter = ctx, meter
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.peaks: list[int] = []
        self.state = 0
        self._saving = ExitStack()  # the meter's hooks, from the start of an observed step to its end

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.meter is not None and self.ctx.observed(batch_idx):
            self.meter.start(module.parameters())
            self._saving.enter_context(self.meter.saving())

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.meter is not None and self.meter.active:
            self._saving.close()
            self.peaks.append(self.meter.stop())
        _sync(self.ctx.device)
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if self.ctx.observed(batch_idx):  # an untimed step: what the process holds after it, between steps
            shards = getattr(getattr(trainer.strategy, "_run", None), "shards", None)
            held = state_bytes(module, trainer.optimizers, shards.shard_parameters() if shards is not None else ())
            self.state = max(self.state, held)

    def measured(self, bubbles: list[float] | None = None, stages: list[int] | None = None) -> Measured:
        """What the fit measured; ``stages``: every stage's activation peak, where this rank knows them."""
        return Measured(
            self.ctx.timed_durations(self.ends), bubbles, [max(stages)] if stages else self.peaks, stages,
            self.ctx.timed_durations(self.cpu_ends), self.state,
        )  # fmt: skip


def _fit(
    ctx: Context, strategy: Any, devices: int, clock: _StepClock, logger: Logger, root: Path, shard: slice = slice(None)
) -> None:
    x, y = make_batch(ctx.batch, ctx.width)
    x, y = x[shard], y[shard]  # data parallelism: this process's share of the batch
    loader = torch.utils.data.DataLoader([(x, y)] * ctx.steps, batch_size=None)
    trainer = L.Trainer(
        accelerator="gpu" if ctx.device.type == "cuda" else "cpu",
        devices=devices,
        strategy=strategy,
        max_steps=ctx.steps,
        logger=logger,
        callbacks=[clock],
        default_root_dir=root,
        use_distributed_sampler=False,  # every stage sees the same batches; a data-parallel rank its own shard
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(BenchModule(ctx.net()), loader)


def run_single(ctx: Context, row: dict) -> Measured:
    clock = _StepClock(ctx, ActivationMeter())
    _fit(ctx, "auto", 1, clock, _MemoryLogger(), ctx.traces / "single")
    return clock.measured(stages=[max(clock.peaks)])


def run_single_raw(ctx: Context, row: dict) -> Measured:
    """A plain PyTorch training loop on the whole model: what Lightning's own loop is measured against."""
    net = ctx.net().to(ctx.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    meter = ActivationMeter()
    x, y = (t.to(ctx.device) for t in make_batch(ctx.batch, ctx.width))

    def step(observe: bool) -> int | None:
        if observe:
            meter.start(net.parameters())
        optimizer.zero_grad(set_to_none=True)
        with meter.saving():
            F.mse_loss(net(x), y).backward()
        optimizer.step()
        return meter.stop() if observe else None

    durations, cpu, peaks = _loop(ctx, step)
    return Measured(durations, None, peaks, [max(peaks)], cpu)


def run_ddp(ctx: Context, row: dict) -> Measured:
    """Lightning's DDP on the K processes: each holds the whole model and takes batch / K of the same batch."""
    from lightning.pytorch.strategies import DDPStrategy

    per = ctx.batch // ctx.k
    clock = _StepClock(ctx, ActivationMeter())
    shard = slice(ctx.rank * per, (ctx.rank + 1) * per)
    _fit(ctx, DDPStrategy(), ctx.k, clock, _MemoryLogger(), ctx.traces / f"ddp_k{ctx.k}", shard)
    return clock.measured()


def run_gpipe(ctx: Context, row: dict) -> Measured:
    """GPipeStrategy on the K processes; with ``row["dp"]`` = D, D replicas of K/D stages, each on its share of
    the batch (the first replica's K/D processes report the pipeline's measurements)."""
    d = row.get("dp", 1)
    k = ctx.k // d
    schedule = {"gpipe_1f1b": "1f1b", "gpipe_interleaved": "interleaved"}.get(row["impl"], "gpipe")
    v = VIRTUAL_STAGES if schedule == "interleaved" else 1
    strategy = GPipeStrategy(
        microbatches=row["m"],
        schedule=schedule,
        balance=[ctx.depth // (k * v)] * (k * v),
        checkpoint=row["checkpoint"],
        sequential="net",
        observe_every_n_steps=ctx.observe_every,
        data_parallel_size=d,
        virtual_stages=v if v > 1 else None,
        shard=row.get("shard", "none"),
    )
    per = ctx.batch // d
    shard = slice(ctx.rank // k * per, (ctx.rank // k + 1) * per)  # this replica's share
    clock, logger = _StepClock(ctx), _MemoryLogger()
    _fit(ctx, strategy, ctx.k, clock, logger, ctx.traces / f"{row['impl']}_k{ctx.k}_m{row['m']}_{row['checkpoint']}", shard)
    if ctx.rank != 0:
        return clock.measured()
    observed = [r for r in logger.records if "pipeline/bubble_measured" in r]
    stages = [max(int(r[f"memory/activation_bytes_peak_stage{j}"]) for r in observed) for j in range(k)]
    return clock.measured([r["pipeline/bubble_measured"] for r in observed], stages)


# -- without Lightning: this project's executor and torch.distributed.pipelining -----------------


def _loop(ctx: Context, step: Callable[[bool], Any | None]) -> tuple[list[float], list[float], list[Any]]:
    """Run ``ctx.steps`` steps; ``step(observed)`` returns what an observed step measured. Returns the timed steps'
    durations and CPU times (see :class:`Measured`), and the observations."""
    ends, cpu_ends, observations = [], [], []
    for s in range(ctx.steps):
        result = step(ctx.observed(s))
        _sync(ctx.device)
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())
        if ctx.observed(s):
            observations.append(result)
    return ctx.timed_durations(ends), ctx.timed_durations(cpu_ends), observations


def run_executor(ctx: Context, row: dict) -> Measured:
    layers = [layer.to(ctx.device) for layer in ctx.stage_layers(ctx.net())]
    params = [p for layer in layers for p in layer.parameters()]
    link = StageLink(ctx.rank, ctx.k, ctx.device) if ctx.k > 1 else None
    executor = StageExecutor(layers, ctx.rank, ctx.k, ctx.device, link, row["checkpoint"])
    optimizer = torch.optim.SGD(params, lr=LR)
    x, y = (t.to(ctx.device) for t in make_batch(ctx.batch, ctx.width))
    m = row["m"]

    def step(observe: bool) -> tuple[list, int] | None:
        if observe:
            executor.meter.start(params)
            _barrier(ctx)
            executor.timeline.start()
        optimizer.zero_grad(set_to_none=True)
        outputs = executor.forward(split(x, m) if executor.is_first else None, m, train=True)
        if executor.is_last:
            F.mse_loss(merge(outputs), y).backward()  # type: ignore[arg-type]
        executor.backward()
        optimizer.step()
        if observe:
            return executor.timeline.stop(), executor.meter.stop()
        return None

    durations, cpu, observations = _loop(ctx, step)
    events_per_step = _gather([events for events, _ in observations], ctx)
    bubbles = None
    if ctx.rank == 0:
        bubbles = [bubble([e for rank in events_per_step for e in rank[s]], ctx.k)[0] for s in range(len(observations))]
    return Measured(durations, bubbles, [peak for _, peak in observations], cpu=cpu)


def run_torch(ctx: Context, row: dict) -> Measured:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    v = VIRTUAL_STAGES if row["impl"] == "torch_interleaved" else 1
    net = ctx.net()
    modules = [nn.Sequential(*ctx.stage_layers(net, c, v)).to(ctx.device) for c in range(v)]
    stages = [PipelineStage(mod, c * ctx.k + ctx.rank, ctx.k * v, ctx.device) for c, mod in enumerate(modules)]
    # scale_grads (the default) divides by M: with a per-micro-batch mean loss, the full batch's mean.
    if v > 1:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=row["m"], loss_fn=F.mse_loss)
    else:
        kind = {"torch_gpipe": ScheduleGPipe, "torch_1f1b": Schedule1F1B}[row["impl"]]
        schedule = kind(stages[0], n_microbatches=row["m"], loss_fn=F.mse_loss)
    stage_module = nn.ModuleList(modules)
    optimizer = torch.optim.SGD(stage_module.parameters(), lr=LR)
    meter = ActivationMeter()
    x, y = (t.to(ctx.device) for t in make_batch(ctx.batch, ctx.width))
    first, last = ctx.rank == 0, ctx.rank == ctx.k - 1

    def step(observe: bool) -> int | None:
        if observe:
            meter.start(stage_module.parameters())
        optimizer.zero_grad(set_to_none=True)
        with meter.saving():
            args = (x,) if first else ()
            schedule.step(*args, target=y if last else None)
        optimizer.step()
        return meter.stop() if observe else None

    durations, cpu, peaks = _loop(ctx, step)
    return Measured(durations, None, peaks, cpu=cpu)


RUNNERS: dict[str, Callable[[Context, dict], Measured]] = {
    "single": run_single,
    "single_raw": run_single_raw,
    "gpipe": run_gpipe,
    "gpipe_dp": run_gpipe,
    "gpipe_fsdp": run_gpipe,
    "gpipe_1f1b": run_gpipe,
    "executor": run_executor,
    "ddp": run_ddp,
    "torch_gpipe": run_torch,
    "torch_1f1b": run_torch,
    "gpipe_interleaved": run_gpipe,
    "torch_interleaved": run_torch,
}


# -- one row, all rows ---------------------------------------------------------------------------


def _barrier(ctx: Context) -> None:
    if ctx.k > 1:
        dist.barrier()


def _gather(obj: Any, ctx: Context) -> list[Any]:
    """``obj`` of every rank on rank 0 (``[]`` elsewhere)."""
    if ctx.k == 1:
        return [obj]
    box: list[Any] | None = [None] * ctx.k if ctx.rank == 0 else None
    dist.gather_object(obj, box, dst=0)
    return box or []


def _peak_rss_reset() -> None:
    """Restart the kernel's count of this process's peak resident memory (VmHWM), where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def measure_row(ctx: Context, row: dict) -> dict | None:
    """Run one row once on every rank; rank 0 returns what every rank measured, the others ``None``.

    ``single`` and ``single_raw`` run on rank 0 alone, with ``row["threads"]`` (every core); the other ranks
    wait at the barrier after it, which holds no CPU.
    """
    gc.collect()
    _barrier(ctx)
    _peak_rss_reset()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    alone = row["impl"] in ALONE
    torch.set_num_threads(row["threads"])
    try:
        measured = RUNNERS[row["impl"]](ctx, row) if ctx.rank == 0 or not alone else Measured([], None, [])
    finally:
        torch.set_num_threads(ctx.threads)
    local = {
        "activation": max(measured.activation, default=0),
        "cpu": statistics.median(measured.cpu) if measured.cpu else None,
        "rss": _peak_rss(),
        "cuda": torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None,
        "state": measured.state,
    }
    ranks = _gather(local, ctx)
    _barrier(ctx)
    ranks = ranks[:1] if alone else ranks
    if ctx.rank != 0:
        return None
    return {
        "durations": measured.durations,
        "bubbles": measured.bubbles,
        "stages": measured.activation_stages or [r["activation"] for r in ranks],
        "rss": max(r["rss"] for r in ranks),
        "cuda": None if ctx.device.type != "cuda" else max(r["cuda"] for r in ranks),
        "cpu": [r["cpu"] for r in ranks],
        "state": max(r["state"] for r in ranks),
    }


def limit_step_s(row: dict, forward_s: float) -> float:
    """The exact step time of ``row`` on the emulated device, whose model's forward over the whole batch takes
    ``forward_s`` (backward twice that, recompute once more) and whose messages are free: for a pipeline, its
    schedule's ideal timeline (:func:`lightning_gpipe.schedule.simulate`; M+K-1 slots of one micro-batch for
    F-then-B and 1F1B)."""
    k, m = row["k"], row["m"]
    per_pass = 4 if row["checkpoint"] == "always" else 3  # forward, backward (2), and the recompute
    if row["impl"] in ("single", "single_raw"):
        return per_pass * forward_s
    if row["impl"] == "ddp":
        return per_pass * forward_s / k
    d = row.get("dp", 1)  # replicas, each a pipeline of k / d stages on batch / d
    k //= d
    if row["impl"] in ("gpipe_interleaved", "torch_interleaved"):
        schedule: Schedule = Interleaved1F1B(row["checkpoint"], VIRTUAL_STAGES)
    else:
        schedule = (OneFOneB if row["impl"] in ("gpipe_1f1b", "torch_1f1b") else GPipe)(row["checkpoint"])
    unit = forward_s / (d * k * m)  # one stage's forward of one micro-batch
    return simulate(schedule, k, m, forward=1.0, backward=2.0).makespan * unit


def combine(row: dict, runs: list[dict], batch: int, forward_s: float = 0.0) -> dict:
    """One row's result from its runs (rounds).

    A run's step time is the median of its timed steps; the row's is the fastest run's. Other work on a
    shared machine only ever slows a run, often for seconds at a time, so the fastest round is the one least
    disturbed; every implementation is treated the same way. Bubble: the median over all observed steps.
    """
    rounds = [statistics.median(run["durations"]) for run in runs]
    bubbles = None if runs[0]["bubbles"] is None else [b for run in runs for b in run["bubbles"]]
    stages = [max(column) for column in zip(*(run["stages"] for run in runs))]
    result = {
        **row,
        "samples_per_s": batch / min(rounds),
        "step_s": min(rounds),
        "step_s_rounds": rounds,
        "step_s_all": [d for run in runs for d in run["durations"]],
        "bubble_measured": None if bubbles is None else statistics.median(bubbles),
        "bubble_measured_all": bubbles,
        "activation_bytes_max": max(stages),
        "activation_bytes_stages": stages,
        "rss_max_bytes": max(run["rss"] for run in runs),
        "state_max_bytes": max(run["state"] for run in runs),  # the most any process held between steps
        # each process's CPU time per timed step, all its threads (gloo's included): the median over rounds of
        # each round's median; a slower machine phase changes it far less than the step's time
        "cpu_step_s_ranks": [statistics.median(column) for column in zip(*(run["cpu"] for run in runs))],
    }
    if runs[0]["cuda"] is not None:
        result["cuda_max_allocated_bytes"] = max(run["cuda"] for run in runs)
    if forward_s:
        result["limit_samples_per_s"] = batch / limit_step_s(row, forward_s)
    return result


def main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    rank, k = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    warnings.filterwarnings("ignore", module="lightning")
    # A group of one too where pipelines run: PipelineStage asks the process group for its rank.
    grouped = k > 1 or any(row["impl"] != "single" for row in spec["rows"])
    if grouped:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=k)
    model = spec["model"]
    forward_s = model.get("emulate_forward_s", 0.0)  # the whole model's forward over the batch, when emulated
    ctx = Context(rank=rank, k=k, device=device, width=model["width"], depth=model["depth"], batch=model["batch"],
                  warmup=spec["warmup"], observe_every=spec["observe_every"], steps=spec["steps"],
                  traces=Path(spec["traces"]), threads=spec["threads"], seconds_per_row=forward_s / (model["depth"] * model["batch"]))  # fmt: skip
    runs: list[list[dict]] = [[] for _ in spec["rows"]]
    try:
        for turn in range(spec["rounds"]):
            for row, done in zip(spec["rows"], runs):
                start = time.perf_counter()
                run = measure_row(ctx, row)
                if run is not None:
                    done.append(run)
                    print(f"round {turn}: {row} {statistics.median(run['durations']) * 1e3:.0f} ms per step"
                          f" ({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
    finally:
        if grouped:
            dist.destroy_process_group()
    if rank == 0:
        rows = [combine(row, done, ctx.batch, forward_s) for row, done in zip(spec["rows"], runs)]
        Path(spec["result"]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
