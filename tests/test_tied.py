"""Weights tied across stages: found before training, equal copies, gradients summed between their stages."""

from __future__ import annotations

import pytest
import torch
from _model import TiedClassifier
from conftest import assert_same_logs, assert_same_params, full_params, reference_run, run_scenarios, scenario

from lightning_gpipe.model.tied import Tie, find_ties, tied_names

TIED = {"model_class": "TiedClassifier", "data": {"classes": 8}}
EPOCHS = 3


def test_ties_are_found_by_stage():
    model = TiedClassifier()
    tie = Tie("body.0.weight", ("body.0.weight", "body.6.weight"), (0, 2))
    assert find_ties(model, model.body, [3, 2, 2]) == [tie]
    assert find_ties(model, model.body, [4, 3]) == [Tie(tie.name, tie.names, (0, 1))]
    assert find_ties(model, model.body, [7]) == []  # one stage: nothing to share
    assert tied_names([tie]) == {"body.6.weight": "body.0.weight"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("k2")
    sharded = {"microbatches": 3, "state_dict_type": "sharded"}
    k2 = run_scenarios(2, [
        scenario("tied", 2, 3, epochs=EPOCHS, save=True, **TIED),
        # A validation run first: the fit then takes the layers back from rank 0, and must tie them again.
        scenario("validated_first", 2, 3, epochs=EPOCHS, validate_first=True, **TIED),
        scenario("sharded", 2, 3, epochs=EPOCHS, save=True, strategy=sharded, **TIED),
        scenario("grad_norm", 2, 3, epochs=1, **{**TIED, "model_class": "TiedGradNorm"}),
        # Interleaved: rank 0 runs stages 0 and 2, rank 1 stages 1 and 3; the tie spans stages 0 and 3, so both ranks.
        {**scenario("tied_interleaved", 2, 4, epochs=EPOCHS, **{**TIED, "model_class": "MeanTiedClassifier"}),
         "strategy": {"microbatches": 4, "schedule": "interleaved"}},
    ], folder)  # fmt: skip
    k3 = run_scenarios(3, [
        scenario("tied", 3, 4, epochs=EPOCHS, **TIED),
        scenario("resumed", 3, 2, epochs=EPOCHS + 1, resume_from=k2["tied"][0]["checkpoint"], **TIED),
        scenario("resumed_sharded", 3, 2, epochs=EPOCHS + 1, resume_from=k2["sharded"][0]["checkpoint"], **TIED),
        {**scenario("tied_1f1b", 3, 4, epochs=EPOCHS, **{**TIED, "model_class": "MeanTiedClassifier"}),
         "strategy": {"microbatches": 4, "schedule": "1f1b"}},
    ], tmp_path_factory.mktemp("k3"))  # fmt: skip
    return {2: k2["tied"], 3: k3["tied"],
            **{name: k2[name] for name in ("validated_first", "sharded", "grad_norm", "tied_interleaved")},
            **{name: k3[name] for name in ("resumed", "resumed_sharded", "tied_1f1b")}}  # fmt: skip


@pytest.mark.parametrize("k", [2, 3])
def test_tied_weights_train_as_on_one_device(k, runs):
    """Clipping 0.05, accumulation 2, SGD momentum, StepLR: parameters and logged losses of K=2 (the tie spans both
    stages) and K=3 (stages 0 and 2; stage 1 takes no part) equal single-device Lightning's."""
    reference = reference_run(model_class="TiedClassifier", data={"classes": 8}, trainer_kwargs={"max_epochs": EPOCHS})
    ranks = runs[k]
    assert_same_params(full_params(ranks), reference["params"])
    assert_same_logs(ranks[0]["logged"], reference["logged"])
    # After the run global rank 0's module is whole, with the tie restored: one parameter under both names.
    assert ranks[0]["parameter_count"] == len(list(reference["model"].parameters())) == 6
    if k == 2:
        assert_same_params(full_params(runs["validated_first"]), reference["params"])
        assert_same_params(full_params(runs["sharded"]), reference["params"])


@pytest.mark.parametrize("name", ["tied_1f1b", "tied_interleaved"])
def test_tied_weights_under_per_microbatch_schedules(name, runs):
    """1F1B at K=3 (the tie spans stages 0 and 2), interleaved 1F1B at K=2 with two chunks per rank (stages 0 and 3,
    on ranks 0 and 1): the tied gradient is summed once per step, as on one device."""
    reference = reference_run(model_class="MeanTiedClassifier", data={"classes": 8}, trainer_kwargs={"max_epochs": EPOCHS})
    assert_same_params(full_params(runs[name]), reference["params"])
    assert_same_logs(runs[name][0]["logged"], reference["logged"])


def test_the_checkpoint_holds_the_tied_parameter_once(runs):
    checkpoint = torch.load(runs[2][0]["checkpoint"], weights_only=False)
    reference = reference_run(model_class="TiedClassifier", data={"classes": 8}, trainer_kwargs={"max_epochs": EPOCHS})
    names = checkpoint["gpipe"]["optimizer_param_names"][0][0]
    assert names == [n for n, _ in reference["model"].named_parameters()]  # single-device naming: body.0.weight once
    (state,) = checkpoint["optimizer_states"]
    assert sorted(state["state"]) == list(range(6)) and state["param_groups"][0]["params"] == list(range(6))
    state_dict = checkpoint["state_dict"]
    assert state_dict["body.6.weight"] is state_dict["body.0.weight"]  # one tensor under both names, as saved on one device
    # Resumed at K=3 (another balance) from K=2's checkpoint: as single-device Lightning resumed from it.
    resumed = reference_run(model_class="TiedClassifier", data={"classes": 8}, ckpt_path=runs[2][0]["checkpoint"],
                            trainer_kwargs={"max_epochs": EPOCHS + 1})  # fmt: skip
    for name in ("resumed", "resumed_sharded"):  # from the full checkpoint and from the sharded folder
        assert_same_params(full_params(runs[name]), resumed["params"])
        assert_same_logs(runs[name][0]["logged"], resumed["logged"])


def test_grad_norm_names_the_tied_weight_once(runs):
    reference = reference_run(model_class="TiedGradNorm", data={"classes": 8}, trainer_kwargs={"max_epochs": 1})
    logged = reference["logged"][0][1]
    assert "grad_2.0_norm/body.0.weight" in logged and "grad_2.0_norm/body.6.weight" not in logged
    for rank in runs["grad_norm"]:
        assert_same_logs(rank["logged"], reference["logged"])
