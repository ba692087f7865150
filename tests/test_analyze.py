"""experiments/analyze.py on a sweep folder laid out as a Hydra multirun with TensorBoard logs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(folder: Path, k: int, m: int, checkpoint: str, bubbles: list[float], activation: list[float]) -> None:
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save({"k": k, "m": m, "checkpoint": checkpoint}, folder / ".hydra" / "config.yaml")
    writer = SummaryWriter(str(folder / "tensorboard"))
    for step, (b, a) in enumerate(zip(bubbles, activation)):
        writer.add_scalar("pipeline/bubble_measured", b, step)
        writer.add_scalar("pipeline/bubble_theory", (k - 1) / (m + k - 1), step)
        writer.add_scalar("pipeline/samples_per_s", 100.0 * m, step)
        writer.add_scalar("memory/activation_bytes_peak_stage0", a, step)
        writer.add_scalar("memory/activation_bytes_peak_stage1", a / 2, step)
    writer.close()


def test_analyze_writes_table_and_plots(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", 2, 4, "never", [0.5, 0.3, 0.4], [1000, 3000, 2000])
    _fake_run(sweep / "1", 2, 1, "never", [0.6, 0.6, 0.7], [100, 100, 100])
    _fake_run(sweep / "2", 2, 4, "always", [0.45, 0.35, 0.4], [500, 400, 300])
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "analyze.py"), str(sweep), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.md").read_text().splitlines()[2:] == [
        "| 2 | 4 | always | 0.400 | 0.200 | 400 | 500 |",
        "| 2 | 1 | never | 0.600 | 0.500 | 100 | 100 |",
        "| 2 | 4 | never | 0.400 | 0.200 | 400 | 3000 |",
    ]
    for name in ("bubble_vs_m.png", "throughput_vs_m.png", "activation_memory_vs_k.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_analyze_refuses_runs_without_measurements(tmp_path):
    sys.path.insert(0, str(ROOT))
    from experiments.analyze import read_sweep

    run = tmp_path / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save({"k": 2, "m": 2, "checkpoint": "never"}, run / ".hydra" / "config.yaml")
    SummaryWriter(str(run / "tensorboard")).close()
    with pytest.raises(ValueError, match="has no pipeline measurements: run the sweep with observe_every_n_steps > 0"):
        read_sweep(tmp_path / "sweep")
