"""Checkpoints that do not depend on the partitioning: exact resume, resume with another K, sharded saving, crashes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from _model import Classifier, loaders
from conftest import WORKER, assert_same_logs, assert_same_params, full_params, reference_run, run_scenarios, scenario
from launch import launch

from lightning_gpipe.checkpointing.sharded import META, to_full_checkpoint

DROPOUT = {"model": {"dropout": 0.3}, "data": {"shuffle": True}}
EPOCHS = 3


def _later(logged: list, epoch: int = 1) -> list:
    return [(step, metrics) for step, metrics in logged if metrics["epoch"] >= epoch]


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_run(trainer_kwargs={"max_epochs": EPOCHS})


@pytest.fixture(scope="module")
def single_e1(tmp_path_factory) -> Path:
    """A plain single-device Lightning checkpoint after one epoch."""
    path = tmp_path_factory.mktemp("single") / "e1.ckpt"
    reference_run(trainer_kwargs={"max_epochs": 1})["trainer"].save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def k2(tmp_path_factory) -> tuple[Path, dict]:
    """K=2: checkpoints after one epoch (full and sharded), and an interrupted run against an uninterrupted one."""
    out = tmp_path_factory.mktemp("k2")
    scenarios = [
        scenario("e1", 2, 3, epochs=1, save=True),
        scenario("sharded_e1", 2, 3, epochs=1, save=True, strategy={"microbatches": 3, "state_dict_type": "sharded"}),
        scenario("dropout_e1", 2, 3, epochs=1, save=True, **DROPOUT),
        scenario("dropout_resumed", 2, 3, epochs=EPOCHS, resume_from="dropout_e1", **DROPOUT),
        scenario("dropout_uninterrupted", 2, 3, epochs=EPOCHS, **DROPOUT),
        # Checkpoints do not depend on the schedule: 1F1B's resumed by GPipe's F-then-B...
        _schedule("1f1b_e1", "1f1b", epochs=1, save=True),
        _schedule("gpipe_e1", "gpipe", epochs=1, save=True),
        _schedule("gpipe_from_1f1b", "gpipe", epochs=EPOCHS, resume_from="1f1b_e1"),
        # ... nor on the chunks per rank: interleaved (M=2, two chunks per rank) from F-then-B, and back.
        _schedule("interleaved_from_gpipe", "interleaved", m=2, epochs=EPOCHS, resume_from="gpipe_e1"),
        _schedule("interleaved_e1", "interleaved", m=2, epochs=1, save=True),
        _schedule("gpipe_from_interleaved", "gpipe", epochs=EPOCHS, resume_from="interleaved_e1"),
    ]
    return out, run_scenarios(2, scenarios, out)


def _schedule(name: str, schedule: str, m: int = 3, **extra) -> dict:
    """A run of ``schedule`` on a loss that is a mean over samples (as 1F1B's per-micro-batch loss needs)."""
    return scenario(name, 2, m, model_class="MeanLossClassifier", strategy={"microbatches": m, "schedule": schedule},
                    **extra)  # fmt: skip


@pytest.fixture(scope="module")
def k4(k2, tmp_path_factory) -> tuple[Path, dict]:
    """K=4 resumes K=2's sharded checkpoint, and writes a full one of its own after one epoch."""
    out = tmp_path_factory.mktemp("k4")
    scenarios = [
        scenario("from_k2_sharded", 4, 4, epochs=EPOCHS, resume_from=str(k2[0] / "sharded_e1.ckpt")),
        scenario("e1", 4, 4, epochs=1, save=True),
    ]
    return out, run_scenarios(4, scenarios, out)


def _crash_scenario(name: str, folder: Path, **extra) -> dict:
    checkpoints = {"dirpath": str(folder), "save_last": True}
    return scenario(name, 2, 3, epochs=EPOCHS, model_checkpoint=checkpoints, **extra)


CRASHES = {  # SIGKILL in training, in rank 1's send of its stage, in rank 0's write of last.ckpt
    "in_training": {"rank": 1, "epoch": 1, "batch": 1},
    "sending_state": {"rank": 1, "save": 3},
    "writing_file": {"rank": 0, "save": 4},
    "sharded_unpublished": {"rank": 0, "after_tensors": 4},  # last.ckpt is a sharded folder here
}
SHARDED = {"microbatches": 3, "state_dict_type": "sharded"}


def _crash_options(name: str) -> dict:
    return {"strategy": SHARDED} if name.startswith("sharded") else {}


def _load(path: Path) -> dict:
    """A full checkpoint, or a sharded one's metadata."""
    return torch.load(path / META if path.is_dir() else path, weights_only=False)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> dict[str, tuple[Path, list, dict]]:
    """Each crash kills one rank of a K=2 run that saves last.ckpt every epoch; what last.ckpt then holds."""
    runs = {}
    for name, kill in CRASHES.items():
        out = tmp_path_factory.mktemp(name)
        crash = _crash_scenario(name, out / "checkpoints", kill=kill, **_crash_options(name))
        (out / "spec.json").write_text(json.dumps([crash]))
        ranks = launch(2, [str(WORKER), str(out / "spec.json"), str(out)], out, timeout=240)
        runs[name] = (out, ranks, _load(out / "checkpoints" / "last.ckpt"))
    return runs


@pytest.fixture(scope="module")
def terminated(tmp_path_factory) -> tuple[Path, list, float]:
    """SIGTERM reaches rank 0 as it begins gathering epoch 1's checkpoint (Lightning's handler broadcast from inside
    the signal handler there, and both ranks waited forever)."""
    out = tmp_path_factory.mktemp("terminated")
    run = _crash_scenario("terminated", out / "checkpoints", kill={"rank": 0, "sigterm_save": 3})
    (out / "spec.json").write_text(json.dumps([run]))
    start = time.monotonic()
    ranks = launch(2, [str(WORKER), str(out / "spec.json"), str(out)], out, timeout=120)
    seconds = time.monotonic() - start
    saved = {p.name: _load(p)["global_step"] for p in sorted((out / "checkpoints").iterdir())}  # before any resume
    return out, ranks, seconds, saved


@pytest.fixture(scope="module")
def k2_resumed(k4, crashed, terminated, single_e1, tmp_path_factory) -> dict:
    """K=2 resumes K=4's checkpoint, a single-device one, and every crashed run from its last.ckpt."""
    out = tmp_path_factory.mktemp("k2_resumed")
    scenarios = [
        scenario("from_k4", 2, 2, epochs=EPOCHS, resume_from=str(k4[0] / "e1.ckpt")),
        scenario("from_single", 2, 3, epochs=EPOCHS, resume_from=str(single_e1)),
    ]
    scenarios += [
        _crash_scenario(name, folder / "checkpoints", resume_from="last", **_crash_options(name))
        for name, (folder, _, _) in crashed.items()
    ]
    scenarios.append(_crash_scenario("terminated", terminated[0] / "checkpoints", resume_from="last"))
    return run_scenarios(2, scenarios, out)


def test_resume_continues_exactly(k2):
    """Same K and M: dropout masks, data order, optimizer and scheduler state, epoch and step all continue."""
    _, runs = k2
    resumed, uninterrupted = runs["dropout_resumed"], runs["dropout_uninterrupted"]
    assert_same_params(full_params(resumed), full_params(uninterrupted), atol=1e-6)
    assert_same_logs(resumed[0]["logged"], _later(uninterrupted[0]["logged"]), atol=1e-6)
    assert resumed[0]["batch_sums"] == uninterrupted[0]["batch_sums"][4:]  # the same shuffled batches, 4 per epoch


def test_resume_with_another_k(k2, k4, k2_resumed, reference):
    """K=2 sharded -> K=4 and K=4 full -> K=2 (with another M) continue as single-device training does."""
    for ranks in (k4[1]["from_k2_sharded"], k2_resumed["from_k4"]):
        assert_same_params(full_params(ranks), reference["params"])
        assert_same_logs(ranks[0]["logged"], _later(reference["logged"]))


@pytest.fixture(scope="module")
def mean_reference() -> dict:
    return reference_run(trainer_kwargs={"max_epochs": EPOCHS}, model_class="MeanLossClassifier")


@pytest.mark.parametrize("name", ["gpipe_from_1f1b", "interleaved_from_gpipe", "gpipe_from_interleaved"])
def test_resume_with_another_schedule(name, k2, mean_reference):
    """A 1F1B checkpoint continues under F-then-B, an F-then-B checkpoint under interleaved 1F1B (two chunks per
    rank, each loading its own stage's tensors) and the reverse, as single-device training does. (Loading into 1F1B
    is loading into F-then-B's one stage per rank.)"""
    ranks = k2[1][name]
    assert_same_params(full_params(ranks), mean_reference["params"])
    assert_same_logs(ranks[0]["logged"], _later(mean_reference["logged"]))


def test_single_device_checkpoint_resumes_in_the_pipeline(k2_resumed, reference):
    ranks = k2_resumed["from_single"]
    assert_same_params(full_params(ranks), reference["params"])
    assert_same_logs(ranks[0]["logged"], _later(reference["logged"]))


def test_pipeline_checkpoint_resumes_on_plain_lightning(k2, reference):
    """A K=2 checkpoint, optimizer state included, resumes on one device with no pipeline."""
    resumed = reference_run(trainer_kwargs={"max_epochs": EPOCHS}, ckpt_path=str(k2[0] / "e1.ckpt"))
    assert_same_params(resumed["params"], reference["params"])
    assert_same_logs(resumed["logged"], _later(reference["logged"]))


def test_sharded_checkpoint_is_one_folder_of_stage_files(k2):
    folder = k2[0] / "sharded_e1.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", META]
    assert not (k2[0] / "sharded_e1.ckpt.partial").exists()


def test_sharded_converts_to_the_full_checkpoint(k2, tmp_path):
    """The documented helper gives the same ordinary checkpoint that state_dict_type="full" writes."""
    converted = torch.load(to_full_checkpoint(k2[0] / "sharded_e1.ckpt", tmp_path / "full.ckpt"), weights_only=False)
    full = torch.load(k2[0] / "e1.ckpt", weights_only=False)
    assert list(converted["state_dict"]) == list(full["state_dict"])
    assert_same_params(converted["state_dict"], full["state_dict"], atol=0)
    assert converted["optimizer_states"][0]["param_groups"] == full["optimizer_states"][0]["param_groups"]
    for i, state in full["optimizer_states"][0]["state"].items():
        assert torch.equal(converted["optimizer_states"][0]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    for key in ("epoch", "global_step", "lr_schedulers", "loops"):
        assert converted[key] == full[key], key
    model = Classifier.load_from_checkpoint(tmp_path / "full.ckpt")
    _, val = loaders()
    reference = Classifier.load_from_checkpoint(k2[0] / "e1.ckpt")
    with torch.no_grad():
        assert all(torch.equal(model(x), reference(x)) for x, _ in val)


@pytest.mark.parametrize("crash", list(CRASHES))
def test_killed_run_resumes_from_its_last_complete_checkpoint(crash, crashed, k2_resumed, reference):
    _, ranks, last = crashed[crash]
    killed = CRASHES[crash]["rank"]
    assert ranks[killed].returncode == -9
    assert ranks[1 - killed].returncode != 0  # the survivor stops too: it lost its peer
    assert (last["epoch"], last["global_step"]) == (0, 2)  # epoch 1's save never completed (or never began)
    resumed = k2_resumed[crash]
    assert_same_params(full_params(resumed), reference["params"])
    assert_same_logs(resumed[0]["logged"], _later(reference["logged"]))


def test_sigterm_during_a_checkpoint_gather_ends_every_rank(terminated, k2_resumed, reference):
    """The signal is noted, the checkpoint being gathered completes, and the run ends at the batch's end: rank 0 as
    Lightning ends a run on SIGTERM, rank 1 when it loses its peer."""
    _, ranks, seconds, saved = terminated
    assert seconds < 60
    assert ranks[0].returncode == 0 and "SIGTERMException" not in ranks[0].output  # Lightning's SystemExit
    assert ranks[1].returncode != 0 and "Connection closed by peer" in ranks[1].output
    assert saved == {"epoch=1-step=4.ckpt": 4, "last.ckpt": 4}  # save_top_k=1 replaced epoch 0's, as it does
    resumed = k2_resumed["terminated"]
    assert_same_params(full_params(resumed), reference["params"])
    assert_same_logs(resumed[0]["logged"], _later(reference["logged"], epoch=2))
