"""Advise K, M, re-materialization and schedule for a model on this machine, by measurement:
``python experiments/advise.py model=transformer data=text k=2 [verify=true]`` (the configs of ``train.py``).

Profiles the model's layers on its first batch at every candidate's micro-batch size, times the link between two
processes and the pipeline's own time per action on training's K x D processes, predicts every candidate
(``lightning_gpipe.advisor``) and prints them as a table with the choice. With ``verify=true`` it then trains the
top candidates (or the M of ``verify_m``) with ``train.py`` for a few steps each and prints measured beside
predicted.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `experiments.*` targets import

from experiments.processes import free_port, without_rendezvous  # noqa: E402
from lightning.pytorch.core.optimizer import _configure_optimizers  # noqa: E402
from lightning_gpipe.advisor import Advice, Candidate, Link, Prediction, advise, candidate_balance, microbatch_choices  # noqa: E402
from lightning_gpipe.advisor.choose import format_bytes  # noqa: E402
from lightning_gpipe.advisor.measure import measure_floor, measure_link, profile_model  # noqa: E402
from lightning_gpipe.engine.microbatch import batch_size  # noqa: E402
from lightning_gpipe.integration.auto import memory_budget  # noqa: E402
from lightning_gpipe.integration.balancing import input_of_step  # noqa: E402
from lightning_gpipe.model.partition import PROFILED_RULES, BalanceError, find_sequential, resolve_balance  # noqa: E402

TRAIN = Path(__file__).resolve().parent / "train.py"
#: What advise.py reads itself and does not pass on to train.py.
OWN_KEYS = ("verify", "top", "verify_m", "verify_steps", "verify_rounds", "checkpoints", "schedules", "rows")


@dataclass
class Measured:
    """One verified run: median samples/s of its timed steps, and its observed step's bubble and peak memory."""

    label: str
    samples_per_s: float
    bubble: Optional[float]
    peak_bytes: Optional[float]  # the largest stage's weights, gradients, optimizer state and saved activations
    chose: Optional[int] = None  # the M that m=auto chose


def run(cfg: DictConfig, overrides: list[str], out: Path) -> Advice:
    """Profile, predict, print; with ``cfg.verify``, train and measure."""
    k = cfg.k
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // (k * cfg.dp)))  # a rank's share, as train.py
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    model = hydra.utils.instantiate(cfg.model)
    x = input_of_step(model, batch, 0)
    _, seq = find_sequential(model)
    device = torch.device("cuda", 0) if cfg.trainer.accelerator in ("gpu", "cuda") else torch.device("cpu")
    candidates, notes = _candidates(cfg, seq, x)
    batch_rows = batch_size(x)
    sizes = sorted({math.ceil(batch_rows / c.m) for c in candidates})
    optimizers = _configure_optimizers(model.configure_optimizers())[0]
    profile = profile_model(
        list(seq._modules.values()), x, sizes, device, optimizers, list(cfg.checkpoints), k * cfg.dp
    )
    link, floor = _measure_pipeline(device, k, cfg.dp)
    profile = dataclasses.replace(profile, step_s=lightning_step_overhead(), floor_s=floor)
    candidates = [c if c.balance else _with_balance(c, cfg, profile, k) for c in candidates]
    budget = memory_budget(cfg.get("memory_budget"), device, k * cfg.dp)
    advice = advise(profile, k, candidates, budget, link)
    overheads = ", ".join(f"{mode} {t * 1e3:.2f} ms" for mode, t in profile.action_s.items())
    print(f"Link: {link.latency_s * 1e3:.3f} ms + {link.per_byte_s * 2**20 * 1e3:.3f} ms/MiB per message. Fixed"
          f" cost per step: {profile.step_s * 1e3:.1f} ms; per action: {overheads}, and at least"
          f" {profile.floor_s * 1e3:.2f} ms. CPU work runs {profile.contention:.2f}x slower than profiled"
          f" ({k * cfg.dp} processes).")
    for note in notes:
        print(note)
    print(advice.table(cfg.rows))
    chosen = advice.chosen
    print(f"\nRecommended: python experiments/train.py {' '.join(_train_overrides(overrides, chosen.candidate))}")
    if cfg.verify:
        _verify(cfg, advice, overrides, out)
    return advice


class _Tiny(L.LightningModule):
    """One small layer whose step logs its loss, as a user's does: what Lightning's loop costs per step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).square().mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _StepClock(L.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())


def lightning_step_overhead(steps: int = 40) -> float:
    """Seconds Lightning's training loop adds to a step (hooks, logging, the optimizer's closure): a one-process
    ``Trainer.fit`` of a one-layer module against the same steps in a plain loop (medians over the last 3/4)."""
    data = [torch.randn(8, 4) for _ in range(steps)]
    module, clock = _Tiny(), _StepClock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    fitted = statistics.median(b - a for a, b in zip(clock.ends[steps // 4 :], clock.ends[steps // 4 + 1 :]))
    optimizer, plain = module.configure_optimizers(), []
    for batch in data:
        start = time.perf_counter()
        optimizer.zero_grad()
        module.layer(batch).square().mean().backward()
        optimizer.step()
        plain.append(time.perf_counter() - start)
    return max(fitted - statistics.median(plain[steps // 4 :]), 0.0)


def _candidates(cfg: DictConfig, seq: torch.nn.Sequential, x: Any) -> tuple[list[Candidate], list[str]]:
    """Every (schedule, checkpoint, M) asked for that this K and model can run, with a fixed balance or none yet."""
    k, rule = cfg.k, cfg.balance
    rows = batch_size(x)
    found, notes = [], []
    for schedule in cfg.schedules:
        chunks = (cfg.virtual_stages or 2) if schedule == "interleaved" else 1
        if schedule == "interleaved" and k == 1:
            notes.append("interleaved: not with K=1")
            continue
        try:
            fixed = () if rule in PROFILED_RULES else tuple(resolve_balance(_rule(rule), seq, k, chunks))
        except BalanceError as error:
            notes.append(f"{schedule}: {error}")
            continue
        for m in microbatch_choices(rows, k, chunks):
            found += [Candidate(m, checkpoint, schedule, fixed, chunks) for checkpoint in cfg.checkpoints]
    return found, notes


def _rule(rule: Any) -> Any:
    return list(rule) if isinstance(rule, ListConfig) else rule


def _with_balance(candidate: Candidate, cfg: DictConfig, profile: Any, k: int) -> Candidate:
    balance = candidate_balance(cfg.balance, profile, candidate.m, candidate.checkpoint, k * candidate.chunks)
    return Candidate(candidate.m, candidate.checkpoint, candidate.schedule, balance, candidate.chunks)


def _measure_pipeline(device: torch.device, k: int, dp: int) -> tuple[Link, float]:
    """In K x D fresh processes (gloo on CPU, NCCL on one GPU each), as training runs: the one-way cost of a message
    between the first two, and the pipeline's own time per action (``measure_floor``), every replica at once."""
    if k == 1:
        return Link(), measure_floor(0, 1, device) or 0.0
    world = k * dp
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise SystemExit(
            f"advise.py: timing a pipeline of k={k} stages x dp={dp} replicas needs {world} GPUs, one per process;"
            f" this machine has {torch.cuda.device_count()}"
        )
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    args = (k, dp, port, device.type, queue)
    workers = [context.Process(target=_pipeline_worker, args=(r, *args)) for r in range(world)]
    for w in workers:
        w.start()
    measured = queue.get(timeout=120)
    for w in workers:
        w.join(timeout=30)
    return measured


def _pipeline_worker(rank: int, k: int, dp: int, port: int, device_type: str, queue: Any) -> None:
    torch.set_num_threads(1)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k * dp)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    try:
        replicas = [dist.new_group(list(range(d * k, (d + 1) * k))) for d in range(dp)] if dp > 1 else [None]
        link = measure_link(rank, 1 - rank, device) if rank < 2 else None
        dist.barrier()
        floor = measure_floor(rank % k, k, device, replicas[rank // k])
        if rank == 0:
            queue.put((link, floor))
    finally:
        dist.destroy_process_group()


def _train_overrides(overrides: list[str], candidate: Candidate) -> list[str]:
    """The user's overrides, less advise.py's own, with the candidate's settings."""
    chosen = {"m": candidate.m, "checkpoint": candidate.checkpoint, "schedule": candidate.schedule,
              "balance": "[" + ",".join(map(str, candidate.balance)) + "]"}  # fmt: skip
    if candidate.chunks > 1:
        chosen["virtual_stages"] = candidate.chunks
    return _without(overrides, tuple(chosen)) + [f"{key}={value}" for key, value in chosen.items()]


def _without(overrides: list[str], keys: tuple[str, ...]) -> list[str]:
    """``overrides`` less advise.py's own keys and ``keys``."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in (*OWN_KEYS, *keys)]


def _verify(cfg: DictConfig, advice: Advice, overrides: list[str], out: Path) -> None:
    """Train each candidate to check (the top fitting ones, or the config's at ``verify_m``) and print measured
    beside predicted."""
    rows: list[tuple[Optional[Prediction], list[str]]] = []
    if cfg.verify_m:
        for m in cfg.verify_m:
            if m == "auto":
                rows.append((None, [*_without(overrides, ("m",)), "m=auto"]))
                continue
            matches = [p for p in advice.predictions if p.candidate.m == m and _is_configured(p.candidate, cfg)]
            if not matches:
                raise SystemExit(
                    f"advise.py: verify_m has M={m}, which is not a candidate at checkpoint={cfg.checkpoint}"
                    f" schedule={cfg.schedule}: choose among {sorted({p.candidate.m for p in advice.predictions})}"
                )
            rows.append((matches[0], _train_overrides(overrides, matches[0].candidate)))
    else:
        rows = [(p, _train_overrides(overrides, p.candidate)) for p in advice.fitting[: cfg.top]]
    rounds = cfg.verify_rounds
    print(f"\nVerifying {len(rows)} configurations, {cfg.verify_steps} steps each, in {rounds} round(s):")
    runs: list[list[Measured]] = [[] for _ in rows]
    for r in range(rounds):  # every configuration once per round, in turn: a slow spell spreads over all of them
        for i, (prediction, settings) in enumerate(rows):
            label = prediction.candidate.label if prediction else f"m=auto {cfg.checkpoint} {cfg.schedule}"
            runs[i].append(_train(cfg, settings, out / f"verify_{i}_round{r}", label))
            print(_compare(prediction, runs[i][-1]), flush=True)
    lines = ["| configuration | predicted samples/s | measured | measured / predicted | bubble predicted |"
             " measured | peak per stage predicted | measured | median of the rounds |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (prediction, _), measured in zip(rows, runs):
        fastest = dataclasses.replace(measured[-1], samples_per_s=fastest_round(measured))
        median = statistics.median(m.samples_per_s for m in measured)
        lines.append(_compare(prediction, fastest) + f" {median:.1f} |")
    print(f"\nThe fastest of {rounds} round(s), which the prediction's profile is comparable to (see the advisor"
          f" guide):\n" + "\n".join(lines))  # fmt: skip
    summary = auto_summary([p.candidate.m if p else None for p, _ in rows], runs)
    if summary:
        print("\n" + summary)


def fastest_round(measured: list[Measured]) -> float:
    """A configuration's samples/s in its fastest round. A shared machine's slow spells only ever take speed away,
    so this estimates the machine undisturbed, as the profile's fastest pass does (the median of the rounds is
    printed beside it)."""
    return max(r.samples_per_s for r in measured)


def auto_summary(ms: list[Optional[int]], runs: list[list[Measured]]) -> Optional[str]:
    """How ``m=auto`` (the rows whose M is None) compares with the best fixed M of the same rounds, each at its
    fastest round: its own runs, and the runs of the M it chose (the same configuration, without auto's profile)."""
    fixed = {m: fastest_round(measured) for m, measured in zip(ms, runs) if m}
    autos = [measured for m, measured in zip(ms, runs) if m is None]
    if not fixed or not autos:
        return None
    best = max(fixed, key=fixed.__getitem__)
    lines = []
    for measured in autos:
        chosen = [r.chose for r in measured]
        own = fastest_round(measured)
        line = (
            f"m=auto chose M={', '.join(map(str, chosen))} over {len(measured)} round(s): its runs made"
            f" {own:.1f} samples/s, {own / fixed[best]:.2f} of the best M (M={best}, {fixed[best]:.1f})"
        )
        verified = [fixed[m] for m in chosen if m in fixed]
        if len(verified) == len(chosen):  # the chosen M's own runs, whichever round chose it
            line += f"; the runs of the M it chose made {statistics.median(verified) / fixed[best]:.2f} of it"
        lines.append(line + ".")
    return "\n".join(lines)


def _is_configured(candidate: Candidate, cfg: DictConfig) -> bool:
    return candidate.checkpoint == cfg.checkpoint and candidate.schedule == cfg.schedule


def _train(cfg: DictConfig, settings: list[str], folder: Path, label: str) -> Measured:
    steps = cfg.verify_steps
    command = [
        sys.executable, str(TRAIN), *settings, f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", f"observe_every_n_steps={steps - 1}", "~callbacks.model_checkpoint",
        "logger=csv", f"hydra.run.dir={folder}",
    ]  # fmt: skip
    done = subprocess.run(command, env=without_rendezvous(), capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"advise.py: verifying {label} failed:\n{done.stderr[-4000:]}")
    found = re.search(r"microbatches='auto' chose M=(\d+)", done.stdout + done.stderr)
    chose = int(found.group(1)) if found else None
    measured = _read(folder / "csv" / "metrics.csv", f"{label} (chose M={chose})" if chose else label, steps)
    return dataclasses.replace(measured, chose=chose)


def _read(path: Path, label: str, steps: int) -> Measured:
    """Median samples/s over the steps after the first quarter, less the observed one; its bubble and memory."""
    with open(path) as f:
        records = list(csv.DictReader(f))
    speeds, bubble, peak = [], None, None
    for record in records:
        step = int(record["step"])
        if record.get("pipeline/bubble_measured"):
            bubble = float(record["pipeline/bubble_measured"])
            peak = max(_stage_peak(record, j) for j in range(_stages(record)))
        elif record.get("train/samples_per_s") and steps // 4 <= step < steps - 1:
            speeds.append(float(record["train/samples_per_s"]))
    return Measured(label, statistics.median(speeds), bubble, peak)


def _stages(record: dict[str, str]) -> int:
    return sum(1 for key in record if key.startswith("memory/param_bytes_stage") and record[key])


def _stage_peak(record: dict[str, str], j: int) -> float:
    value = lambda name: float(record[f"memory/{name}_stage{j}"])  # noqa: E731
    return 2 * value("param_bytes") + value("optimizer_bytes") + value("activation_bytes_peak")


def _compare(prediction: Optional[Prediction], measured: Measured) -> str:
    def show(x: Optional[float], fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    predicted = prediction.samples_per_s if prediction else None
    ratio = measured.samples_per_s / predicted if predicted else None
    return (
        f"| {measured.label} | {show(predicted, '.1f')} | {measured.samples_per_s:.1f} | {show(ratio, '.2f')} |"
        f" {show(prediction.bubble if prediction else None, '.2f')} | {show(measured.bubble, '.2f')} |"
        f" {format_bytes(prediction.peak) if prediction else ''} |"
        f" {format_bytes(measured.peak_bytes) if measured.peak_bytes else ''} |"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="advise")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.")]
    run(cfg, overrides, Path(hydra_cfg.runtime.output_dir))


if __name__ == "__main__":
    main()
