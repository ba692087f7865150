"""GPipeStrategy against plain single-device Lightning, number for number, on K = 1, 2 and 4 processes."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from _model import Classifier, loaders
from p2p_order import nccl_order_problems
from conftest import (
    ATOL,
    assert_same_logs,
    assert_same_params,
    full_params,
    reference_run,
    run_launched,
    run_scenarios,
    scenario,
)
from lightning.pytorch.plugins.precision import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gpipe import GPipeStrategy
from lightning_gpipe.engine.microbatch import split_sizes

MODES = ("always", "except_last", "never")
SHUFFLED = {"shuffle": True, "generator_seed": 7}


def _error(name: str, k: int, balance, **extra) -> dict:
    return {"name": name, "k": k, "strategy": {"balance": balance}, "expect_error": True, **extra}


def _one_f_one_b(k: int, m: int, checkpoint: str) -> dict:
    """1F1B on a loss that is a mean over samples (the last stage's step runs once per micro-batch)."""
    s = scenario(f"1f1b_m{m}_{checkpoint}", k, m, checkpoint, model_class="MeanLossClassifier")
    return {**s, "strategy": {**s["strategy"], "schedule": "1f1b"}}


def _interleaved(k: int, m: int, checkpoint: str, v: int = 2, **extra) -> dict:
    """Interleaved 1F1B, v chunks per rank, on a loss that is a mean over samples."""
    s = _one_f_one_b(k, m, checkpoint)
    return {**s, "name": f"interleaved_m{m}_{checkpoint}", **extra,
            "strategy": {**s["strategy"], "schedule": "interleaved", "virtual_stages": v}}  # fmt: skip


K2 = [scenario(f"m{m}_{mode}", 2, m, mode) for m in (1, 3, 4) for mode in MODES] + [
    scenario("predict_and_save", 2, 3, predict=True, save=True),
    scenario("steps_and_val_interval", 2, 3, trainer={"max_steps": 3, "val_check_interval": 2}),
    {**scenario("balance_params", 2, 2), "strategy": {"microbatches": 2, "balance": "params"}},
    {**scenario("balance_list", 2, 2), "strategy": {"microbatches": 2, "balance": [3, 6]}},
    {**scenario("headers_always", 2, 3), "strategy": {"microbatches": 3, "headers": "always"}},
    {**scenario("value_shaped_always", 2, 2, "never", model_class="ValueShaped", accumulate=1,
                trainer={"max_steps": 2, "limit_val_batches": 0}),
     "strategy": {"microbatches": 2, "checkpoint": "never", "balance": [2, 2], "headers": "always"}},
    {**scenario("balance_time_shuffled", 2, 2, data=SHUFFLED), "strategy": {"microbatches": 2, "balance": "time"}},
    scenario("dropout_always", 2, 3, "always", model={"dropout": 0.3}),
    scenario("dropout_never", 2, 3, "never", model={"dropout": 0.3}),
    scenario("shuffled_dropout", 2, 3, model={"dropout": 0.3}, data={"shuffle": True}, epochs=3),
    {**scenario("unseeded_shuffle", 2, 3, data={"shuffle": True}), "seed": None},
    scenario("summary_with_example", 2, 3, model={"example": True}, trainer={"enable_model_summary": True, "max_steps": 1}),
    scenario("bf16_always", 2, 3, "always", precision="bf16-mixed"),
    scenario("bf16_never", 2, 3, "never", precision="bf16-mixed"),
    scenario("island", 2, 3, precision="bf16-mixed", model_class="AutocastIsland"),
    scenario("island_late", 2, 3, precision="bf16-mixed", model_class="AutocastIslandLate"),
    *(_one_f_one_b(2, m, mode) for m, mode in ((2, "always"), (4, "except_last"))),
    _error("balance_sum", 2, [3, 3]),
    _error("balance_zero", 2, [0, 9]),
    _error("balance_length", 2, [9]),
    {**_one_f_one_b(2, 3, "never"), "name": "1f1b_late", "model_class": "NormBeforeZeroGrad", "expect_error": True},
    # The last stage fails in its step's first micro-batch while the first is in its schedule: it takes every
    # activation still coming and sends zeros for every gradient, then the error; the next scenario runs on.
    {**_one_f_one_b(2, 3, "except_last"), "name": "1f1b_fails", "fail_at": {"rank": 1, "batch": 1},
     "expect_error": True},
    scenario("after_1f1b_fails", 2, 3),
    *(_interleaved(2, m, mode) for m, mode in ((2, "never"), (4, "always"))),
    # The last rank fails in its first loss: its first chunk still runs its actions, its last drains, then the error
    # (every message posted pairs up: run_scenarios checks each scenario's, the failing ones' too).
    {**_interleaved(2, 4, "except_last"), "name": "interleaved_fails", "fail_at": {"rank": 1, "batch": 1},
     "expect_error": True},
    {**_interleaved(2, 3, "never"), "name": "interleaved_m3", "expect_error": True},
    # The advisor: these layers cost the same at any micro-batch size, so fewer micro-batches are faster.
    {**scenario("auto", 2, 1), "strategy": {"microbatches": "auto", "checkpoint": "except_last"}, "tensorboard": True},
    {**scenario("auto_nothing_fits", 2, 1), "expect_error": True,
     "strategy": {"microbatches": "auto", "memory_budget": "1KiB"}},
]
K4 = [scenario(f"m{m}_{mode}", 4, m, mode) for m, mode in ((1, "never"), (3, "always"), (4, "except_last"))] + [
    scenario("predict_and_save", 4, 4, predict=True, save=True),
    *(_one_f_one_b(4, m, mode) for m, mode in ((4, "never"), (8, "except_last"))),
    _interleaved(4, 8, "except_last", model={"depth": 8}),  # 17 layers: each of the 8 chunks gets a Linear
    _error("too_few_layers", 4, "uniform", model={"depth": 1}),
    _error("time_too_few_layers", 4, "time", model={"depth": 1}),  # rank 0 measures, every rank raises
    _error("stage_without_parameters", 4, [1, 1, 1, 6]),
]


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_run()


@pytest.fixture(scope="module")
def mean_reference() -> dict:
    return reference_run(model_class="MeanLossClassifier")


@pytest.fixture(scope="module")
def k2(tmp_path_factory) -> dict:
    return run_scenarios(2, K2, tmp_path_factory.mktemp("k2"))


@pytest.fixture(scope="module")
def k4(tmp_path_factory) -> dict:
    return run_scenarios(4, K4, tmp_path_factory.mktemp("k4"))


def _check_against_reference(ranks: list[dict], reference: dict, k: int) -> None:
    assert_same_params(full_params(ranks), reference["params"])
    assert_same_logs(ranks[0]["logged"], reference["logged"])
    # Callbacks read metrics on every rank: every stage must see what the last stage logged.
    for rank in ranks[1:]:
        assert rank["callback_metrics"] == ranks[0]["callback_metrics"]
    assert set(ranks[0]["callback_metrics"]) == {"train_loss", "train_loss_step", "train_loss_epoch", "val_loss"}


@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("checkpoint", MODES)
def test_k1_equals_single_device(m, checkpoint, reference, tmp_path):
    from _worker import run

    run(scenario("k1", 1, m, checkpoint), tmp_path)
    _check_against_reference([torch.load(tmp_path / "k1.rank0.pt", weights_only=False)], reference, 1)


@pytest.mark.parametrize(
    "name", [s["name"] for s in K2 if s["name"][0] == "m"] + ["balance_params", "balance_list", "headers_always"]
)
def test_k2_equals_single_device(name, k2, reference):
    _check_against_reference(k2[name], reference, 2)


@pytest.mark.parametrize("name", [s["name"] for s in K4 if s["name"][0] == "m"])
def test_k4_equals_single_device(name, k4, reference):
    _check_against_reference(k4[name], reference, 4)


@pytest.fixture(scope="module")
def one_f_one_b_k1(tmp_path_factory) -> dict:
    """1F1B on one process, for each M the pipelines run: the same micro-batches, no stage boundary."""
    from _worker import run

    out, runs = tmp_path_factory.mktemp("1f1b_k1"), {}
    for m in (2, 4, 8):
        run(_one_f_one_b(1, m, "never"), out)
        runs[m] = [torch.load(out / f"1f1b_m{m}_never.rank0.pt", weights_only=False)]
    return runs


@pytest.mark.parametrize("m", [2, 4, 8])
def test_1f1b_k1_equals_single_device(m, one_f_one_b_k1, mean_reference):
    """Each micro-batch's loss scaled by its share of the samples: parameters and logged values (step and epoch)
    as single-device training's on the whole batch, with clipping, accumulation, momentum and a scheduler."""
    _check_against_reference(one_f_one_b_k1[m], mean_reference, 1)


@pytest.mark.parametrize(("k", "name"), [(2, s["name"]) for s in K2 if s["name"].startswith("1f1b_m")] + [
    (4, s["name"]) for s in K4 if s["name"].startswith("1f1b_m")])  # fmt: skip
def test_1f1b_pipelines_equal_one_process(k, name, k2, k4, one_f_one_b_k1, mean_reference):
    """K stages add no error of their own to 1F1B on the same micro-batches (1e-6), and so equal single-device
    training (1e-5)."""
    ranks = {2: k2, 4: k4}[k][name]
    _check_against_reference(ranks, mean_reference, k)
    alone = one_f_one_b_k1[int(name.split("_")[1][1:])][0]
    assert_same_params(full_params(ranks), alone["params"], atol=1e-6)
    assert_same_logs(ranks[0]["logged"], alone["logged"], atol=1e-6)


@pytest.mark.parametrize("name", [s["name"] for s in K2 if s["name"].startswith("interleaved_m") and "expect_error" not in s])
def test_interleaved_pipelines_equal_one_process(name, k2, one_f_one_b_k1, mean_reference):
    """Interleaved 1F1B over two ranks of two chunks adds no error of its own to the same micro-batches' losses on one
    process (1e-6), and so equals single-device training (1e-5)."""
    ranks = k2[name]
    _check_against_reference(ranks, mean_reference, 2)
    alone = one_f_one_b_k1[int(name.split("_")[1][1:])][0]
    assert_same_params(full_params(ranks), alone["params"], atol=1e-6)
    assert_same_logs(ranks[0]["logged"], alone["logged"], atol=1e-6)


def test_interleaved_over_four_ranks_equals_single_device(k4):
    _check_against_reference(k4["interleaved_m8_except_last"], reference_run(model_class="MeanLossClassifier", depth=8), 4)


def test_auto_microbatches_choose_on_every_rank_and_train_as_the_choice_given(k2, reference):
    """Rank 0 profiles, every rank takes its choice: M=1 here, and training is the explicit M=1 run, bit for bit."""
    ranks = k2["auto"]
    assert [rank["microbatches"] for rank in ranks] == [1, 1]
    explicit = k2["m1_except_last"]
    for got, expected in zip(ranks, explicit):
        assert got["params"].keys() == expected["params"].keys()
        assert all(torch.equal(got["params"][n], expected["params"][n]) for n in expected["params"]), got["params"]
    assert ranks[0]["logged"] == explicit[0]["logged"]
    table = ranks[0]["advice"].splitlines()
    assert table[0].startswith("| K | M | checkpoint | schedule | balance | samples/s | step ms | bubble |")
    assert [row.split(" | ")[1] for row in table[2:]][0] == "1"  # fastest first
    assert table[2].endswith("| chosen: the fastest that fits |")
    assert ranks[1]["advice"] == ranks[0]["advice"]
    events = EventAccumulator(ranks[0]["tensorboard"])
    events.Reload()
    (text,) = events.Tensors("pipeline/advisor/text_summary")
    assert text.tensor_proto.string_val[0].decode().startswith(
        "microbatches='auto' chose M=1: predicted "
    ) and table[2] in text.tensor_proto.string_val[0].decode()


def test_auto_microbatches_refuse_when_nothing_fits_on_every_rank(k2):
    for rank in k2["auto_nothing_fits"]:
        assert re.fullmatch(
            r"AdvisorError: no candidate fits the memory budget of 1\.0 KiB per rank: the smallest predicted peak is"
            r" [0-9.]+ KiB \(M=[0-9]+ except_last gpipe\)\. Raise memory_budget, use more stages, or re-materialize"
            r" \(checkpoint='always'\)", rank["error"],
        ), rank["error"]


def test_interleaved_refusals(k2):
    """M not a multiple of K, refused on every rank with the values; a failing last rank ends every rank with its
    error, and the next run trains as usual."""
    assert [r["error"] for r in k2["interleaved_m3"]] == [
        "ValueError: GPipeStrategy(schedule='interleaved'): interleaved 1F1B takes micro-batches in groups of K:"
        " microbatches=3 is not a multiple of K=2"
    ] * 2
    assert [r["error"] for r in k2["interleaved_fails"]] == ["RuntimeError: deliberate failure on rank 1 at batch 1"] * 2


def test_1f1b_refuses_code_between_the_step_and_its_backward(k2):
    for rank in k2["1f1b_late"]:
        assert "GPipeStrategy(schedule='1f1b') runs each micro-batch's backward inside the step" in rank["error"]


def test_a_failing_1f1b_step_ends_every_stage_with_its_error(k2, reference):
    assert [r["error"] for r in k2["1f1b_fails"]] == ["RuntimeError: deliberate failure on rank 1 at batch 1"] * 2
    _check_against_reference(k2["after_1f1b_fails"], reference, 2)  # every message of the failed step was matched


def test_shapes_travel_only_when_new(k2):
    """By default stage 0 sends its output's shapes once per micro-batch input shape met (training and evaluation
    apart), so stage 1 reads no header where it knows the shapes; ``headers="always"``: once per micro-batch."""
    train, val = loaders()
    phases = [(True, [len(y) for _, y in train]), (False, [len(y) for _, y in val])]
    keys = {(training, rows) for training, sizes in phases for size in sizes for rows in split_sizes(size, 3)}
    assert len(keys) == 6  # 4, 3, 3 and 2, 1, 1 rows in training; 2, 2, 1 and 1, 1 in validation
    assert [rank["headers"] for rank in k2["m3_except_last"]] == [(6, 0), (0, 6)]
    microbatches = 2 * sum(len(split_sizes(size, 3)) for _, sizes in phases for size in sizes)  # two epochs
    assert microbatches == 40
    assert [rank["headers"] for rank in k2["headers_always"]] == [(40, 0), (0, 40)]


@pytest.mark.parametrize("k", [2, 4])
def test_every_scenario_records_its_messages(k, k2, k4):
    """run_scenarios checks that every scenario's messages pair up between every two ranks as NCCL needs
    (tests/p2p_order.py); here, that the check sees them: every scenario but those refused before training
    recorded messages, and none of those that did has a pair that stops matching. The advisor refuses after its
    floor, timed over the pipeline's own messages."""
    runs, scenarios = (k2, K2) if k == 2 else (k4, K4)
    refused = [
        s["name"] for s in scenarios
        if s.get("expect_error") and "fail_at" not in s and s.get("strategy", {}).get("microbatches") != "auto"
    ]  # fmt: skip
    assert [name for name, ranks in runs.items() if not ranks[0]["p2p"]] == refused
    assert all(nccl_order_problems([rank["p2p"] for rank in ranks]) == [] for ranks in runs.values())


def test_output_shapes_that_follow_values_need_headers_always(k2, tmp_path):
    """A stage whose output width changes between two micro-batches of the same shapes trains with
    ``headers="always"``; by default its sender refuses it, naming the shapes, and every rank ends within seconds."""
    assert [rank["headers"] for rank in k2["value_shaped_always"]] == [(4, 0), (0, 4)]  # two steps of two
    refused = {**scenario("value_shaped", 2, 2, "never", model_class="ValueShaped"),
               "strategy": {"microbatches": 2, "checkpoint": "never", "balance": [2, 2]}}  # fmt: skip
    proc, seconds = run_launched([refused], tmp_path)
    assert proc.returncode != 0
    assert (
        "ValueError: GPipeStrategy: stage 0's output for micro-batch 1 has shapes [5, 4] float32, where an input of the"
        " same shapes gave [5, 5] float32 before: its shapes depend on the input's values, not only on its shapes."
        " Send them with every micro-batch: GPipeStrategy(headers='always')"
    ) in proc.stderr
    assert "GPipeStrategy: stage 1 lost the connection to another stage" in proc.stderr
    assert seconds < 120


def test_max_steps_and_val_check_interval(k2):
    reference = reference_run(trainer_kwargs={"max_steps": 3, "val_check_interval": 2})
    _check_against_reference(k2["steps_and_val_interval"], reference, 2)
    assert sum("val_loss" in metrics for _, metrics in reference["logged"]) == 3


def test_reference_clips_gradients(reference):
    """The scenarios' gradient_clip_val really clips, so a per-stage norm would change the result."""
    unclipped = reference_run(clip=None)["params"]
    assert max((unclipped[n] - reference["params"][n]).abs().max() for n in unclipped) > 1e-3


def test_each_rank_keeps_only_its_stage(k2, k4):
    assert k2["balance_list"][0]["stage_params"] == ["body.0.bias", "body.0.weight", "body.2.bias", "body.2.weight"]
    # balance [3, 2, 2, 2] of Linear, Tanh, Linear, Tanh, ...: stage 3 holds Tanh (7) and Linear (8).
    assert k4["m1_never"][3]["stage_params"] == ["body.8.bias", "body.8.weight"]
    assert sorted(k4["m1_never"][3]["params"]) == ["body.8.bias", "body.8.weight"]  # and keeps it after the run


def test_runs_in_one_process_build_the_device_mesh_once(k4):
    """Seven runs on the same four processes, failed ones too: the process groups of the first run's device mesh
    serve them all, where each would otherwise leave groups (their threads and sockets) behind."""
    for rank in range(4):
        threads = [k4[s["name"]][rank]["gloo_threads"] for s in K4]
        assert threads == [threads[0]] * len(K4) and threads[0] > 0, f"rank {rank}: {threads}"


def test_measured_balance_leaves_training_unchanged(k2):
    """Profiling draws the first training batch on every rank; data order (a loader's own generator included),
    weights and logs stay those of single-device training."""
    ranks = k2["balance_time_shuffled"]
    assert ranks[0]["batch_sums"] == ranks[1]["batch_sums"]
    _check_against_reference(ranks, reference_run(data=SHUFFLED), 2)


def test_balance_params_evens_out_parameter_counts(k2):
    # Four Linear(8, 8) layers (72 parameters each) and a Linear(8, 3) (27), with Tanh between them:
    # the most even contiguous split is 144 | 171; stage 0 also takes the parameter-free Tanh after it.
    assert k2["balance_params"][1]["stage_params"] == [f"body.{i}.{p}" for i in (4, 6, 8) for p in ("bias", "weight")]


@pytest.mark.parametrize("k", [2, 4])
def test_checkpoint_and_predictions_equal_single_device(k, k2, k4, reference):
    ranks = (k2 if k == 2 else k4)["predict_and_save"]
    assert len(ranks[0]["predictions"]) == len(reference["predictions"]) == 3
    for got, expected in zip(ranks[0]["predictions"], reference["predictions"]):
        assert torch.equal(got, expected)
    # One ordinary Lightning checkpoint, loadable with no pipeline at all.
    model = Classifier.load_from_checkpoint(ranks[0]["checkpoint"])
    assert_same_params(model.state_dict(), reference["params"])
    _, val = loaders()
    with torch.no_grad():
        assert torch.equal(torch.cat([model(x).argmax(-1) for x, _ in val]), torch.cat(ranks[0]["predictions"]))
    # The optimizer state in PyTorch's own layout, numbered as the single-device optimizer numbers it.
    checkpoint = torch.load(ranks[0]["checkpoint"], weights_only=False)
    optimizer_state = checkpoint["optimizer_states"][0]
    expected_state = reference["trainer"].optimizers[0].state_dict()
    assert [g["params"] for g in optimizer_state["param_groups"]] == [g["params"] for g in expected_state["param_groups"]]
    assert checkpoint["gpipe"]["optimizer_param_names"] == [[[n for n, _ in reference["model"].named_parameters()]]]
    assert "param_names" not in optimizer_state["param_groups"][0]  # a plain optimizer could not add groups then
    assert sorted(optimizer_state["state"]) == sorted(expected_state["state"])
    for i, param_state in optimizer_state["state"].items():  # SGD momentum
        torch.testing.assert_close(param_state["momentum_buffer"], expected_state["state"][i]["momentum_buffer"], rtol=0, atol=ATOL)


def test_dropout_is_replayed_on_recompute(k2):
    always, never = full_params(k2["dropout_always"]), full_params(k2["dropout_never"])
    assert_same_params(always, never, atol=0)
    assert always["body.0.weight"].abs().sum() > 0


def test_every_stage_sees_the_same_shuffled_batches(k2):
    """Stages draw dropout masks from their own streams, so the shuffling stream stays in step."""
    first, second = (rank["batch_sums"] for rank in k2["shuffled_dropout"])
    assert len(first) == 12 and first == second
    sorted_sums = [sum(first[i : i + 4]) for i in range(0, 12, 4)]  # each epoch covers the same samples
    assert sorted_sums == pytest.approx([sorted_sums[0]] * 3, abs=1e-4)
    assert first[:4] != first[4:8]  # and was shuffled


def test_unseeded_runs_still_share_the_data_order(k2):
    first, second = (rank["batch_sums"] for rank in k2["unseeded_shuffle"])
    assert len(first) == 8 and first == second


def test_model_summary_with_example_input(k2):
    """Lightning's summary runs forward on example_input_array; it must not run it on a partitioned module."""
    assert all("error" not in rank for rank in k2["summary_with_example"])
    assert len(k2["summary_with_example"][0]["batch_sums"]) == 2  # one optimizer step of two accumulated batches


def test_bf16_mixed(k2, reference):
    always, never = full_params(k2["bf16_always"]), full_params(k2["bf16_never"])
    assert_same_params(always, never, atol=0)  # autocast is replayed on recompute too
    bf16_reference = reference_run(precision="bf16-mixed")["params"]
    assert_same_params(always, bf16_reference, atol=2e-2)  # bf16 rounds per micro-batch


def test_backward_in_the_step_is_lightnings_backward(k2):
    """Non-last stages run their backward inside the step, or (with a hook between step and backward) in
    Lightning's backward: the same computation, outside autocast both times, so the same bits."""
    assert_same_params(full_params(k2["island"]), full_params(k2["island_late"]), atol=0)


@pytest.mark.parametrize(
    ("k", "name", "message"),
    [
        (2, "balance_sum", "BalanceError: balance [3, 3] sums to 6, but the Sequential has 9 layers"),
        (2, "balance_zero", "BalanceError: balance [0, 9] must hold positive integers: every stage needs at least one layer"),
        (2, "balance_length", "BalanceError: balance [9] has 1 stages, but the pipeline has 2 (devices x nodes)"),
        (4, "too_few_layers", "BalanceError: cannot cut 3 layers into 4 stages: a pipeline needs at least one layer per stage"),
        (4, "time_too_few_layers", "BalanceError: cannot cut 3 layers into 4 stages: a pipeline needs at least one layer per stage"),
        (4, "stage_without_parameters", "BalanceError: stage 1 (layers 1..1: Tanh) has no trainable parameters,"
         " so its optimizer would be empty; balance [1, 1, 1, 6] needs changing so every stage holds a layer with parameters"),
    ],
)  # fmt: skip
def test_bad_balance_stops_every_rank(k, name, message, k2, k4):
    ranks = (k2 if k == 2 else k4)[name]
    assert [r["error"] for r in ranks] == [message] * k


def test_registered_by_name():
    trainer = L.Trainer(strategy="gpipe", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, GPipeStrategy)


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_failure_on_one_rank_ends_all_ranks(failing_rank, tmp_path):
    """Lightning's own launcher starts rank 1; an error on either rank ends both, with the error shown."""
    proc, seconds = run_launched([scenario("fault", 2, 2, fail_at={"rank": failing_rank, "batch": 1})], tmp_path)
    assert proc.returncode != 0
    assert f"RuntimeError: deliberate failure on rank {failing_rank} at batch 1" in proc.stderr
    assert f"GPipeStrategy: stage {1 - failing_rank} lost the connection to another stage" in proc.stderr
    assert seconds < 120


# -- bad input on one process: each error names the values and what to do -------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"microbatches": 0}, r"GPipeStrategy\(microbatches=0\): need an integer of at least 1"),
        ({"microbatches": 2.5}, r"GPipeStrategy\(microbatches=2.5\): need an integer of at least 1"),
        ({"microbatches": "many"}, r"GPipeStrategy\(microbatches='many'\): need an integer of at least 1, or 'auto'$"),
        ({"memory_budget": "4GiB"}, r"GPipeStrategy\(memory_budget='4GiB'\) bounds what microbatches='auto' chooses;"
         r" this one has microbatches=4$"),
        ({"microbatches": "auto", "memory_budget": "lots"}, r"GPipeStrategy: memory_budget='lots': need a positive"
         r" number of bytes, or a string such as '24GiB' \(B, KiB, MiB, GiB, TiB\)$"),
        ({"checkpoint": "sometimes"}, r"GPipeStrategy\(checkpoint='sometimes'\): choose one of always, except_last, never"),
        ({"balance": "fastest"}, r"GPipeStrategy\(balance='fastest'\): choose one of uniform, params, time, memory or a list"),
        ({"headers": "never"}, r"GPipeStrategy\(headers='never'\): choose one of auto, always"),
        ({"shard": "half"}, r"GPipeStrategy\(shard='half'\): choose one of none, optimizer, full$"),
        ({"shard": "full"}, r"GPipeStrategy\(shard='full'\) splits each stage's training state over its data-parallel"
         r" replicas; this one has data_parallel_size=1: give it at least 2 replicas, or shard='none'$"),
    ],
)  # fmt: skip
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPipeStrategy(**kwargs)


def _fit_k1(model, **trainer_kwargs):
    train, val = loaders()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=GPipeStrategy(microbatches=2), max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(model, train, val)


class CallsTwice(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return self(x).sum() + self(x).sum()


class NeverCalls(Classifier):
    def training_step(self, batch, batch_idx):
        return self.body(batch[0]).sum()


class ScalesFirst(Classifier):
    def forward(self, x):
        return self.body(x / 2)


class SqueezesAfter(Classifier):
    def forward(self, x):
        return self.body(x).squeeze(-1)


class Manual(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class TwoSequentials(Classifier):
    def __init__(self):
        super().__init__()
        self.extra = torch.nn.Sequential(torch.nn.Linear(3, 3))


@pytest.mark.parametrize(
    ("model", "trainer_kwargs", "error", "message"),
    [
        (CallsTwice, {}, RuntimeError, r"GPipeStrategy: the step called self\(...\) a second time"),
        (NeverCalls, {}, RuntimeError, r"GPipeStrategy: NeverCalls.training_step never called self\(...\)"),
        (ScalesFirst, {}, ValueError, r"GPipeStrategy runs ScalesFirst.body in place of ScalesFirst.forward, so"
         r" forward\(x\) must be exactly `return self.body\(x\)`; ScalesFirst.forward does something else"),
        (SqueezesAfter, {}, ValueError, r"so forward\(x\) must be exactly `return self.body\(x\)`"),
        (Manual, {}, ValueError, r"Manual.automatic_optimization is False. Manual optimization is not supported"),
        (TwoSequentials, {}, ValueError, r"Sequential children found: 'body', 'extra'. Pass `GPipeStrategy\(sequential="),
        (Classifier, {"plugins": [MixedPrecision("16-mixed", "cpu")]}, ValueError,
         r"supports precision 32-true, 64-true, bf16-mixed, bf16-true, 16-true; got Trainer\(precision='16-mixed'\)"),
    ],
)  # fmt: skip
def test_unsupported_models_and_options(model, trainer_kwargs, error, message):
    with pytest.raises(error, match=message):
        _fit_k1(model(), **trainer_kwargs)
