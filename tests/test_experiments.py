"""The Hydra configs and experiments/train.py, from composition to TensorBoard event files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from _experiment_worker import ROOT, one_step
from hydra import compose, initialize_config_dir
from launch import fresh_env, launch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gpipe import GPipeStrategy

TRAIN = ROOT / "experiments" / "train.py"
# Small enough for one CPU core; each still pipelines over two stages.
SMALL = {
    "mlp": ["model=mlp", "model.depth=2", "model.width=32"],
    "transformer": ["model=transformer", "data=text", "model.depth=2", "model.width=32", "data.context=16",
                    "data.max_bytes=20000", "data.batch_size=8", "model.tie_embeddings=false"],
    "convnet": ["model=convnet", "data=digits", "data.flatten=false", "model.channels=8", "model.blocks=2"],
    "unet": ["experiment=unet_digits", "model.channels=8"],
}  # fmt: skip
SMALL["transformer_tied"] = SMALL["transformer"][:-1]  # the embedding is the head's weight: first and last stage


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data=digits"],
        SMALL["transformer"],
        SMALL["convnet"],
        ["experiment=transformer_text"],
        ["experiment=convnet_digits"],
        ["experiment=resnet_digits"],
        ["experiment=mlp_digits"],
        ["experiment=unet_digits"],
        ["strategy=ddp", "k=2"],
        ["k=2", "dp=2"],
        ["strategy=single"],
        ["checkpoint=always", "balance=params", "m=3"],
        ["balance=[10,9]", "k=2"],
        ["balance=[5,5,5,4]", "k=2", "schedule=interleaved"],
    ],
)
def test_every_config_instantiates(overrides, tmp_path):
    cfg = _compose([*overrides, f"logger.save_dir={tmp_path}"])
    model = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    x, _ = next(iter(datamodule.train_dataloader()))
    assert model.input_kind == datamodule.kind
    with torch.no_grad():
        assert model(x[:2]).shape[0] == 2
    strategy = hydra.utils.instantiate(cfg.strategy) if not isinstance(cfg.strategy, str) else cfg.strategy
    trainer = hydra.utils.instantiate(cfg.trainer, strategy=strategy, logger=hydra.utils.instantiate(cfg.logger))
    assert trainer.num_devices == cfg.k * cfg.dp
    if isinstance(strategy, GPipeStrategy):
        assert (strategy.microbatches, strategy.checkpoint) == (cfg.m, cfg.checkpoint)


def test_gpu_trainer_config():
    cfg = _compose(["trainer=gpu", "k=4"])
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("gpu", 4, "bf16-mixed")


def test_k_and_m_flow_into_strategy_and_trainer():
    cfg = _compose(["k=3", "m=5", "checkpoint=never"])
    assert (cfg.trainer.devices, cfg.strategy.microbatches, cfg.strategy.checkpoint) == (3, 5, "never")


def test_dp_replicas_and_trainer_knobs_as_users_type_them():
    cfg = _compose(["k=2", "dp=2", "shard=optimizer", "m=4", "trainer.max_steps=100", "trainer.gradient_clip_val=0.5"])
    assert (cfg.trainer.devices, cfg.strategy.data_parallel_size, cfg.strategy.microbatches) == (4, 2, 4)
    assert (cfg.trainer.max_steps, cfg.trainer.gradient_clip_val, cfg.strategy.shard) == (100, 0.5, "optimizer")
    trainer = hydra.utils.instantiate(cfg.trainer, strategy=hydra.utils.instantiate(cfg.strategy), logger=False)
    assert (trainer.num_devices, trainer.max_steps, trainer.strategy.data_parallel_size) == (4, 100, 2)
    assert trainer.strategy.shard == "optimizer"


STEPPED = [*((name, 2) for name in sorted(SMALL) if name != "unet"), ("unet", 4)]


def _overrides(name: str) -> list[str]:
    return [*SMALL[name], "trainer.max_epochs=1", "m=3"]


@pytest.fixture(scope="module")
def stepped(tmp_path_factory) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """Global rank 0's whole model after one step of each small experiment, on K launched ranks and on one
    (``k=1``: the same micro-batches on one device), each rank one thread as every run here: one launch per K."""
    folder = tmp_path_factory.mktemp("stepped")
    runs = {k: [(name, k) for name, kk in STEPPED if kk == k] for k in {k for _, k in STEPPED}}
    runs[1] = [(name, 1) for name, _ in STEPPED]
    for k, steps in runs.items():
        spec = folder / f"runs_k{k}.json"
        spec.write_text(json.dumps([
            {"out": str(folder / f"{name}_k{k}.pt"), "overrides": [*_overrides(name), f"k={k}"]} for name, _ in steps
        ]))  # fmt: skip
        ranks = launch(k, [str(ROOT / "tests" / "_experiment_worker.py"), str(spec)], folder, timeout=600)
        assert all(r.returncode == 0 for r in ranks), "\n".join(r.output[-3000:] for r in ranks)
    return {(name, k): torch.load(folder / f"{name}_k{k}.pt") for k, steps in runs.items() for name, _ in steps}


@pytest.mark.parametrize("name, k", STEPPED)
def test_one_pipelined_step_equals_single_device(name, k, stepped):
    """The U-Net at K=4: its outer skip goes from stage 0 to stage 2, its inner one from stage 1 to stage 2."""
    overrides = _overrides(name)
    got = stepped[(name, k)]
    # One device running the same 3 micro-batches (K=1), in a process set up as the ranks are (one thread: the
    # test process's own thread count changes the convolutions' sums): the pipeline adds no error of its own.
    same_microbatches = stepped[(name, 1)]
    assert sorted(got) == sorted(same_microbatches)
    # A tied weight's gradient is summed in another order: each stage's micro-batches, then the two stages (one
    # device interleaves them); after one AdamW step that measured 3.7e-9.
    atol = 1e-7 if name.endswith("tied") else 0.0
    for key in same_microbatches:
        torch.testing.assert_close(got[key], same_microbatches[key], rtol=0, atol=atol, msg=key)
    # The whole batch at once: the same up to floating-point reassociation of the smaller products.
    expected = one_step([*overrides, "strategy=single"])
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    before = hydra.utils.instantiate(_compose(overrides).model)  # the step really changed the parameters
    assert any(not torch.equal(before.state_dict()[key], expected[key]) for key in expected)


def _train(tmp_path: Path, *args: str, timeout: float = 300, run: str = "run") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN), *args, "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/{run}",
         f"hydra.sweep.dir={tmp_path}/sweep"],
        capture_output=True, text=True, timeout=timeout, env=fresh_env(), cwd=tmp_path,
    )  # fmt: skip


def _scalars(folder: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_train_end_to_end_logs_to_tensorboard(tmp_path):
    proc = _train(tmp_path, "k=2", "m=2", "model.depth=2", "trainer.max_epochs=2", "data.size=1152")
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = tmp_path / "run" / "tensorboard"
    assert f"View them with: tensorboard --logdir {logs.parent}" in proc.stdout
    scalars = _scalars(logs)
    for tag in ("train/loss_step", "train/loss_epoch", "val/loss", "val/acc", "train/samples_per_s", "lr-AdamW"):
        assert tag in scalars, tag
    assert len(scalars["train/loss_epoch"]) == 2 and scalars["train/loss_epoch"][1] < scalars["train/loss_epoch"][0]
    assert {"hp/val/loss", "hp/val/acc"} <= set(scalars)  # the HParams view's metrics
    assert [p.name for p in (tmp_path / "run").iterdir() if p.is_dir() and p.name != ".hydra"] == ["tensorboard"]

    # ckpt_path continues from the run's last.ckpt, here with another K: one more epoch, the third.
    last = logs / "checkpoints" / "last.ckpt"
    resumed = _train(tmp_path, "k=1", "m=2", "model.depth=2", "trainer.max_epochs=3", "data.size=1152",
                     f"ckpt_path={last}", run="resumed")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Restoring states from the checkpoint path at {last}" in resumed.stdout + resumed.stderr
    assert len(_scalars(tmp_path / "resumed" / "tensorboard")["train/loss_epoch"]) == 1


def test_train_with_two_replicas_of_two_stages(tmp_path):
    proc = _train(tmp_path, "k=2", "dp=2", "shard=full", "m=2", "model.depth=2", "trainer.max_steps=6",
                  "trainer.log_every_n_steps=1", "data.size=640")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GPipeStrategy: 2 replicas of 2 stages" in proc.stdout + proc.stderr
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    assert len(scalars["train/loss_step"]) == 6 and "val/loss" in scalars


def test_multirun_gives_one_run_per_value(tmp_path):
    proc = _train(tmp_path, "-m", "m=1,2", "k=2", "model.depth=2", "trainer.max_epochs=1", "data.size=640")
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert runs == ["0", "1"]
    for run in runs:
        assert "val/loss" in _scalars(tmp_path / "sweep" / run / "tensorboard")
    assert not (tmp_path / "run").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["k=40"], "train.py: k=40 stages, but MLP's Sequential has 19 layers: lower k or make the model deeper"),
        (["m=0"], "train.py: m=0: need a whole number of at least 1"),
        (["dp=0"], "train.py: dp=0: need a whole number of at least 1"),
        (["model=transformer"], "train.py: model Transformer reads tokens inputs, but data SyntheticDataModule"
                                " yields vector inputs; pick a matching pair (see conf/experiment/ for presets)"),
        (["model=resnet"], "Could not find 'model/resnet'"),
        (["model=unet", "data=digits", "data.flatten=false"], "train.py: model UNet predicts pixels targets, but data"
         " DigitsDataModule yields label targets; pick a matching pair (see conf/experiment/ for presets)"),
        (["balance=[1,2]"], "train.py: balance=[1, 2]: balance [1, 2] has 2 stages, but the pipeline has 4 (devices x nodes)"),
        (["k=2", "balance=[1,2]"], "train.py: balance=[1, 2]: balance [1, 2] sums to 3, but the Sequential has 19 layers"),
        (["balance=fastest"], "train.py: balance=fastest: choose one of uniform, params, time, memory or a list of layer counts"),
        (["k=2", "schedule=interleaved", "balance=[10,9]"], "train.py: balance=[10, 9]: balance [10, 9] has 2 stages,"
         " but the pipeline has 4 (devices x nodes x virtual_stages: 2 x 2)"),
    ],
)  # fmt: skip
def test_bad_input_gives_a_clear_message(args, message, tmp_path, monkeypatch):
    """Each refusal, raised before anything trains (train.py prints it as ``train.py: <message>``, as the CLI test
    below shows; a config that does not exist is Hydra's own error)."""
    from experiments.train import ConfigError, train

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()  # train() gives each of the k x dp processes its share of the cores
    try:
        if message.startswith("Could not find"):
            with pytest.raises(Exception, match=re.escape(message)):
                _compose(args)
            return
        with pytest.raises(ConfigError) as raised:
            train(_compose([*args, f"logger.save_dir={tmp_path}"]))
        assert message in f"train.py: {raised.value}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("args", "message"), [
    (["k=40"], "train.py: k=40 stages, but MLP's Sequential has 19 layers: lower k or make the model deeper"),
    (["model=resnet"], "Could not find 'model/resnet'"),
])  # fmt: skip
def test_the_cli_prints_bad_input_without_a_traceback(args, message, tmp_path):
    proc = _train(tmp_path, *args, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


ADVISE = ROOT / "experiments" / "advise.py"


def test_advise_predicts_the_emulated_device_within_ten_percent(tmp_path):
    """advise.py on the emulated device (timed waits that hold no CPU): its table, its recommendation, and a
    verified M=8 whose measured samples per second are within 10% of the predicted. The grid of K 2 and 4, M 1, 4
    and 8, both re-materialization modes, is measured in the docs' advisor guide: each train.py run costs this
    suite 14 s and more, and the bubble's arithmetic at every M is tests/test_advisor.py's."""
    # Four blocks and a 320 ms forward: each block waits 10 ms forward at M=8, long against a busy host's wake-up
    # delays (at 1 ms waits, one CI run's profile read 17% slow).
    command = [sys.executable, str(ADVISE), "model=emulated", "model.depth=4", "model.forward_ms=320", "k=2",
               "verify=true", "verify_m=[8]", "rows=0",
               "verify_steps=12", "schedules=[gpipe]", "checkpoints=[except_last]", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=fresh_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    table = [line for line in lines if re.match(r"\| 2 \| \d+ \| except_last \| gpipe \|", line)]
    assert len(table) == 6  # M = 1 .. 32
    assert sum(line.endswith("| chosen: the fastest that fits |") for line in table) == 1
    recommended = "Recommended: python experiments/train.py model=emulated model.depth=4 model.forward_ms=320 k=2 m="
    assert any(line.startswith(recommended) for line in lines)
    verified = [line.split(" | ") for line in lines if re.match(r"\| M=\d+ except_last gpipe \|", line)]
    assert [row[0] for row in verified[-1:]] == ["| M=8 except_last gpipe"]
    for row in verified[-1:]:
        ratio = float(row[3])  # measured / predicted samples per second
        assert 0.9 <= ratio <= 1.1, row
        assert row[6] == row[7].rstrip(" |"), row  # predicted and measured peak memory per stage


def test_advise_compares_m_auto_with_the_best_m_of_the_same_rounds():
    """verify_m=[...,auto]: m=auto's own runs against the best fixed M, each at its fastest round, and the runs of
    the M it chose, whichever round chose which."""
    from experiments.advise import Measured, auto_summary

    def runs(*speeds: float, chose: tuple[int, ...] = ()) -> list[Measured]:
        return [Measured("x", s, None, None, c) for s, c in zip(speeds, chose or (None,) * len(speeds))]

    ms = [1, 2, 4, None]
    measured = [runs(100, 90, 110), runs(120, 80, 105), runs(60, 70, 65), runs(95, 102, 99, chose=(1, 2, 1))]
    assert auto_summary(ms, measured) == (
        "m=auto chose M=1, 2, 1 over 3 round(s): its runs made 102.0 samples/s, 0.85 of the best M (M=2, 120.0);"
        " the runs of the M it chose made 0.92 of it."
    )
    measured[-1] = runs(95, chose=(8,))  # an M outside the sweep: its own runs only
    assert auto_summary(ms, measured) == (
        "m=auto chose M=8 over 1 round(s): its runs made 95.0 samples/s, 0.79 of the best M (M=2, 120.0)."
    )
    assert auto_summary([1, 2], measured[:2]) is None
