"""Data-parallel replicas of the pipeline (D x K on a 2-D mesh): the same training as Lightning's DDP on D ranks."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import (
    assert_same_logs,
    assert_same_params,
    full_params,
    reference_run,
    run_launched,
    run_scenarios,
    scenario,
)
from launch import launch

from lightning_gpipe import GPipeStrategy
from lightning_gpipe.instrument.timeline import Timeline
from lightning_gpipe.parallel.replicas import GradientAverager
from lightning_gpipe.parallel.topology import Topology, check_layout

EPOCHS = 3
MODEL = "StepScheduled"  # SGD with momentum, the learning rate stepped every optimizer step


def _dp(name: str, d: int, k: int, **extra) -> dict:
    """D replicas of K stages; clipping and accumulate_grad_batches=2, 17 samples per replica: batches of 10 and 7."""
    strategy = {"microbatches": 3, "data_parallel_size": d, **extra.pop("strategy", {})}
    return scenario(name, d * k, 3, model_class=MODEL, epochs=extra.pop("epochs", EPOCHS), strategy=strategy, **extra)


def _ddp(name: str, **extra) -> dict:
    return {**scenario(name, 2, 3, model_class=MODEL, epochs=EPOCHS, **extra), "ddp": True}


@pytest.fixture(scope="module")
def d2k2(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("d2k2")
    scenarios = [
        _dp("whole", 2, 2),
        _dp("e1", 2, 2, epochs=1, save=True),
        _dp("sharded_e1", 2, 2, epochs=1, save=True, strategy={"state_dict_type": "sharded"}),
        _dp("resumed", 2, 2, resume_from="e1"),
        _dp("from_sharded", 2, 2, resume_from="sharded_e1"),
        {**_dp("one_layer", 2, 2, expect_error=True), "model_class": "OneLayer"},
        {**_dp("synced", 2, 2), "model_class": "SyncedLogs"},
        # Each replica monitors its own shard's val_loss, as DDP's ranks do: the decision to save is every rank's.
        _dp("monitored", 2, 2, model_checkpoint={"dirpath": str(out / "best"), "monitor": "val_loss", "save_top_k": 1}),
        _dp("observed", 2, 2, tensorboard=True, trainer={"max_steps": 3}, strategy={"observe_every_n_steps": 1},
            accumulate=1),
        {**_dp("tied", 2, 2, data={"classes": 8}), "model_class": "TiedClassifier"},  # stages 0 and 1 share a weight
        {**_dp("1f1b", 2, 2, strategy={"schedule": "1f1b"}), "model_class": "MeanStepScheduled"},
        {**_dp("interleaved", 2, 2, strategy={"schedule": "interleaved", "microbatches": 2}),
         "model_class": "MeanStepScheduled"},
        *_sharded(),
    ]
    return out, run_scenarios(4, scenarios, out)


def _sharded() -> list[dict]:
    """Each shard mode: SGD with momentum (clipping, accumulation, an uneven last batch), AdamW with the state each
    rank holds between steps measured, and checkpoints resumed from one mode into another."""
    adamw = {"model_class": "AdamWScheduled", "state_bytes": True}
    return [
        _dp("shard_optimizer", 2, 2, strategy={"shard": "optimizer"}),
        _dp("shard_full", 2, 2, strategy={"shard": "full"}),
        {**_dp("adamw_none", 2, 2, strategy={"balance": "params"}), **adamw},
        {**_dp("adamw_optimizer", 2, 2, strategy={"balance": "params", "shard": "optimizer"}), **adamw},
        {**_dp("adamw_full", 2, 2, strategy={"balance": "params", "shard": "full"}), **adamw},
        _dp("full_e1", 2, 2, epochs=1, save=True, strategy={"shard": "full"}),
        _dp("full_sharded_e1", 2, 2, epochs=1, save=True, strategy={"shard": "full", "state_dict_type": "sharded"}),
        _dp("full_to_optimizer", 2, 2, resume_from="full_sharded_e1", strategy={"shard": "optimizer"}),
        _dp("none_to_full", 2, 2, resume_from="e1", strategy={"shard": "full"}),
        {**_dp("1f1b_full", 2, 2, strategy={"schedule": "1f1b", "shard": "full"}), "model_class": "MeanStepScheduled"},
        {**_dp("gradnorm_none", 2, 2), "model_class": "PipelineGradNorm"},  # reads the gradients whole: all-reduce
        {**_dp("gradnorm_full", 2, 2, strategy={"shard": "full"}), "model_class": "PipelineGradNorm"},
        {**_dp("tied_full", 2, 2, data={"classes": 8}, strategy={"shard": "full"}, expect_error=True),
         "model_class": "TiedClassifier"},
        _dp("observed_full", 2, 2, tensorboard=True, trainer={"max_steps": 3}, accumulate=1,
            strategy={"observe_every_n_steps": 1, "shard": "full"}),
    ]


@pytest.fixture(scope="module")
def two(d2k2, tmp_path_factory) -> dict:
    """On two processes: DDP, two replicas of one stage, and runs that resume D=2 x K=2's checkpoint."""
    saved = d2k2[0] / "e1.ckpt"
    scenarios = [
        _ddp("ddp"),
        {**_ddp("synced"), "model_class": "SyncedLogs"},
        _dp("d2k1", 2, 1),
        _dp("k2_resumed", 1, 2, resume_from=str(saved)),
        _ddp("ddp_resumed", resume_from=str(saved)),
        {**_ddp("tied", data={"classes": 8}), "model_class": "TiedClassifier"},
        {**_ddp("1f1b"), "model_class": "MeanStepScheduled"},
        {**_ddp("adamw"), "model_class": "AdamWScheduled"},
        _ddp("ddp_from_full", resume_from=str(d2k2[0] / "full_e1.ckpt")),
    ]
    return run_scenarios(2, scenarios, tmp_path_factory.mktemp("two"))


@pytest.mark.parametrize("name", ["whole", "tied", "1f1b", "interleaved"])
def test_two_replicas_of_two_stages_train_as_ddp(name, d2k2, two):
    """``tied``: a weight shared by the first and the last stage, summed over them, averaged over the replicas;
    ``1f1b``: the 1F1B schedule, each replica's micro-batch losses scaled by their share of its samples;
    ``interleaved``: the same with two chunks per rank (M=2: the batches of 10 and 7 in two micro-batches each)."""
    ranks, ddp = d2k2[1][name], two[{"whole": "ddp", "interleaved": "1f1b"}.get(name, name)]
    assert_same_params(full_params(ranks), ddp[0]["params"])
    for rank, values in enumerate(ranks):  # every stage of replica r logs what DDP's rank r logs
        assert_same_logs(values["logged"], ddp[rank // 2]["logged"])
    assert len(ddp[0]["logged"]) == 9  # one optimizer step per epoch (accumulating 2 of 10 + 7), val, epoch means


def test_replicas_see_ddps_shards(d2k2, two):
    ranks, ddp = d2k2[1]["whole"], two["ddp"]
    for replica in range(2):
        for stage in range(2):
            assert ranks[2 * replica + stage]["batch_sums"] == ddp[replica]["batch_sums"], (replica, stage)
    assert ddp[0]["batch_sums"] != ddp[1]["batch_sums"]


def test_sync_dist_averages_over_the_replicas(d2k2, two):
    ranks, ddp = d2k2[1]["synced"], two["synced"]
    for rank in ranks:  # synced: every rank logs the same, DDP's value
        assert_same_logs(rank["logged"], ddp[0]["logged"])
    assert ddp[0]["logged"] == ddp[1]["logged"]
    assert_same_params(full_params(ranks), ddp[0]["params"])


def test_checkpoints_monitoring_a_replicas_value_decide_alike(d2k2):
    saved = sorted(p.name for p in (d2k2[0] / "best").iterdir())
    assert len(saved) == 1 and saved[0].startswith("epoch="), saved
    assert_same_params(full_params(d2k2[1]["monitored"]), full_params(d2k2[1]["whole"]))


def test_observed_steps_report_the_replicas_gradient_average(d2k2):
    scalars = _scalars(d2k2[0] / "observed")
    for stage in (0, 1):
        assert len(scalars[f"pipeline/allreduce_s_stage{stage}"]) == 2, stage  # steps 1 and 2
        assert all(0 < t < 5 for t in scalars[f"pipeline/allreduce_s_stage{stage}"])
    assert scalars["pipeline/bubble_theory"] == pytest.approx([1 / 4, 1 / 4])  # K=2, M=3: one replica's pipeline


def _scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_two_replicas_of_one_stage_train_as_ddp(two):
    assert_same_params(two["d2k1"][0]["params"], two["ddp"][0]["params"])
    assert_same_logs(two["d2k1"][0]["logged"], two["ddp"][0]["logged"])


@pytest.mark.parametrize("name", ["resumed", "from_sharded"])
def test_resume_with_the_same_layout_continues_exactly(name, d2k2):
    runs = d2k2[1]
    assert_same_params(full_params(runs[name]), full_params(runs["whole"]))


def test_resume_with_one_replica_and_on_plain_lightning(d2k2, two):
    saved = d2k2[0] / "e1.ckpt"
    single = reference_run(model_class=MODEL, ckpt_path=str(saved), trainer_kwargs={"max_epochs": EPOCHS})
    assert_same_params(full_params(two["k2_resumed"]), single["params"])
    # DDP on two ranks picks up the same checkpoint and continues as the uninterrupted D=2 x K=2 run
    assert_same_params(two["ddp_resumed"][0]["params"], full_params(d2k2[1]["whole"]))


def test_a_model_with_fewer_layers_than_stages_fails_on_every_rank(d2k2):
    errors = [rank["error"] for rank in d2k2[1]["one_layer"]]
    assert len(set(errors)) == 1 and "1 layers" in errors[0] and "2 stages" in errors[0], errors[0]


def test_layout_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"data_parallel_size=0\): need a whole number of replicas, at least 1"):
        GPipeStrategy(data_parallel_size=0)
    message = (
        "GPipeStrategy(data_parallel_size=4): the 6 processes (devices x num_nodes) do not split into 4 equal"
        " pipelines; use a world that is a multiple of 4, or a data_parallel_size that divides 6"
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(6, 4)
    strategy = GPipeStrategy(data_parallel_size=4, parallel_devices=[torch.device("cpu")] * 6)
    with pytest.raises(ValueError, match="the 6 processes"):
        strategy.setup_environment()  # before any connection, so every rank raises alone: nothing waits


def test_ranks_are_laid_out_replica_major():
    places = [(t.replica, t.stage, t.pipeline_ranks) for t in (Topology(3, 2, r) for r in range(6))]
    assert places == [
        (0, 0, [0, 1, 2]), (0, 1, [0, 1, 2]), (0, 2, [0, 1, 2]),
        (1, 0, [3, 4, 5]), (1, 1, [3, 4, 5]), (1, 2, [3, 4, 5]),
    ]  # fmt: skip


_MESH_SCRIPT = """
import os, sys
import torch.distributed as dist
from lightning_gpipe.parallel.topology import Topology
rank, store = int(os.environ["LOCAL_RANK"]), sys.argv[1]
dist.init_process_group("gloo", init_method=f"file://{store}.0", rank=rank, world_size=2)
first = Topology.build(2, 1, rank, "cpu").mesh
again = Topology.build(2, 1, rank, "cpu").mesh
dist.destroy_process_group()
dist.init_process_group("gloo", init_method=f"file://{store}.1", rank=rank, world_size=2)
fresh = Topology.build(2, 1, rank, "cpu").mesh
print("reused", first is again, "rebuilt", fresh is not first and fresh.get_group("pipeline") is not None)
dist.destroy_process_group()
"""


def test_the_mesh_is_built_once_per_default_process_group(tmp_path):
    """Runs in one process share the mesh's process groups; after the default group is destroyed and made anew,
    the next run builds a mesh in the new one."""
    ranks = launch(2, ["-c", _MESH_SCRIPT, str(tmp_path / "store")], tmp_path, timeout=120)
    for r in ranks:
        assert r.returncode == 0, r.output[-3000:]
        assert "reused True rebuilt True" in r.output


def test_failure_in_another_replica_ends_every_rank(tmp_path):
    """Lightning's own launcher starts ranks 1 to 3; an error on rank 3 (stage 1 of replica 1) ends all four."""
    proc, seconds = run_launched([_dp("fault", 2, 2, epochs=2, fail_at={"rank": 3, "batch": 1})], tmp_path)
    assert proc.returncode != 0
    assert "RuntimeError: deliberate failure on rank 3 at batch 1" in proc.stderr
    assert seconds < 120


def test_average_of_gradients_that_only_some_replicas_have(monkeypatch):
    """Two replicas: the all-reduce is faked as adding the other replica's buffer, laid out as this one's."""
    a, b, c, d = (torch.nn.Parameter(torch.zeros(2)) for _ in range(4))
    here = [torch.tensor([2.0, 2.0]), torch.tensor([6.0, 6.0]), None, None]
    there = [torch.tensor([1.0, 1.0]), None, torch.tensor([4.0, 4.0]), None]  # d: no replica has a gradient
    buffer = torch.cat([(g if g is not None else torch.zeros(2)) / 2 for g in there] + [torch.tensor([1.0, 0, 1, 0])])

    class Done:
        def wait(self):
            pass

    def all_reduce(flat, group=None, async_op=False):
        assert flat.shape == buffer.shape  # the same size on every replica, whichever gradients it has
        flat.add_(buffer)
        return Done()

    monkeypatch.setattr("lightning_gpipe.parallel.replicas.dist.all_reduce", all_reduce)
    averager = GradientAverager(None, 2, Timeline(0))
    averager.start([a, b, c, d], here)
    got = averager.finish()
    assert [g.tolist() if g is not None else None for g in got] == [[1.5, 1.5], [3.0, 3.0], [2.0, 2.0], None]
    assert got[0] is here[0]  # written into this replica's own gradient tensor


@pytest.mark.parametrize(
    "name", ["shard_optimizer", "shard_full", "adamw_none", "adamw_optimizer", "adamw_full", "1f1b_full"]
)
def test_each_shard_mode_trains_as_ddp(name, d2k2, two):
    """Parameters and logs as DDP's on 2 devices, and as the same pipeline with shard='none' (each replica receives
    its share of the averaged gradients by reduce-scatter, and clipping takes the norm of the shares); under the
    1F1B schedule too, whose stages average after the step's per-micro-batch backwards."""
    ranks = d2k2[1][name]
    reference = {"adamw_optimizer": "adamw", "adamw_full": "adamw", "adamw_none": "adamw", "1f1b_full": "1f1b"}
    ddp = two[reference.get(name, "ddp")]
    unsharded = d2k2[1][{"adamw": "adamw_none", "1f1b": "1f1b", "ddp": "whole"}[reference.get(name, "ddp")]]
    assert_same_params(full_params(ranks), ddp[0]["params"])
    assert_same_params(full_params(ranks), full_params(unsharded))
    for rank, values in enumerate(ranks):
        assert_same_logs(values["logged"], ddp[rank // 2]["logged"])


@pytest.mark.parametrize("name", ["full_to_optimizer", "none_to_full"])
def test_resume_from_one_shard_mode_into_another(name, d2k2):
    """A sharded folder written under 'full', resumed under 'optimizer'; a file written under 'none', under 'full'
    (a file written under 'full' resumed by Lightning's DDP: below)."""
    assert_same_params(full_params(d2k2[1][name]), full_params(d2k2[1]["whole"]))


def test_plain_lightning_resumes_a_sharded_run(d2k2, two):
    assert_same_params(two["ddp_from_full"][0]["params"], full_params(d2k2[1]["whole"]))


def test_full_shards_hold_a_quarter_of_the_training_state(d2k2):
    """Between steps, at D=2 x K=2 under AdamW, each rank's parameters, gradients and optimizer state: with
    shard='full' at most 0.3 of the whole model's (parameters, gradients and AdamW's two slots, 4 per element)."""
    whole = 4 * 4 * sum(p.numel() for p in full_params(d2k2[1]["adamw_none"]).values())
    shares = {mode: [rank["state_bytes"] / whole for rank in d2k2[1][f"adamw_{mode}"]] for mode in ("none", "optimizer", "full")}
    assert max(shares["full"]) <= 0.3, shares
    assert max(shares["full"]) < max(shares["optimizer"]) < max(shares["none"]), shares


def test_parameters_tied_across_stages_are_not_sharded(d2k2):
    errors = {rank["error"] for rank in d2k2[1]["tied_full"]}
    assert errors == {
        "ValueError: GPipeStrategy(shard='full') does not split parameters tied across stages, and this model ties"
        " body.6.weight: use shard='none'"
    }, errors


def test_observed_steps_report_one_gather_of_the_parameters(d2k2):
    """shard='full': a step gathers each stage's parameters once, for all its micro-batches; none when the
    epoch's validation, just before it, left them whole (2 steps per epoch: steps 1 and 2 are observed)."""
    folder = d2k2[0] / "observed_full"
    scalars = _scalars(folder)
    for stage in (0, 1):
        assert len(scalars[f"pipeline/allgather_s_stage{stage}"]) == 1, stage
        assert len(scalars[f"pipeline/allreduce_s_stage{stage}"]) == 2, stage
    trace = json.loads((folder / "pipeline_trace.json").read_text())["traceEvents"]
    kinds = [(e["args"]["step"], e["tid"], e["cat"]) for e in trace if e["ph"] == "X"]
    for step, stage in [(1, 0), (1, 1), (2, 0), (2, 1)]:
        assert kinds.count((step, stage, "allgather")) == (step == 1), (step, stage)
        assert kinds.count((step, stage, "forward")) == 3, (step, stage)  # M=3 micro-batches


def test_gradients_read_by_user_code_are_averaged_whole(d2k2):
    """A hook that reads the gradients (grad_norm in on_before_optimizer_step) sees them whole and averaged under
    shard='full' too, as under 'none': the replicas all-reduce them."""
    full, none = d2k2[1]["gradnorm_full"], d2k2[1]["gradnorm_none"]
    assert_same_params(full_params(full), full_params(none))
    for got, expected in zip(full, none):
        assert_same_logs(got["logged"], expected["logged"])
    assert any("grad_2.0_norm_total" in record[1] for record in full[0]["logged"]), full[0]["logged"][:3]


def test_what_reads_the_gradients_is_named(caplog):
    """The code that makes the replicas all-reduce a sharded stage's gradients, named in the log; nothing for a
    module and callbacks that leave them alone."""
    from _model import Classifier, PipelineGradNorm
    from lightning.pytorch.callbacks import Callback

    from lightning_gpipe.integration.build import _gradients_read

    class Reads(Callback):
        def on_after_backward(self, trainer, module):
            pass

    strategy = GPipeStrategy(data_parallel_size=2, shard="optimizer")
    plain = L.Trainer(logger=False, enable_checkpointing=False, gradient_clip_val=0.5)
    assert not _gradients_read(strategy, plain, Classifier())
    trainer = L.Trainer(logger=False, enable_checkpointing=False, callbacks=[Reads()], gradient_clip_val=0.5,
                        gradient_clip_algorithm="value")  # fmt: skip
    with caplog.at_level("INFO"):
        assert _gradients_read(strategy, trainer, PipelineGradNorm())
    assert (
        "GPipeStrategy(shard='optimizer'): the replicas average each stage's gradients whole (all-reduce), since"
        " PipelineGradNorm.on_before_optimizer_step, Reads.on_after_backward, gradient_clip_algorithm='value' may"
        " read them; without such code each replica receives its share alone (reduce-scatter)"
    ) in caplog.text
