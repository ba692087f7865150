"""What ordinary user code reads and writes under the pipeline: the same as single-device Lightning, or a clear
error on every rank (tests/_model.py holds the patterns, as users write them)."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from _model import Classifier, FrozenFirstLayer, IsolatedSkips, loaders
from conftest import (
    ATOL,
    CLIP,
    assert_same_logs,
    assert_same_params,
    full_params,
    reference_run,
    run_scenarios,
    scenario,
)
from lightning.pytorch.utilities import grad_norm as lightning_grad_norm
from lightning.pytorch.utilities.model_summary import summarize

from lightning_gpipe import StageError, grad_norm
from lightning_gpipe.model.partition import keep_stage

AUGMENTED = {"augment": True, "num_workers": 1}


def _named(name: str, model_class: str, **extra) -> dict:
    return scenario(name, 2, 3, model_class=model_class, **extra)


def _refused(name: str, model_class: str, **extra) -> dict:
    return _named(name, model_class, expect_error=True, **extra)


K2 = [
    scenario("seeded_workers", 2, 3, seed_workers=True, data=AUGMENTED),
    _refused("penalty_after", "PenaltyAfter"),
    _refused("penalty_before", "PenaltyBefore"),
    _named("last_layer_penalty", "LastLayerPenalty"),
    _refused("lightning_grad_norm", "LightningGradNorm"),
    _named("pipeline_grad_norm", "PipelineGradNorm"),
    _named("summary", "Classifier", model={"example": True}, trainer={"enable_model_summary": True, "max_steps": 1}),
    _named("after_fit", "Classifier", use_after_fit=True, fresh_strategy={"microbatches": 2, "balance": [7, 2]}),
    {**_named("kept_stages", "Classifier", use_after_fit=True, predict=True, expect_error=True),
     "strategy": {"microbatches": 3, "gather_model": False}},  # fmt: skip
    _refused("softmax_in_eval", "SoftmaxInEval"),
    _named("stops", "StopsOnSecondBatch"),
    _named("validate_first", "Classifier", validate_first=True, save=True),
    _named("dict_outputs", "DictOutputs"),
    _refused("first_layer_optimized", "FirstLayerOptimized"),
    _refused("calls_layers", "CallsLayers"),
    _refused("two_optimizers", "TwoOptimizers"),
    _refused("sequential_penalty", "SequentialPenalty"),
    _refused("sequential_grad_norm", "SequentialGradNorm"),
    _named("warmup_in_step", "WarmupInStep"),
    _named("gathers_in_validation", "GathersInValidation"),
    _refused("barrier_in_validation", "BarrierInValidation"),
    {**_refused("returns_none", "ReturnsNoneOnce"), "accumulate": 1},  # a step whose backward is in the step
    {**_refused("returns_none_accumulating", "ReturnsNoneOnce")},  # batch 1 accumulates: backward in the step too
    _refused("detached_loss", "DetachedLoss"),
    _refused("unpicklable_output", "UnpicklableOutput"),
    _refused("logs_batch_of_values", "LogsBatchOfValues"),
    _refused("logs_batch_of_values_late", "LogsBatchOfValuesLate"),
    _refused("averaging", "Classifier", averaging=True),
    _named("refit", "FrozenFirstLayer", refit=True, save=True),
    _named("norm_before_zero_grad", "NormBeforeZeroGrad"),
    _named("draws_after_forward", "DrawsAfterForward", data={"shuffle": True}),
    _named("norm_before_backward", "NormBeforeBackward"),
    _refused("rank_sharded_data", "Classifier", datamodule="RankShardedData"),
    _named("seeded_by_rank", "Classifier", seed="rank", model={"lr": 0.0}, epochs=1),
    _named("seeded_by_rank_deferred", "Classifier", seed="rank", model={"lr": 0.0}, epochs=1, init_module=None),
    _refused("lbfgs", "LBFGSClassifier"),
    _refused("closure_twice", "ClosureTwice"),
    _refused("norm_at_epoch_end", "NormAtEpochEnd"),
    _refused("finetuning", "FrozenFirstLayer", finetuning=True),
    _refused("batch_size_finder", "Classifier", batch_size_finder=True, datamodule="BatchSized"),
    _named("prints", "PrintsAfterForward", capture_stdout=True),
    _named("rank_zero_after", "RankZeroAfterForward"),
    _named("saves_step_state", "SavesStepState", save=True),
    _refused("saves_unpicklable", "SavesUnpicklable", save=True),
    _named("local_classes", "LocalLayers", use_after_fit=True, predict=True, save=True),
    {**_named("skips_after_fit", "IsolatedSkips", use_after_fit=True, refit=True, predict=True),
     "strategy": {"microbatches": 3, "balance": [3, 3]}},  # fmt: skip
]


# Three stages: errors, flags and outputs travel from the last stage to both others, and the model from both.
K3 = [
    scenario("seeded_workers", 3, 3, seed_workers=True, data=AUGMENTED),
    scenario("penalty_after", 3, 3, model_class="PenaltyAfter", expect_error=True),
    scenario("stops", 3, 3, model_class="StopsOnSecondBatch"),
    scenario("dict_outputs", 3, 3, model_class="DictOutputs"),
    scenario("after_fit", 3, 3, use_after_fit=True, fresh_strategy={"microbatches": 2, "balance": [2, 3, 4]}),
    scenario("norm_before_zero_grad", 3, 3, model_class="NormBeforeZeroGrad"),
    scenario("norm_before_backward", 3, 3, model_class="NormBeforeBackward"),
]


@pytest.fixture(scope="module")
def k2(tmp_path_factory) -> dict:
    return run_scenarios(2, K2, tmp_path_factory.mktemp("contract"))


@pytest.fixture(scope="module")
def k3(tmp_path_factory) -> dict:
    return run_scenarios(3, K3, tmp_path_factory.mktemp("contract3"))


@pytest.fixture(params=[2, 3])
def runs(request) -> dict:
    """The scenarios run on 2 stages, then on 3."""
    return request.getfixturevalue(f"k{request.param}")


def _same_as_reference(ranks: list[dict], reference: dict) -> None:
    assert_same_params(full_params(ranks), reference["params"])
    for rank in ranks:
        assert_same_logs(rank["logged"], reference["logged"])


def test_seeded_workers_draw_the_same_augmentations_on_every_stage(runs):
    """seed_everything(workers=True) with a random transform in worker processes: each stage, and the single
    device, sees the very same augmented batches."""
    reference = reference_run(seed_workers=True, data=AUGMENTED)
    ranks = runs["seeded_workers"]
    assert all(rank["batch_sums"] == reference["batch_sums"] for rank in ranks)
    assert reference["batch_sums"] != reference_run(data=AUGMENTED)["batch_sums"]  # the seeding matters
    _same_as_reference(ranks, reference)


PARAMETERS_READ = (
    "StageError: GPipeStrategy: {where} read the whole model's parameters (self.parameters(), self.named_parameters(),"
    " or the pipelined Sequential's). Under the pipeline each process holds one stage, so a sum over them (a penalty"
    " in the loss, a norm in a log) would cover that stage alone. For an L2 penalty use the optimizer's weight_decay; for gradient norms use"
    " `lightning_gpipe.grad_norm(self, norm_type)`, which covers every stage; for the device or dtype use self.device"
    " and self.dtype."
)


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("penalty_after", "PenaltyAfter.training_step"),  # only the last stage runs it: it tells the others
        ("penalty_before", "PenaltyBefore.training_step"),
        ("lightning_grad_norm", "code run around the optimizer step (on_before_optimizer_step, a callback's hook)"),
        ("sequential_penalty", "SequentialPenalty.training_step"),
        ("sequential_grad_norm", "code run around the optimizer step (on_before_optimizer_step, a callback's hook)"),
        ("norm_at_epoch_end", "code run in on_train_epoch_end (the module's or a callback's)"),
    ],
)
def test_sums_over_parameters_are_refused_on_every_rank(name, where, k2, k3):
    assert [rank["error"] for rank in k2[name]] == [PARAMETERS_READ.format(where=where)] * 2
    if name in k3:
        assert [rank["error"] for rank in k3[name]] == [PARAMETERS_READ.format(where=where)] * 3


def test_a_penalty_on_the_last_stages_own_layer_is_exact(k2):
    _same_as_reference(k2["last_layer_penalty"], reference_run(model_class="LastLayerPenalty"))


def test_grad_norm_covers_every_stage(k2):
    reference = reference_run(model_class="PipelineGradNorm")
    assert "grad_2.0_norm/body.0.weight" in reference["logged"][0][1]
    assert "grad_2.0_norm_total" in reference["logged"][0][1]
    _same_as_reference(k2["pipeline_grad_norm"], reference)


@pytest.mark.parametrize(
    ("name", "model_class", "key"),
    [("norm_before_zero_grad", "NormBeforeZeroGrad", "norm_before_zero_grad"),
     ("norm_before_backward", "NormBeforeBackward", "norm_before_backward")],
)  # fmt: skip
def test_gradients_read_before_the_backward_are_single_devices(name, model_class, key, runs):
    """Where a hook reads gradients between the step and its backward, every stage's backward waits for it."""
    reference = reference_run(model_class=model_class)
    values = [metrics[key] for _, metrics in reference["logged"] if key in metrics]
    assert len(values) >= 4 and max(values) > 0  # the hooks saw real gradients
    _same_as_reference(runs[name], reference)


def test_random_draws_after_self_x_reach_every_stage(k2):
    """The last stage's draws after self(x) move the rank-wide stream there; the others take its state, so the
    next epoch's shuffle is the same everywhere, and the same as on one device."""
    ranks = k2["draws_after_forward"]
    reference = reference_run(model_class="DrawsAfterForward", data={"shuffle": True})
    _same_as_reference(ranks, reference)
    assert ranks[0]["batch_sums"] == ranks[1]["batch_sums"] == reference["batch_sums"]
    assert len({metrics["weight"] for _, metrics in reference["logged"] if "weight" in metrics}) > 3


def test_grad_norm_is_lightnings_off_the_pipeline():
    model = Classifier()
    model(torch.randn(4, 8)).square().sum().backward()
    expected = lightning_grad_norm(model, 2)
    got = grad_norm(model, 2)
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_grad_norm_of_a_cut_part_is_refused():
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    keep_stage(seq, [1, 1], 1)
    with pytest.raises(StageError, match=r"^GPipeStrategy: grad_norm of a Sequential that other stages hold part of"
                       r" would cover this stage alone; pass the LightningModule itself: grad_norm\(self, norm_type\)$"):
        grad_norm(seq, 2)


def test_model_summary_shows_the_whole_model(k2):
    model = Classifier(example=True)
    expected = summarize(model, max_depth=1)
    (total, data), (other_total, _) = (rank["summary"] for rank in k2["summary"])
    assert total == other_total == expected.total_parameters == 315
    assert data == expected._get_summary_data()  # with the input and output sizes of the example input


def test_the_whole_model_is_on_rank_zero_after_fit(runs):
    reference = reference_run()
    ranks = runs["after_fit"]
    _same_as_reference(ranks, reference)
    assert sorted(ranks[0]["params"]) == sorted(reference["params"])  # model.state_dict() is the whole model's
    _, val = loaders()
    with torch.no_grad():
        expected = torch.cat([reference["model"](x) for x, _ in val])
    torch.testing.assert_close(ranks[0]["after_fit"], expected, rtol=0, atol=ATOL)
    assert [rank["after_fit"] for rank in ranks[1:]] == [(
        "AbsentLayerError: GPipeStrategy: the code called layer 0 (Linear) of the pipelined Sequential, which stage 0"
        " holds, not this process. Each process holds only its own stage's layers while a run is under way; the"
        " step's `self(x)` runs the whole pipeline, and after a run the whole model is on global rank 0"
        " (GPipeStrategy(gather_model=True)). In a step, call the module (`self(x)`) rather than its layers."
    )] * (len(ranks) - 1)
    assert ranks[0]["state_dict_after_fit"] == sorted(reference["params"])
    for rank in ranks[1:]:  # the others hold one stage: asking them for the whole model's state fails loudly
        assert rank["state_dict_after_fit"].startswith(
            "AbsentLayerError: GPipeStrategy: the code asked for the state of layer 0 (Linear) of the pipelined"
            " Sequential, which stage 0 holds, not this process."
        )
    # A new Trainer with another balance takes the trained model as it is.
    for got, want in zip(ranks[0]["fresh_predictions"], reference["predictions"]):
        assert torch.equal(got, want)


def test_without_gathering_the_module_cannot_run_again(k2):
    ranks = k2["kept_stages"]
    assert ranks[0]["after_fit"].startswith("AbsentLayerError: GPipeStrategy: the code called layer 5 (Tanh)")
    assert [rank["error"] for rank in ranks] == [
        "RuntimeError: GPipeStrategy: the module was left partitioned by an earlier run, and global rank 0 lacks"
        " layers [5, 6, 7, 8] of its Sequential, so it cannot be cut again. A run gathers the whole model on global"
        " rank 0 when it ends, unless it failed, ran with GPipeStrategy(gather_model=False), or built the model"
        " deferred (configure_model, trainer.init_module()) with the default gather_model=None: pass gather_model=True"
        " to use the module in another run, or build it afresh."
    ] * 2


def test_forward_is_checked_in_evaluation_too(k2):
    assert [rank["error"] for rank in k2["softmax_in_eval"]] == [
        "ValueError: GPipeStrategy runs SoftmaxInEval.body in place of SoftmaxInEval.forward, so forward(x) must be"
        " exactly `return self.body(x)`; SoftmaxInEval.forward does something else with its input or output. Move"
        " that work into the Sequential's layers or into the step."
    ] * 2


def test_should_stop_from_the_step_stops_every_stage(runs):
    """Set after self(x), on the last stage alone: every stage stops after the same batch (this hung before)."""
    reference = reference_run(model_class="StopsOnSecondBatch")
    assert len(reference["batch_sums"]) == 2
    ranks = runs["stops"]
    assert [len(rank["batch_sums"]) for rank in ranks] == [2] * len(ranks)
    _same_as_reference(ranks, reference)


def test_validate_before_fit_on_the_same_trainer(k2):
    reference = reference_run()
    ranks = k2["validate_first"]
    assert_same_params(full_params(ranks), reference["params"])
    checkpoint = torch.load(ranks[0]["checkpoint"], weights_only=False)
    assert_same_params(checkpoint["state_dict"], reference["params"])
    assert sorted(checkpoint["optimizer_states"][0]["state"]) == list(range(len(reference["params"])))


def test_a_gather_over_the_data_parallel_ranks_after_self_x_is_single_devices(k2):
    """With one replica there is one data-parallel rank: self.all_gather returns the tensor, as on one device."""
    _same_as_reference(k2["gathers_in_validation"], reference_run(model_class="GathersInValidation"))


def test_step_outputs_reach_every_rank(runs):
    reference = reference_run(model_class="DictOutputs")
    assert sorted(reference["outputs"]["train"][0]) == ["acc", "loss"]
    assert reference["outputs"]["val"][0].keys() == {"val_acc", "batch"}
    for rank in runs["dict_outputs"]:
        for kind in ("train", "val"):
            got, expected = rank["outputs"][kind], reference["outputs"][kind]
            assert [sorted(o) for o in got] == [sorted(o) for o in expected]
            for g, e in zip(got, expected):
                assert g == pytest.approx(e, abs=ATOL)


@pytest.mark.parametrize(
    ("name", "messages"),
    [
        ("first_layer_optimized", [
            "BalanceError: configure_optimizers optimizes 2 parameters (body.0.bias, body.0.weight), none of them in"
            " stage 1 (layers 5..8), so that stage's optimizer would be empty; with balance [5, 4], every stage must"
            " hold a parameter the optimizer trains: choose another balance or optimize more of the model"] * 2),
        ("calls_layers", [
            "AbsentLayerError: GPipeStrategy: the code called layer 5 (Tanh) of the pipelined Sequential, which"
            " stage 1 holds, not this process.",
            "AbsentLayerError: GPipeStrategy: the code called layer 0 (Linear) of the pipelined Sequential, which"
            " stage 0 holds, not this process."]),
        ("two_optimizers", [
            "ValueError: GPipeStrategy trains with one optimizer; TwoOptimizers.configure_optimizers returned 2."
            " Several optimizers need Lightning's manual optimization, which the pipeline cannot run (its backward"
            " runs inside automatic optimization): use one optimizer with parameter groups."] * 2),
    ],
)  # fmt: skip
def test_unsupported_patterns_fail_clearly_on_every_rank(name, messages, k2):
    for rank, message in zip(k2[name], messages):
        assert rank["error"].startswith(message)


def test_optimizer_settings_changed_in_the_step_reach_every_stage(k2):
    """A warm-up that sets the learning rate after self(x) runs on the last stage; the others take its settings."""
    _same_as_reference(k2["warmup_in_step"], reference_run(model_class="WarmupInStep"))


def test_a_second_fit_with_other_trainable_parameters(k2):
    """Fit with the first layer frozen, unfreeze it, fit on: the second fit optimizes and saves every parameter."""
    from _worker import trainer_for

    L.seed_everything(0, verbose=False)
    model = FrozenFirstLayer()
    train, val = loaders()
    trainer = trainer_for({"clip": CLIP, "accumulate": 2}, "auto", False)
    trainer.fit(model, train, val)
    for p in model.parameters():
        p.requires_grad_(True)
    trainer.fit_loop.max_epochs += 1
    trainer.fit(model, train, val)
    ranks = k2["refit"]
    assert_same_params(full_params(ranks), model.state_dict())
    checkpoint = torch.load(ranks[0]["checkpoint"], weights_only=False)
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(list(model.parameters())) == 10


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("barrier_in_validation", "StageError: GPipeStrategy: BarrierInValidation.validation_step called barrier after"
         " self(x). That code runs on the last stage alone, so no other stage would join the collective. Call it"
         " before self(x), or in a hook every stage runs (such as on_validation_epoch_end)."),
        ("unpicklable_output", "TypeError: GPipeStrategy: what UnpicklableOutput.training_step returned or logged cannot"
         " be sent to the other stages"),
        ("saves_unpicklable", "TypeError: GPipeStrategy: what SavesUnpicklable.on_save_checkpoint put into the"
         " checkpoint cannot be sent to global rank 0, which writes it ("),
        ("returns_none", "RuntimeError: GPipeStrategy: ReturnsNoneOnce.training_step returned None. A pipeline cannot"
         " skip a step (its other stages are already in their backward), as distributed Lightning cannot: return the"
         " loss."),
        ("returns_none_accumulating", "RuntimeError: GPipeStrategy: ReturnsNoneOnce.training_step returned None."),
        ("detached_loss", "RuntimeError: element 0 of tensors does not require grad"),
        ("finetuning", "ValueError: GPipeStrategy cannot run UnfreezeFirstLayer: BaseFinetuning.unfreeze_and_add_param"
         "_group adds a parameter group only on the stages that hold the layers it unfreezes, so the stages' optimizers"
         " no longer match each other nor the whole module's, and no checkpoint can be written or resumed. Put the"
         " layers to unfreeze in a parameter group of their own in configure_optimizers (with their own learning rate)"
         " and set requires_grad in a hook (on_train_epoch_start): an optimizer skips parameters without gradients."),
        ("batch_size_finder", "ValueError: GPipeStrategy cannot run BatchSizeFinder: Lightning's batch-size finder"
         " (Tuner(trainer).scale_batch_size adds it) runs on no distributed strategy: every rank would restore its"
         " trials from a temporary checkpoint of its own name, and an out-of-memory on one stage must shrink every"
         " stage's batch alike. Find the batch size on one device, or try sizes in separate runs."),
        ("averaging", "ValueError: GPipeStrategy cannot run EMAWeightAveraging: it copies the whole module before the"
         " pipeline cuts it, then pairs the copy's parameters with one stage's by position. Average weights after"
         " training, on the whole model that global rank 0 holds then."),
    ],
)  # fmt: skip
def test_what_only_the_last_stage_could_do_is_refused_on_every_rank(name, message, k2):
    for rank in k2[name]:
        assert rank["error"].startswith(message)


@pytest.mark.parametrize("name", ["logs_batch_of_values", "logs_batch_of_values_late"])
def test_an_error_of_a_logged_call_is_raised_on_every_rank(name, k2):
    """The last stage makes its logged calls after the step, as the others replay them: Lightning's own
    refusal reaches every rank alike, whether the backward ran in the step or after it."""
    (error,) = {rank["error"] for rank in k2[name]}  # the same on both ranks, the loss's value included
    assert re.fullmatch(
        r"ValueError: `self\.log\(per_sample, tensor\(\[(\d\.\d{4}), \1\]\)\)` was called, but the tensor must have a"
        r" single element\. You can try doing `self\.log\(per_sample, tensor\(\[\1, \1\]\)\.mean\(\)\)`",
        error,
    ), error


def test_stages_that_hold_different_data_are_refused_on_every_rank(k2):
    """A data module that shards by trainer.global_rank, as one written for DDP does, gives each stage other samples:
    refused at the first batch, where it would train on one sample's inputs and another's targets."""
    errors = [rank["error"] for rank in k2["rank_sharded_data"]]
    assert errors[0] == errors[1]
    assert re.fullmatch(
        r"DataMismatchError: GPipeStrategy: the stages hold different data at the first training batch of epoch 0"
        r" \(stage 0: 10 samples, digest ([0-9a-f]{16}), 2 batches; stage 1: 10 samples, digest (?!\1)[0-9a-f]{16}, 2"
        r" batches\)\. Stage 0 would forward one batch's inputs while the last stage takes the loss against another's"
        r" targets\. Every stage must load the same batches in the same order: seed random splits"
        r" \(random_split\(\.\.\., generator=torch\.Generator\(\)\.manual_seed\(0\)\)\), and do not shard data by"
        r" trainer\.global_rank or world_size in a DataModule \(GPipeStrategy\(data_parallel_size=D\) shards the data"
        r" by replica itself\)\.",
        errors[0],
    ), errors[0]


def test_batch_summaries_tell_batches_apart():
    from lightning_gpipe.integration.invariants import batch_summary

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert batch_summary((x, y)) == batch_summary((x.clone(), y.clone()))
    assert batch_summary((x, y))[1] == 4
    assert batch_summary((x, y)) != batch_summary((x, y.flip(0)))  # targets out of step with inputs
    assert batch_summary({"x": x, "id": "a"}) != batch_summary({"x": x, "id": "b"})


@pytest.mark.parametrize("name", ["seeded_by_rank", "seeded_by_rank_deferred"])
def test_every_stage_starts_from_global_rank_zeros_weights(name, k2):
    """Each rank built the model from its own random state (built whole, or deferred under init_module): every
    stage trains global rank 0's model, as DDP would (lr=0: the weights after fit are the initial ones)."""
    ranks = k2[name]
    assert not torch.equal(ranks[0]["random_before_build"], ranks[1]["random_before_build"])
    torch.set_rng_state(ranks[0]["random_before_build"])
    expected = Classifier(lr=0.0).state_dict()
    assert_same_params(full_params(ranks, gathered=not name.endswith("deferred")), expected, atol=0)
    torch.set_rng_state(ranks[1]["random_before_build"])
    assert not torch.equal(Classifier(lr=0.0).body[-1].weight, expected["body.8.weight"])  # rank 1's own differs


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("lbfgs", "ValueError: GPipeStrategy cannot train with LBFGS: it takes dot products over all the parameters it"
         " optimizes and its line search decides how often to run the closure (each a forward and backward), so on a"
         " pipeline every stage would run its own LBFGS on its own stage, and the stages would disagree on how many"
         " forwards to run. Use a first-order optimizer (SGD, Adam, ...), or train LBFGS on one device."),
        ("closure_twice", "StageError: GPipeStrategy: _TwiceSGD.step called its closure a second time in one step."
         " Under the pipeline each stage runs one forward and backward per batch, and a second call decided by one"
         " stage's own values would leave the others behind: use an optimizer that calls the closure once."),
    ],
)  # fmt: skip
def test_optimizers_that_run_the_closure_by_their_own_values_are_refused(name, message, k2):
    assert [rank["error"] for rank in k2[name]] == [message] * 2


def test_layers_whose_classes_cannot_be_pickled_train_save_and_predict(k2):
    """Only tensors travel between ranks: a layer class defined inside a function goes through fit, the whole model
    on rank 0 after it, a checkpoint and a prediction (before, the end of fit failed: "Can't pickle local object")."""
    reference = reference_run(model_class="LocalLayers")
    ranks = k2["local_classes"]
    _same_as_reference(ranks, reference)
    _, val = loaders()
    with torch.no_grad():
        expected = torch.cat([reference["model"](x) for x, _ in val])
    torch.testing.assert_close(ranks[0]["after_fit"], expected, rtol=0, atol=ATOL)
    for rank in ranks:
        assert [torch.equal(a, b) for a, b in zip(rank["predictions"], reference["predictions"])] == [True] * 3
    checkpoint = torch.load(ranks[0]["checkpoint"], weights_only=False)
    assert_same_params(checkpoint["state_dict"], reference["params"])


def test_skips_across_stages_work_after_a_run(k2):
    """A skip in a namespace of its own, stashed on stage 0 and popped on stage 1: the model on rank 0 runs after
    fit, a second fit and a prediction work (before, the layers came back as copies with their own namespaces)."""
    from _worker import trainer_for

    L.seed_everything(0, verbose=False)
    model = IsolatedSkips()
    train, val = loaders()
    trainer = trainer_for({"clip": CLIP, "accumulate": 2}, "auto", False)
    trainer.fit(model, train, val)
    with torch.no_grad():
        after_fit = torch.cat([model(x) for x, _ in val])
    trainer.fit_loop.max_epochs += 1
    trainer.fit(model, train, val)
    predictions = trainer.predict(model, val)
    ranks = k2["skips_after_fit"]
    torch.testing.assert_close(ranks[0]["after_fit"], after_fit, rtol=0, atol=ATOL)
    assert_same_params(full_params(ranks), model.state_dict())
    for rank in ranks:
        assert [torch.equal(a, b) for a, b in zip(rank["predictions"], predictions)] == [True] * 3


def test_self_print_after_self_x_prints_on_global_rank_zero(k2):
    """The code after self(x) runs on the last stage, where self.print prints nothing; its calls reach global
    rank 0, which prints them as single-device Lightning would, in the same order."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        reference_run(model_class="PrintsAfterForward")
    expected = [line for line in printed.getvalue().splitlines() if line.startswith(("train", "val"))]
    assert len(expected) == 2 * (4 + 3) and expected[:2] == ["train 0 0 10", "train 0 1 10"]
    ranks = k2["prints"]
    assert [line for line in ranks[0]["stdout"].splitlines() if line.startswith(("train", "val"))] == expected
    assert ranks[1]["stdout"] == ""


def test_state_the_step_keeps_after_self_x_is_saved_from_the_last_stage(k2):
    """on_save_checkpoint runs on every stage; the checkpoint global rank 0 writes holds what it set on the last
    stage, where the step's code after self(x) runs (it held 0.0 before)."""
    reference = reference_run(model_class="SavesStepState")
    checkpoint = torch.load(k2["saves_step_state"][0]["checkpoint"], weights_only=False)
    assert reference["model"].seen > 1
    assert checkpoint["seen"] == pytest.approx(reference["model"].seen, abs=1e-4)


def test_rank_zero_only_code_after_self_x_is_warned_of_on_the_last_stage(k2):
    """Rank-zero-only code after self(x) runs on the last stage, where it does nothing: it cannot be forwarded as
    self.print is, so the last stage says so, once per hook."""
    reference = reference_run(model_class="RankZeroAfterForward")
    assert len(reference["model"].notes) == 8
    first, last = k2["rank_zero_after"]
    assert first["warnings"] == []
    others = {name: [w for rank in ranks for w in rank.get("warnings", []) if "rank-zero" in w] for name, ranks in k2.items()}
    assert {name: found for name, found in others.items() if found} == {"rank_zero_after": last["warnings"]}
    assert last["warnings"] == [
        "GPipeStrategy: RankZeroAfterForward.training_step ran rank-zero-only code after self(x) (a @rank_zero_only"
        " function, rank_zero_info, self.logger.experiment, ...). That code runs on the last stage, where it does"
        " nothing: call it before self(x) or in an epoch hook. self.print and self.log after self(x) do reach global"
        " rank 0."
    ]
    _same_as_reference([first, last], reference)
