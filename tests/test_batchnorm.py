"""Deferred batch normalization: micro-batch normalization, whole-mini-batch running statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_params, full_params, reference_run, run_scenarios, scenario
from torch import nn

from lightning_gpipe.engine.batchnorm import batchnorm_stats_kept, commit, defer, undefer

MODES = ("always", "except_last", "never")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("make", [lambda m: nn.BatchNorm1d(3, momentum=m), lambda m: nn.BatchNorm2d(3, momentum=m)])
def test_deferred_statistics_are_the_whole_batchs(make, momentum):
    whole, deferred = make(momentum), make(momentum)
    with torch.no_grad():
        for norm in (whole, deferred):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    deferred.load_state_dict(whole.state_dict())
    [same] = defer([deferred])
    assert same is deferred
    shape = (10, 3) if isinstance(whole, nn.BatchNorm1d) else (10, 3, 2, 2)
    for step in range(3):
        x = torch.randn(shape) * 3 + step
        whole(x)
        parts = x.split([4, 3, 3])
        outputs = [deferred(part) for part in parts]
        for part, out in zip(parts, outputs):  # each micro-batch normalized by its own statistics
            expected = F.batch_norm(part, None, None, deferred.weight, deferred.bias, True, 0.0, deferred.eps)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert deferred.num_batches_tracked == step  # nothing is updated before the commit
        commit([deferred])
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(deferred, name), getattr(whole, name), rtol=0, atol=1e-6, msg=name)
        assert deferred.num_batches_tracked == whole.num_batches_tracked == step + 1
    deferred.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(deferred(x), whole.eval()(x), rtol=0, atol=1e-6)


def test_recompute_does_not_count_twice():
    norm = nn.BatchNorm1d(2)
    defer([norm])
    norm(torch.randn(4, 2))
    with batchnorm_stats_kept([norm]):
        norm(torch.randn(4, 2) + 5)  # a recomputed forward: its statistics go to copies
    assert norm.count == 4
    commit([norm])
    assert norm.num_batches_tracked == 1


def test_undefer_gives_the_layer_back():
    seq = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    norms = defer([seq])
    assert type(seq[1]).__name__ == "DeferredBatchNorm1d" and isinstance(seq[1], nn.BatchNorm1d)
    undefer(norms)
    assert type(seq[1]) is nn.BatchNorm1d and "count" not in seq[1].__dict__
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                      "1.num_batches_tracked"]  # fmt: skip


def test_unsupported_batch_norms_are_named():
    class MyNorm(nn.BatchNorm1d):
        pass

    with pytest.raises(TypeError, match=r"defers nn.BatchNorm1d, 2d and 3d; layer 1 of Sequential is a MyNorm"):
        defer([nn.Sequential(nn.Linear(2, 2), MyNorm(2))])


# -- in the pipeline, against single-device training with the same micro-batches (GhostBatchNorm2d) ---------------


def _bn(name: str, k: int, mode: str, deferred: bool = True) -> dict:
    return {**scenario(name, k, 4, mode, model_class="BatchNormConvNet", predict=True), "clip": None, "accumulate": 1,
            "strategy": {"microbatches": 4, "checkpoint": mode, "deferred_batchnorm": deferred}}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    k2 = [_bn(f"deferred_{mode}", 2, mode) for mode in MODES] + [_bn("per_microbatch", 2, "never", deferred=False)]
    one_f_one_b = _bn("deferred_1f1b", 2, "except_last")
    k2.append({**one_f_one_b, "model_class": "MeanBatchNormConvNet", "strategy": {**one_f_one_b["strategy"], "schedule": "1f1b"}})
    interleaved = _bn("deferred_interleaved", 2, "always")  # stages: Unflatten Conv | BN ReLU | Conv BN ReLU | Flatten Linear
    k2.append({**interleaved, "model_class": "MeanBatchNormConvNet",
               "strategy": {**interleaved["strategy"], "schedule": "interleaved", "balance": [2, 2, 3, 2]}})
    k4 = [_bn("deferred_always", 4, "always"), _bn("deferred_except_last", 4, "except_last")]
    return {k: run_scenarios(k, scenarios, tmp_path_factory.mktemp(f"bn{k}")) for k, scenarios in ((2, k2), (4, k4))}


@pytest.fixture(scope="module")
def reference() -> dict:
    """Each batch norm normalizes the same 4 micro-batches and updates its statistics once, from the whole batch."""
    return reference_run(clip=None, accumulate=1, model_class="BatchNormConvNet", ghost=4)


@pytest.mark.parametrize(("k", "name"), [(2, f"deferred_{mode}") for mode in MODES] + [
    (4, "deferred_always"), (4, "deferred_except_last")])  # fmt: skip
def test_training_and_statistics_equal_single_device_training(k, name, runs, reference):
    ranks = runs[k][name]
    params = full_params(ranks)
    assert int(params["body.2.num_batches_tracked"]) == 8  # 2 epochs of 4 batches: one update per step
    assert_same_params(params, reference["params"])  # weights, running statistics (momentum 0.1 and None)
    for got, expected in zip(ranks[0]["predictions"], reference["predictions"]):  # evaluation uses them
        assert torch.equal(got, expected)
    assert ranks[0]["module_types"].count("BatchNorm2d") == 2  # the user's own layers again after the run
    assert not any(t.startswith("Deferred") for t in ranks[0]["module_types"])


@pytest.mark.parametrize("name", ["deferred_1f1b", "deferred_interleaved"])
def test_deferred_statistics_under_per_microbatch_schedules(name, runs):
    """Under 1F1B the statistics still update once per step, from the whole batch, after its last forward, while
    earlier micro-batches' backwards have already run. Interleaved (balance [2, 2, 3, 2]: the batch norms in stages 1
    and 2, on ranks 1 and 0), each chunk's after that chunk's last forward."""
    reference = reference_run(clip=None, accumulate=1, model_class="MeanBatchNormConvNet", ghost=4)
    params = full_params(runs[2][name])
    assert int(params["body.2.num_batches_tracked"]) == 8
    assert_same_params(params, reference["params"])
    for got, expected in zip(runs[2][name][0]["predictions"], reference["predictions"]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_without_deferring_statistics_follow_micro_batches(runs, reference):
    params = full_params(runs[2]["per_microbatch"])
    assert int(params["body.2.num_batches_tracked"]) == 32  # batches of 10, 10, 10, 4 in 4 micro-batches, 2 epochs
    assert (params["body.2.running_var"] - reference["params"]["body.2.running_var"]).abs().max() > 1e-2
