from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from _model import Classifier, RecordingLogger, loaders  # noqa: E402
from launch import launch  # noqa: E402

WORKER = TESTS / "_worker.py"


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
    return {
        s["name"]: [torch.load(workdir / f"{s['name']}.rank{r}.pt", weights_only=False) for r in range(k)]
        for s in scenarios
    }


def reference_run(
    clip: float | None = 0.05, accumulate: int = 2, precision: str = "32-true", trainer_kwargs: dict | None = None,
    **model_kwargs,
) -> dict:  # fmt: skip
    """The same training with plain single-device Lightning."""
    from _worker import trainer_for

    L.seed_everything(0, verbose=False)
    model = Classifier(**model_kwargs)
    train, val = loaders()
    logger = RecordingLogger()
    scenario = {"clip": clip, "accumulate": accumulate, "precision": precision, "trainer": trainer_kwargs or {}}
    trainer = trainer_for(scenario, "auto", logger)
    trainer.fit(model, train, val)
    result = {"params": model.state_dict(), "logged": logger.records, "model": model, "trainer": trainer}
    result["predictions"] = trainer.predict(model, val)
    return result
