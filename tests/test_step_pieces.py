"""The step's pieces, each driven directly in one process: held gradients, the backward plan, the record and
replay of logged calls (and their merge under a per-micro-batch schedule), and the state a re-materialized forward
replays."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch import nn

from lightning_gpipe.engine.recompute import BufferReplay, ForwardState
from lightning_gpipe.integration.backward import BackwardPlan, HeldGradients
from lightning_gpipe.integration.logs import muted_logs, record_logs, replay_logs, shareable
from lightning_gpipe.integration.microsteps import merge_logs, merge_output


def _params() -> list[torch.Tensor]:
    return [torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)]


def _backward(params: list[torch.Tensor], scale: float) -> None:
    sum(p.sum() * scale for p in params).backward()


def test_held_gradients_are_kept_from_zero_grad_and_handed_back():
    params = _params()
    params[0].grad = torch.full((2,), 7.0)  # the previous step's, which zero_grad would free
    held = HeldGradients()
    held.compute(lambda: _backward(params, 2.0), params, BackwardPlan.FRESH)
    assert [p.grad for p in params] == [None, None]  # Lightning's zero_grad sees nothing to zero
    assert [g.tolist() for g in held.of(params)] == [[2.0, 2.0], [2.0, 2.0, 2.0]]  # fresh: the old 7s are gone
    params[1].grad = torch.zeros(3)  # zero_grad(set_to_none=False) left zeros
    held.release()
    assert [p.grad.tolist() for p in params] == [[2.0, 2.0], [2.0, 2.0, 2.0]]
    held.release()  # nothing held any more
    assert params[0].grad.tolist() == [2.0, 2.0]


def test_accumulating_backward_adds_into_grad_and_holds_nothing():
    params = _params()
    params[0].grad = torch.full((2,), 1.0)
    held = HeldGradients()
    held.compute(lambda: _backward(params, 3.0), params, BackwardPlan.ACCUMULATE)
    assert params[0].grad.tolist() == [4.0, 4.0] and params[1].grad.tolist() == [3.0, 3.0, 3.0]
    assert held.of(params) == [None, None]


def test_held_gradients_are_kept_when_the_backward_fails_and_can_be_replaced_or_discarded():
    params, held = _params(), HeldGradients()

    def failing() -> None:
        _backward(params[:1], 1.0)
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        held.compute(failing, params, BackwardPlan.FRESH)
    assert params[0].grad is None and held.of(params)[0].tolist() == [1.0, 1.0] and held.of(params)[1] is None
    held.replace(params, [torch.full((2,), 5.0), None])  # the replicas' average
    assert held.of(params)[0].tolist() == [5.0, 5.0]
    held.discard()
    assert held.of(params) == [None, None]


class _Quiet(LightningModule):
    pass


class _ZeroGrad(LightningModule):
    def on_before_zero_grad(self, optimizer):
        pass


class _Reader(Callback):
    def on_before_backward(self, trainer, module, loss):
        pass


@pytest.mark.parametrize(
    ("module", "callbacks", "accumulate", "batch_idx", "plan"),
    [
        (_Quiet(), [], 1, 0, BackwardPlan.FRESH),
        (_Quiet(), [], 2, 0, BackwardPlan.FRESH),  # the first batch of an accumulation window: zero_grad follows
        (_Quiet(), [], 2, 1, BackwardPlan.ACCUMULATE),
        (_Quiet(), [Callback()], 1, 0, BackwardPlan.FRESH),  # a callback that overrides nothing in between
        (_ZeroGrad(), [], 1, 0, BackwardPlan.LATE),  # user code runs between the step and its backward
        (_Quiet(), [_Reader()], 2, 1, BackwardPlan.LATE),
    ],
)
def test_the_backward_plan(module, callbacks, accumulate, batch_idx, plan):
    trainer = SimpleNamespace(callbacks=callbacks, accumulate_grad_batches=accumulate)
    assert BackwardPlan.of(trainer, module, batch_idx) is plan


class _Logger(LightningModule):
    def __init__(self):
        super().__init__()
        self.made: list[tuple] = []

    def log(self, name, value, *args, **kwargs):
        self.made.append((name, value, args, kwargs))


def test_logged_calls_are_recorded_not_made_then_replayed_alike():
    last, other = _Logger(), _Logger()
    value = torch.tensor(2.0, requires_grad=True) * 3
    with record_logs(last) as records:
        last.log("loss", value, prog_bar=True)
        last.log("acc", 0.5)
    with muted_logs(other):
        other.log("own", 1.0)  # a stage that is not the last drops its own calls
    assert last.made == [] and other.made == [] and "log" not in last.__dict__
    sent = shareable(records)
    assert not sent[0][1].requires_grad and sent[0][1].item() == 6.0 and sent[0][3] == {"prog_bar": True}
    for module in (last, other):
        replay_logs(module, sent, torch.device("cpu"))
    assert [(n, float(v)) for n, v, _, _ in last.made] == [("loss", 6.0), ("acc", 0.5)] == [
        (n, float(v)) for n, v, _, _ in other.made
    ]


def test_a_replayed_call_that_raises_says_where_it_came_from():
    class Refuses(_Logger):
        def log(self, name, value, *args, **kwargs):
            raise ValueError("bad key")

    with pytest.raises(ValueError, match="bad key") as info:
        replay_logs(Refuses(), [("x", 1.0, (), {})], torch.device("cpu"))
    assert "GPipeStrategy records the last stage's calls and makes them on every stage" in info.value.__notes__[0]


def test_a_metric_object_cannot_be_logged_across_stages():
    from torchmetrics import MeanMetric

    module = _Logger()
    with pytest.raises(TypeError, match=r"self.log\('m', <MeanMetric>\): under GPipeStrategy only the last stage"):
        with record_logs(module):
            module.log("m", MeanMetric())


def test_a_recompute_replays_the_forwards_random_draws_and_leaves_the_callers_stream():
    torch.manual_seed(1)
    state = ForwardState.capture(torch.device("cpu"))
    first = torch.rand(3)
    after = torch.get_rng_state()
    with state.replay():
        again = torch.rand(3)
    assert torch.equal(first, again) and torch.equal(torch.get_rng_state(), after)


def test_a_recompute_replays_autocast_as_the_forward_had_it():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = ForwardState.capture(torch.device("cpu"))
    assert not torch.is_autocast_enabled("cpu")
    with state.replay():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x * self.calls


def test_buffer_replay_shows_a_recompute_the_buffers_its_forward_saw():
    layer = _Counter()
    replay = BufferReplay([layer])
    watched = replay.before()
    first = layer(torch.ones(1))
    kept = replay.after(watched)  # the values before this forward, of the buffers it changed
    layer(torch.ones(1))  # another micro-batch's forward moves the counter on
    with replay.replayed(kept):
        assert torch.equal(layer(torch.ones(1)), first)  # recomputed as the forward ran it
    assert layer.calls.item() == 2.0  # and left as the forwards left it


def test_per_microbatch_logs_merge_to_their_sample_weighted_mean():
    """Three micro-batches of 4, 3 and 3 samples: a mean logged per micro-batch merges to the whole batch's."""
    weights = [0.4, 0.3, 0.3]
    per_microbatch = [
        [("loss", torch.tensor(v), (), {"prog_bar": True}), ("acc", a, (), {})]
        for v, a in ((1.0, 0.5), (2.0, 1.0), (4.0, 0.0))
    ]
    merged = merge_logs(per_microbatch, weights, "Model.training_step")
    assert [(n, round(float(v), 6), kw) for n, v, _, kw in merged] == [("loss", 2.2, {"prog_bar": True}), ("acc", 0.5, {})]
    output = merge_output([{"loss": torch.tensor(1.0), "n": 2}, {"loss": torch.tensor(3.0), "n": 4}], [0.5, 0.5], "s")
    assert float(output["loss"]) == 2.0 and output["n"] == 3.0
    assert float(merge_output([torch.tensor(1.0), torch.tensor(2.0)], [0.25, 0.75], "s")) == 1.75


def test_per_microbatch_logs_that_cannot_merge_are_refused():
    with pytest.raises(ValueError, match=r"logged \['loss'\] for micro-batch 0 but \['other'\] for micro-batch 1"):
        merge_logs([[("loss", 1.0, (), {})], [("other", 1.0, (), {})]], [0.5, 0.5], "Model.training_step")
    with pytest.raises(TypeError, match=r"self.log\('v', ...\) of M.training_step is Tensor; under a per-micro-batch"):
        merge_logs([[("v", torch.ones(3), (), {})]] * 2, [0.5, 0.5], "M.training_step")
    with pytest.raises(TypeError, match=r"'logits' of what M.training_step returned is Tensor"):
        merge_output([{"loss": torch.tensor(1.0), "logits": torch.ones(2, 3)}] * 2, [0.5, 0.5], "M.training_step")
