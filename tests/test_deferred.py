"""Deferred construction: the model built on the meta device, each rank materializing its own stage exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_logs, assert_same_params, full_params, reference_run, run_scenarios, scenario
from torch import nn

from lightning_gpipe.model.deferred import DeferredInit, DeferredInitError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.models.convnet import ConvNet  # noqa: E402
from experiments.models.mlp import MLP  # noqa: E402
from experiments.models.transformer import Transformer  # noqa: E402
from experiments.models.unet import UNet  # noqa: E402

MODELS = {
    "mlp": lambda: MLP(),
    "transformer": lambda: Transformer(depth=2, width=32, context=16),  # tied embedding, an apply(init) pass
    "resnet": lambda: ConvNet(channels=8, blocks=2, norm="batch"),  # batch-norm buffers from torch.tensor(0)
    "unet": lambda: UNet(channels=8),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_part_materializes_as_single_device_construction(name):
    torch.manual_seed(0)
    expected = MODELS[name]().state_dict()
    after_expected = torch.rand(3)
    torch.manual_seed(0)
    deferred = DeferredInit()
    with deferred.recording():
        model = MODELS[name]()
    assert all(p.device.type == "meta" for p in model.parameters())
    torch.testing.assert_close(torch.rand(3), after_expected, rtol=0, atol=0)  # the stream goes on as on one device
    odd = [layer for i, layer in enumerate(model.net) if i % 2]
    deferred.materialize(odd)  # one stage's layers; the rest stays on the meta device
    assert all(p.device.type == ("cpu" if i % 2 else "meta") for i, layer in enumerate(model.net) for p in layer.parameters())
    deferred.materialize([layer for i, layer in enumerate(model.net) if i % 2 == 0])
    got = model.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_uninitialised_when_not_replayed_and_real_draws_refused():
    deferred = DeferredInit()
    with deferred.recording(replay=False):
        layer = nn.Linear(3, 2)
    deferred.materialize([layer])
    assert layer.weight.device.type == "cpu" and layer.weight.shape == (2, 3) and layer.weight.requires_grad
    with pytest.raises(DeferredInitError, match=r"drew random numbers on a real device \(aten.normal_.default\)"):
        with DeferredInit().recording():
            torch.empty(3, device="cpu").normal_()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    configured = {"model_class": "Configured"}
    folders = {k: tmp_path_factory.mktemp(f"k{k}") for k in (2, 4)}
    sharded = {"microbatches": 3, "state_dict_type": "sharded"}
    scenarios = {
        2: [
            scenario("configured", 2, 3, save=True, **configured),
            scenario("frozen", 2, 3, model={"lr": 0.0}, **configured),
            {**scenario("init_module", 2, 3), "init_module": None},
            # Measured balance: rank 0 times each layer on a stand-in with storage, one layer at a time.
            {**scenario("timed", 2, 3, **configured), "strategy": {"microbatches": 3, "balance": "time"}},
            {**scenario("init_module_empty", 2, 3), "init_module": True},
            scenario("sharded", 2, 3, save=True, strategy=sharded, **configured),
            # Fine-tuning from those weights (lr=0 keeps them), built uninitialised: each rank reads its own tensors.
            *[{**scenario(f"from_{name}", 2, 3, model={"lr": 0.0}, strategy={"microbatches": 3, "weights": str(
                folders[2] / f"{name}.ckpt")}), "init_module": True} for name in ("configured", "sharded")],
            # transformers skips its own initialisation on the meta device; the strategy has it run, recorded.
            scenario("gpt2", 2, 2, model={"lr": 0.0}, model_module="_hf_model", model_class="GPT2Blocks",
                     loaders="token_loaders", epochs=1),  # fmt: skip
            {**scenario("configured_interleaved", 2, 2, model_class="MeanConfigured"),
             "strategy": {"microbatches": 2, "schedule": "interleaved"}},
        ],
        4: [scenario("configured", 4, 3, **configured), scenario("frozen", 4, 3, model={"lr": 0.0}, **configured),
            {**scenario("configured_1f1b", 4, 4, model_class="MeanConfigured"),
             "strategy": {"microbatches": 4, "schedule": "1f1b"}}],
    }
    return {k: run_scenarios(k, runs, folders[k]) for k, runs in scenarios.items()}


@pytest.mark.parametrize("k", [2, 4])
def test_configure_model_builds_each_stage_only_on_its_rank(k, runs):
    """With lr=0 the weights after training are the initial ones: exactly those of single-device construction.
    Trained, the parameters and logs equal single-device Lightning's, as for an eagerly built module."""
    frozen = reference_run(model_class="Configured", lr=0.0)
    assert_same_params(full_params(runs[k]["frozen"], gathered=False), frozen["params"], atol=0.0)
    reference = reference_run(model_class="Configured")
    assert_same_params(full_params(runs[k]["configured"], gathered=False), reference["params"])
    assert_same_logs(runs[k]["configured"][0]["logged"], reference["logged"])
    if k == 2:
        assert_same_params(full_params(runs[k]["timed"], gathered=False), reference["params"])


@pytest.mark.parametrize(("k", "name"), [(4, "configured_1f1b"), (2, "configured_interleaved")])
def test_a_model_built_deferred_trains_under_per_microbatch_schedules(k, name, runs):
    """1F1B at K=4; interleaved at K=2, where each rank materializes its two chunks only."""
    reference = reference_run(model_class="MeanConfigured")
    assert_same_params(full_params(runs[k][name], gathered=False), reference["params"])
    assert_same_logs(runs[k][name][0]["logged"], reference["logged"])


def test_a_model_built_deferred_stays_on_its_stages_after_the_run(runs):
    """gather_model=None: global rank 0 keeps its own stage, as every other rank does (it may not fit the whole)."""
    for ranks in (runs[2]["configured"], runs[4]["configured"]):
        assert [rank["params"].keys() == set(rank["stage_params"]) for rank in ranks] == [True] * len(ranks)


def test_init_module_builds_on_the_meta_device(runs):
    assert_same_params(full_params(runs[2]["init_module"], gathered=False), reference_run()["params"])
    # empty_init=True: uninitialised stages, for weights loaded afterwards; the run itself works.
    assert all("error" not in rank for rank in runs[2]["init_module_empty"])


@pytest.mark.parametrize("name", ["configured", "sharded"])
def test_weights_start_a_run_from_a_checkpoint(name, runs):
    """GPipeStrategy(weights=...) from a full checkpoint file and from a sharded folder: with lr=0 the run ends
    with exactly the saved weights, which no rank read whole."""
    saved = full_params(runs[2][name], gathered=False)  # what the saving run's modules held when it saved
    assert_same_params(full_params(runs[2][f"from_{name}"], gathered=False), saved, atol=0.0)


def test_transformers_models_built_in_configure_model_get_their_own_initial_weights(runs):
    """transformers' GPT2Model built in configure_model: every stage starts from exactly the weights CPU construction
    gives under the same seed (before, 19 of 53 tensors differed: transformers skipped its init on the meta device)."""
    import lightning as L
    from _hf_model import GPT2Blocks

    L.seed_everything(0, verbose=False)
    model = GPT2Blocks(lr=0.0)
    model.configure_model()
    expected = model.state_dict()
    assert 0.015 < float(expected["body.0.wte.weight"].std()) < 0.025  # GPT-2's own init, std 0.02
    assert_same_params(full_params(runs[2]["gpt2"], gathered=False), expected, atol=0.0)


def test_transformers_imported_while_the_model_is_built_is_refused(tmp_path):
    """Imported inside the recording, transformers cannot be made to initialise: refused, not trained from other
    weights."""
    import subprocess

    code = (
        "from torch import nn\n"
        "from lightning_gpipe.model.deferred import DeferredInit\n"
        "deferred = DeferredInit()\n"
        "with deferred.recording():\n"
        "    from transformers import GPT2Model\n"
        "    layer = nn.Linear(2, 2)\n"
        "deferred.materialize([layer])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "lightning_gpipe.errors.DeferredInitError: transformers skips its models' weight initialisation when it sees"
        " the meta device, and its models were imported while the model was being built, so GPipeStrategy could not"
        " have that initialisation run: the stages would start from other weights than single-device construction"
        " gives. Import them before building the model (`from transformers import GPT2Model` at the top of the"
        " script; a bare `import transformers` loads them only when first used), or build the model whole"
        " (trainer.init_module(empty_init=False)), or load its weights (GPipeStrategy(weights=...))."
    )


def test_no_rank_holds_the_whole_model(tmp_path):
    """48 x Linear(1024, 1024) (201 MB of fp32 weights) with Adam, built in configure_model: at K=4 each rank's peak
    host memory above its floor (a process with torch, Lightning and this package imported) is at most 0.35 of one
    device's (measured: 0.29 to 0.32; ideally 0.25, the rest is each process's own overhead)."""
    from launch import launch

    worker = str(Path(__file__).resolve().parent / "_memory_worker.py")
    peaks = {}
    for k in (0, 4):
        ranks = launch(max(k, 1), [worker, str(tmp_path / f"k{k}"), str(k), "48", "1024"], tmp_path, timeout=300)
        assert all(r.returncode == 0 for r in ranks), "\n".join(r.output[-3000:] for r in ranks)
        peaks[k] = [json.loads((tmp_path / f"k{k}.rank{r}.json").read_text()) for r in range(max(k, 1))]
    single = peaks[0][0]["peak"] - peaks[0][0]["floor"]
    shares = [(rank["peak"] - rank["floor"]) / single for rank in peaks[4]]
    assert single > 700  # MiB: weights, gradients and Adam's two moments, 4 x 192 MiB
    assert max(shares) <= 0.35, shares
