"""Observability: timelines, bubble, activation memory, and what reaches TensorBoard."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_scenarios
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.schedule import interleaved_one_f_one_b, one_f_one_b
from lightning_gpipe.engine.microbatch import merge, split
from lightning_gpipe.instrument.timeline import Event, bubble, chrome_trace, draw_schedule, theoretical_bubble
from lightning_gpipe.schedule.gpipe import clock_cycles


@pytest.mark.parametrize(("k", "m"), [(2, 4), (4, 8), (3, 1)])
def test_bubble_of_an_equal_cost_timeline_is_gpipes(k, m):
    events = [
        Event(j, a.phase.value, a.i, float(t), t + 1.0) for t, tick in enumerate(clock_cycles(k, m)) for j, a in tick
    ]
    overall, per_stage = bubble(events, k)
    assert overall == pytest.approx(theoretical_bubble(k, m)) == pytest.approx((k - 1) / (m + k - 1))
    assert theoretical_bubble(k, m, chunks=2) == pytest.approx((k - 1) / 2 / (m + (k - 1) / 2))
    assert per_stage == pytest.approx([overall] * k)


def test_waiting_is_idle_time():
    events = [Event(0, "forward", 0, 0.0, 1.0), Event(0, "recv", 0, 1.0, 3.0), Event(1, "forward", 0, 1.0, 4.0)]
    overall, per_stage = bubble(events, 2)
    assert per_stage == pytest.approx([0.75, 0.25]) and overall == pytest.approx(0.5)


def _activation_peak(checkpoint: str, m: int = 4, b: int = 4, w: int = 32) -> int:
    torch.manual_seed(0)
    layers = [layer for _ in range(4) for layer in (nn.Linear(w, w), nn.Tanh())]
    executor = StageExecutor(layers, 0, 1, torch.device("cpu"), None, checkpoint)
    executor.meter.start(p for layer in layers for p in layer.parameters())
    outputs = executor.forward(split(torch.randn(m * b, w), m), m, train=True)
    merge(outputs).sum().backward()
    executor.backward()
    assert executor.meter.current == 0  # everything counted was freed again
    return executor.meter.stop()


def test_rematerialization_saves_activation_memory():
    # Per micro-batch of b x w floats, autograd keeps the stage input and the four Tanh outputs
    # (each Linear saves its input, which is the previous Tanh's output; weights do not count).
    row = 4 * 32 * 4  # one b x w float32 tensor
    assert _activation_peak("never") == 4 * 5 * row  # all M micro-batches' activations
    assert _activation_peak("always") == (4 + 4) * row  # M stage inputs, plus one micro-batch recomputed
    assert _activation_peak("except_last") == (3 + 5) * row  # the last micro-batch keeps its graph


def test_gantt_and_trace(tmp_path):
    events = [Event(0, "forward", 0, 0.0, 1.0), Event(1, "forward", 0, 1.0, 2.0), Event(1, "recv", 0, 0.0, 1.0)]
    fig = draw_schedule(events, 2, "test")
    assert [t.get_text() for t in fig.axes[0].texts] == ["F0", "F0"]
    chrome_trace({5: events}, tmp_path / "trace.json")
    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert [(e["name"], e["tid"], e["ts"]) for e in trace if e["ph"] == "X"] == [
        ("forward 0", 0, 0.0), ("forward 0", 1, 1e6), ("recv 0", 1, 0.0)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("observe")
    scenario = {"name": "observed", "k": 2, "strategy": {"microbatches": 4, "checkpoint": "always",
                "observe_every_n_steps": 1}, "tensorboard": True, "trainer": {"max_steps": 3}}  # fmt: skip
    interleaved = {**scenario, "name": "observed_interleaved", "model_class": "MeanLossClassifier",
                   "strategy": {**scenario["strategy"], "schedule": "interleaved"}}  # fmt: skip
    run_scenarios(2, [scenario, interleaved], folder)
    return folder / "observed"


def test_observed_run_records_f_then_b_per_stage(observed):
    trace = json.loads((observed / "pipeline_trace.json").read_text())["traceEvents"]
    steps = sorted({e["args"]["step"] for e in trace if e["ph"] == "X"})
    assert steps == [1, 2]  # every step but the first (warm-up)
    for step in steps:
        for stage in (0, 1):
            work = [e["name"] for e in sorted(trace, key=lambda e: e.get("ts", 0))
                    if e["ph"] == "X" and e["tid"] == stage and e["args"]["step"] == step and e["cat"] in ("forward", "backward")]  # fmt: skip
            assert work == ["forward 0", "forward 1", "forward 2", "forward 3",
                            "backward 3", "backward 2", "backward 1", "backward 0"]  # fmt: skip
        recomputes = [e for e in trace if e["ph"] == "X" and e["args"]["step"] == step and e["cat"] == "recompute"]
        assert len(recomputes) == 8  # checkpoint="always": every micro-batch on both stages


@pytest.fixture(scope="module")
def observed3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("observe3")
    scenario = {"name": "observed", "k": 3, "strategy": {"microbatches": 4, "observe_every_n_steps": 1},
                "tensorboard": True, "trainer": {"max_steps": 3}}  # fmt: skip
    one_f_one_b = {**scenario, "name": "observed_1f1b", "model_class": "MeanLossClassifier",
                   "strategy": {**scenario["strategy"], "schedule": "1f1b"}}  # fmt: skip
    run_scenarios(3, [scenario, one_f_one_b], folder)
    return folder / "observed"


def test_an_observed_1f1b_step_shows_its_order(observed3):
    """Observed under 1F1B, each stage's forwards and backwards run in 1F1B's order, as the schedule lists them."""
    trace = json.loads((observed3.parent / "observed_1f1b" / "pipeline_trace.json").read_text())["traceEvents"]
    for step in (1, 2):
        for stage in range(3):
            work = [e["name"] for e in sorted(trace, key=lambda e: e.get("ts", 0)) if e["ph"] == "X"
                    and e["tid"] == stage and e["args"]["step"] == step and e["cat"] in ("forward", "backward")]  # fmt: skip
            expected = [f"{a.phase.value} {a.i}" for a in one_f_one_b(3, 4, stage)]
            assert work == expected, (step, stage)


def test_an_observed_interleaved_step_shows_its_order(observed):
    """Observed under interleaved 1F1B (v=2), each rank runs its two chunks' forwards and backwards in the schedule's
    order, and the theoretical bubble counts the chunks: ((K-1)/v) / (M + (K-1)/v) = 1/9."""
    folder = observed.parent / "observed_interleaved"
    trace = json.loads((folder / "pipeline_trace.json").read_text())["traceEvents"]
    for step in (1, 2):
        for rank in range(2):
            work = [e["name"] for e in sorted(trace, key=lambda e: e.get("ts", 0)) if e["ph"] == "X"
                    and e["tid"] == rank and e["args"]["step"] == step and e["cat"] in ("forward", "backward")]  # fmt: skip
            assert work == [f"{a.phase.value} {a.i}" for a in interleaved_one_f_one_b(2, 4, rank, 2)], (step, rank)
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [e.value for e in events.Scalars("pipeline/bubble_theory")] == pytest.approx([1 / 9, 1 / 9])
    assert all(e.value > 0 for e in events.Scalars("memory/activation_bytes_peak_stage1"))


def test_backward_starts_before_the_last_stages_results_arrive(observed3):
    """No stage's backward waits for the results: the last stage puts them together after its own backward.
    Its logged calls go ahead, and the other stages make them before their backward, while they wait."""
    trace = json.loads((observed3 / "pipeline_trace.json").read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    for step in (1, 2):
        for stage in (0, 1):
            mine = [e for e in spans if e["tid"] == stage and e["args"]["step"] == step]
            first_backward = min(e["ts"] for e in mine if e["cat"] == "backward")
            (results,) = [e for e in mine if e["cat"] == "results"]
            assert first_backward < results["ts"], (step, stage)
            last_backward = max(e["ts"] + e["dur"] for e in mine if e["cat"] == "backward")
            assert last_backward <= results["ts"]  # the whole backward ran before the results were taken
            (logs,) = [e for e in mine if e["cat"] == "logs"]
            last_forward = max(e["ts"] + e["dur"] for e in mine if e["cat"] == "forward")
            assert last_forward <= logs["ts"] and logs["ts"] + logs["dur"] <= first_backward, (step, stage)
        last = [e for e in spans if e["tid"] == 2 and e["args"]["step"] == step]
        (sent,) = [e for e in last if e["cat"] == "results"]
        assert max(e["ts"] + e["dur"] for e in last if e["cat"] == "backward") <= sent["ts"]  # sent after its backward
        (logs,) = [e for e in last if e["cat"] == "logs"]
        assert logs["ts"] + logs["dur"] <= min(e["ts"] for e in last if e["cat"] == "backward")  # sent before it


def test_observed_run_reaches_tensorboard(observed):
    events = EventAccumulator(str(observed), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("pipeline/bubble_measured", "pipeline/bubble_theory", "pipeline/bubble_measured_stage1",
                "pipeline/compute_s_stage0", "pipeline/comm_wait_s_stage1", "memory/activation_bytes_peak_stage0",
                "memory/param_bytes_stage1", "memory/optimizer_bytes_stage0", "memory/host_peak_bytes_stage1"):  # fmt: skip
        assert tag in scalars, tag
    peaks = [e.value for e in events.Scalars("memory/host_peak_bytes_stage1")]
    assert 100 * 2**20 < peaks[0] <= peaks[-1] < 8 * 2**30  # torch alone takes over 100 MiB; a peak only grows
    assert [e.value for e in events.Scalars("pipeline/bubble_theory")] == pytest.approx([1 / 5, 1 / 5])
    assert all(0 < e.value < 1 for e in events.Scalars("pipeline/bubble_measured"))
    assert events.Tags()["images"] == ["pipeline/schedule"]
    assert len(events.Images("pipeline/schedule")) == 2
