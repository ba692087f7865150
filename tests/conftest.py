from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

# Every message between two ranks on one tag, so that gloo matches them by posting order as NCCL does: a schedule
# that posts a send and its receive in different orders fails here as it would on GPUs (lightning_gpipe.engine.p2p).
# Set before the package is imported, and inherited by every process the tests start. Each worker also records the
# order in which it posts its messages, and run_scenarios checks that they pair up as NCCL needs (p2p_order.py).
os.environ.setdefault("LIGHTNING_GPIPE_ORDER_STRICT", "1")

from _model import RecordingLogger, StepRecorder, loaders  # noqa: E402
from launch import fresh_env, launch  # noqa: E402
from p2p_order import nccl_order_problems  # noqa: E402

WORKER = TESTS / "_worker.py"
ATOL = 1e-5  # fp32: micro-batching changes only the order of a few floating-point sums
CLIP = 0.05  # small enough to change the result (test_reference_clips_gradients), so stage norms would show


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def run_scenarios(k: int, scenarios: list[dict], workdir: Path, timeout: float = 300.0) -> dict[str, list[dict]]:
    """Run ``scenarios`` on K ranks; returns, per scenario name, each rank's saved results."""
    spec = workdir / "scenarios.json"
    spec.write_text(json.dumps(scenarios))
    ranks = launch(k, [str(WORKER), str(spec), str(workdir)], workdir, timeout=timeout)
    failed = [r for r in ranks if r.returncode != 0]
    assert not failed, "\n".join(f"--- rank {r.rank} exited {r.returncode}\n{r.output[-4000:]}" for r in failed)
    results = {
        s["name"]: [torch.load(workdir / f"{s['name']}.rank{r}.pt", weights_only=False) for r in range(k)]
        for s in scenarios
    }
    # Every scenario's messages pair up between every two ranks in one order, as NCCL needs (tests/p2p_order.py).
    problems = {name: nccl_order_problems([rank["p2p"] for rank in ranks]) for name, ranks in results.items()}
    assert {name: found for name, found in problems.items() if found} == {}
    return results


def run_launched(scenarios: list[dict], workdir: Path, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``scenarios`` as a user does: one process, whose Lightning launcher starts the other ranks. Returns the
    finished process and the seconds it ran."""
    spec = workdir / "launched.json"
    spec.write_text(json.dumps(scenarios))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(spec), str(workdir)],
        capture_output=True, text=True, timeout=timeout, env=fresh_env(),
    )  # fmt: skip
    return proc, time.monotonic() - start


def scenario(name: str, k: int, m: int, checkpoint: str = "except_last", **extra) -> dict:
    """A worker scenario with the settings of :func:`reference_run`: clipping, accumulation, SGD momentum, StepLR."""
    return {"name": name, "k": k, "strategy": {"microbatches": m, "checkpoint": checkpoint}, "clip": CLIP,
            "accumulate": 2, **extra}  # fmt: skip


def full_params(ranks: list[dict], gathered: bool = True) -> dict[str, torch.Tensor]:
    """The whole model's parameters, which global rank 0's module holds after the run; the other ranks keep their
    own stage's, the very same tensors. ``gathered=False``: a run that left every stage on its rank (a model built
    deferred, by default): the stages' parameters together, each on one rank only."""
    if not gathered:
        full: dict[str, torch.Tensor] = {}
        for rank in ranks:
            assert not set(rank["params"]) & set(full), "two ranks hold the same parameter"
            full.update(rank["params"])
        return full
    full = ranks[0]["params"]
    for rank in ranks[1:]:
        assert set(rank["params"]) < set(full), "rank 0 lacks parameters of another stage"
        for name, value in rank["params"].items():
            assert torch.equal(value, full[name]), name
    return full


def assert_same_params(got: dict, expected: dict, atol: float = ATOL) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


def assert_same_logs(got: list, expected: list, atol: float = ATOL) -> None:
    assert [(step, sorted(m)) for step, m in got] == [(step, sorted(m)) for step, m in expected]
    for (_, g), (_, e) in zip(got, expected):
        for key in e:
            assert g[key] == pytest.approx(e[key], abs=atol), key


def reference_run(
    clip: float | None = CLIP, accumulate: int = 2, precision: str = "32-true", trainer_kwargs: dict | None = None,
    ckpt_path: str | None = None, data: dict | None = None, model_class: str = "Classifier",
    seed_workers: bool = False, **model_kwargs,
) -> dict:  # fmt: skip
    """The same training with plain single-device Lightning (resumed from ``ckpt_path`` if given)."""
    import _model
    from _worker import trainer_for

    L.seed_everything(0, verbose=False, workers=seed_workers)
    model = getattr(_model, model_class)(**model_kwargs)
    train, val = loaders(**(data or {}))
    logger = RecordingLogger()
    options = {"clip": clip, "accumulate": accumulate, "precision": precision, "trainer": trainer_kwargs or {}}
    trainer = trainer_for(options, "auto", logger)
    steps = StepRecorder()
    trainer.callbacks.append(steps)
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    result = {"params": model.state_dict(), "logged": logger.records, "model": model, "trainer": trainer}
    result["outputs"] = {"train": steps.train, "val": steps.val}
    result["batch_sums"] = steps.batch_sums
    result["predictions"] = trainer.predict(model, val)
    return result
