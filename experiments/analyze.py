"""Turn a sweep's TensorBoard logs into plots and a markdown table: ``python experiments/analyze.py SWEEP --out DIR``.

SWEEP is the folder a ``-m`` run printed (one numbered sub-folder per run). Written to DIR:
``summary.md``, ``bubble_vs_m.png``, ``throughput_vs_m.png`` and ``activation_memory_vs_k.png``.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass
class Run:
    k: int
    m: int
    checkpoint: str
    bubble_measured: float
    bubble_theory: float
    samples_per_s: float
    activation_bytes_max: float


def read_run(folder: Path) -> Run:
    """One run of the sweep: its settings from Hydra's saved config, its measurements from TensorBoard."""
    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]

    def median(tag: str) -> float:
        return statistics.median(e.value for e in events.Scalars(tag))

    if "pipeline/bubble_measured" not in tags:
        raise ValueError(f"{folder} has no pipeline measurements: run the sweep with observe_every_n_steps > 0")
    memory = [max(e.value for e in events.Scalars(t)) for t in tags if t.startswith("memory/activation_bytes_peak")]
    return Run(
        k=cfg.k, m=cfg.m, checkpoint=cfg.checkpoint,
        bubble_measured=median("pipeline/bubble_measured"), bubble_theory=median("pipeline/bubble_theory"),
        samples_per_s=median("pipeline/samples_per_s"), activation_bytes_max=max(memory),
    )  # fmt: skip


def read_sweep(sweep: Path) -> list[Run]:
    folders = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: p.name)
    if not folders:
        raise ValueError(f"{sweep} holds no runs (numbered folders with a .hydra/ inside)")
    return sorted((read_run(f) for f in folders), key=lambda r: (r.k, r.checkpoint, r.m))


def table(runs: list[Run]) -> str:
    lines = [
        "| K | M | checkpoint | bubble measured | bubble theory | samples/s | activation bytes (max stage) |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r.k} | {r.m} | {r.checkpoint} | {r.bubble_measured:.3f} | {r.bubble_theory:.3f} |"
                     f" {r.samples_per_s:.0f} | {r.activation_bytes_max:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_k: dict[tuple[int, str], list[Run]] = defaultdict(list)
    for r in runs:
        by_k[(r.k, r.checkpoint)].append(r)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for (k, mode), rs in sorted(by_k.items()):
        line = ax.plot([r.m for r in rs], [r.bubble_measured for r in rs], "o-", label=f"K={k} {mode} measured")
        ax.plot([r.m for r in rs], [r.bubble_theory for r in rs], "--", color=line[0].get_color(), label=f"K={k} theory")
    ax.set(xscale="log", xlabel="micro-batches M", ylabel="bubble fraction", title="Bubble against M")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "bubble_vs_m.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for (k, mode), rs in sorted(by_k.items()):
        ax.plot([r.m for r in rs], [r.samples_per_s for r in rs], "o-", label=f"K={k} {mode}")
    ax.set(xscale="log", xlabel="micro-batches M", ylabel="samples / s (observed steps)", title="Throughput against M")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "throughput_vs_m.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in sorted({r.checkpoint for r in runs}):
        rs = sorted((r for r in runs if r.checkpoint == mode), key=lambda r: (r.k, r.m))
        ax.plot([f"K={r.k} M={r.m}" for r in rs], [r.activation_bytes_max / 2**20 for r in rs], "o-", label=mode)
    ax.set(ylabel="activation MiB (largest stage)", title="Activation memory against K")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "activation_memory_vs_k.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the multirun folder of a sweep")
    parser.add_argument("--out", type=Path, required=True, help="where to write the table and plots")
    args = parser.parse_args()
    runs = read_sweep(args.sweep)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(table(runs))
    for path in plot(runs, args.out):
        print(path)
    print(args.out / "summary.md")


if __name__ == "__main__":
    main()
