"""The stage executor and its links, driven directly: no Lightning, real gloo processes for K=2."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from p2p_order import nccl_order_problems, recorded

from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.microbatch import merge, shape_keys, split
from lightning_gpipe.engine.p2p import StageLink

MODES = ("always", "except_last", "never")


class Pair(nn.Module):
    """Returns a tuple with an integer tensor, which crosses the stage boundary without a gradient."""

    def __init__(self, c: int):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        return self.lin(x), (x > 0).sum(-1)  # (B, T, C), (B, T)


class UsePair(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, pair):
        h, count = pair
        h = torch.relu_(h)  # in place, on what the stage received
        return self.lin(h) * count.unsqueeze(-1)


def _layers(dropout: float = 0.0) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, 4), nn.Dropout(dropout), nn.Tanh(), Pair(4), UsePair(4), nn.Dropout(dropout), nn.Linear(4, 2)]


def _loss(y: torch.Tensor) -> torch.Tensor:
    return y.pow(2).sum() / 3


def _pipeline_grads(layers, x, m, checkpoint, k=1, stage=0, link=None, split_at=None, schedule=None, keyed=False):
    """One training step of the executor; returns this stage's parameter gradients and the output (last stage).
    ``keyed``: the micro-batches' shape keys go with it, as the strategy passes them."""
    mine = layers if k == 1 else (layers[:split_at] if stage == 0 else layers[split_at:])
    executor = StageExecutor(mine, stage, k, torch.device("cpu"), link, checkpoint, schedule=schedule)
    micro = split(x, m)
    outputs = executor.forward(micro, len(micro), train=True, keys=shape_keys(x, m, True) if keyed else None)
    y = None
    if executor.is_last:
        y = merge(outputs)
        _loss(y).backward()
    executor.backward()
    return [p.grad.clone() for layer in mine for p in layer.parameters()], y


def _reference_grads(layers, x, loss=_loss):
    y = nn.Sequential(*layers)(x)
    loss(y).backward()
    return [p.grad.clone() for layer in layers for p in layer.parameters()], y


@pytest.mark.parametrize("checkpoint", MODES)
@pytest.mark.parametrize("m", [1, 3])
def test_single_stage_gradients_equal_reference(checkpoint, m):
    x = torch.randn(10, 3, 4)
    expected, y_ref = _reference_grads(_layers(), x)
    got, y = _pipeline_grads(_layers(), x, m, checkpoint)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_dropout_replayed_on_recompute():
    x = torch.randn(10, 3, 4)
    results = {}
    for mode in ("always", "never"):
        torch.manual_seed(7)
        results[mode] = _pipeline_grads(_layers(dropout=0.5), x, 3, mode)
    (g_always, y_always), (g_never, y_never) = results["always"], results["never"]
    assert torch.equal(y_always, y_never)
    for a, b in zip(g_always, g_never):
        assert torch.equal(a, b)


def test_recompute_leaves_batchnorm_statistics_alone():
    stats = {}
    for mode in MODES:
        torch.manual_seed(0)
        layers = [nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh()]
        _pipeline_grads(layers, torch.randn(12, 4), 4, mode)
        stats[mode] = (layers[1].num_batches_tracked.item(), layers[1].running_mean.clone(), layers[1].running_var.clone())
    for mode in MODES:
        assert stats[mode][0] == 4  # one update per micro-batch, none from recompute
        torch.testing.assert_close(stats[mode][1:], stats["never"][1:], rtol=0, atol=0)


class CountingNormalizer(nn.Module):
    """Buffers its training forward changes: an input mean kept in place, and a call count assigned anew."""

    def __init__(self, c: int, from_call: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.from_call = from_call  # the first call that updates the mean

    def forward(self, x):
        if self.training:
            if self.calls >= self.from_call:
                self.mean.mul_(0.5).add_(x.detach().mean(0), alpha=0.5)
            self.calls = self.calls + 1
        return x - self.mean


def _counting_layers(from_call: int = 0) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, 4), CountingNormalizer(4, from_call), nn.Tanh(), nn.Linear(4, 2)]


def test_recompute_reads_and_leaves_buffers_as_the_forward_did():
    """A re-materialized micro-batch reads the buffers as its first forward did (not as later micro-batches left
    them) and leaves them as the forwards did: exactly the run without re-materialization."""
    x = torch.randn(12, 4)
    results = {}
    for mode in MODES:
        layers = _counting_layers()
        grads, y = _pipeline_grads(layers, x, 3, mode)
        results[mode] = (grads, y, layers[1].mean.clone(), layers[1].calls.item())
    for mode in MODES:
        grads, y, mean, calls = results[mode]
        assert calls == 3  # one update per micro-batch's forward, none from a recompute
        assert torch.equal(mean, results["never"][2])
        assert torch.equal(y, results["never"][1])
        for g, e in zip(grads, results["never"][0]):
            assert torch.equal(g, e)


def test_a_buffer_first_changed_in_place_after_the_first_forward_is_refused():
    from lightning_gpipe.engine.recompute import BufferReplayError

    with pytest.raises(BufferReplayError, match=(
        r"^GPipeStrategy: the forward changed buffer 'mean' of CountingNormalizer in place, which the first training"
        r" forward of this stage left alone, so its re-materialized replay cannot read the value the forward read\."
        r" Change it in every training forward, or use GPipeStrategy\(checkpoint='never'\)\.$"
    )):  # fmt: skip
        _pipeline_grads(_counting_layers(from_call=1), torch.randn(12, 4), 3, "always")


def test_evaluation_forward_keeps_no_state():
    executor = StageExecutor(_layers(), 0, 1, torch.device("cpu"), None, "never")
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        (y,) = executor.forward([x], 1, train=False)
    assert not y.requires_grad and executor._slots == [None]


def _two_stage_worker(rank: int, port: int) -> None:
    from test_schedule import BackwardInForwardOrder  # a toy schedule: backward in forward order

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        link, keyed = StageLink(rank, 2, torch.device("cpu")), StageLink(rank, 2, torch.device("cpu"))
        # Batch size, sequence length and micro-batch count change from step to step; the last step's shapes are the
        # first's. Without keys every micro-batch's activations take a header; with them, only shapes not met before.
        headers = []
        for step, (b, t, m) in enumerate([(10, 3, 3), (7, 5, 4), (2, 1, 3), (10, 3, 3)]):
            for checkpoint, schedule in [(mode, None) for mode in MODES] + [("always", BackwardInForwardOrder())]:
                torch.manual_seed(step)
                x = torch.randn(b, t, 4)
                layers = _layers()
                expected, y_ref = _reference_grads(copy.deepcopy(layers), x)
                for use in (link, keyed):
                    got, y = _pipeline_grads(
                        copy.deepcopy(layers), x, m, checkpoint, k=2, stage=rank, link=use, split_at=4,
                        schedule=schedule, keyed=use is keyed,
                    )  # fmt: skip
                    mine = expected[: len(got)] if rank == 0 else expected[-len(got) :]
                    for g, e in zip(got, mine):
                        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
                    if rank == 1:
                        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
            headers.append(keyed.headers_sent if rank == 0 else keyed.headers_received)
        # Micro-batch sizes 4, 3, 3 (two keys); 2, 2, 2, 1; 1, 1; then 4, 3, 3 again: nothing new.
        assert headers == [2, 4, 5, 5], headers
        assert link.headers_sent + link.headers_received == 4 * (3 + 4 + 2 + 3)  # four runs a step, each micro-batch
        # A stage whose output shapes change for an input of the same shapes is refused at the sender, before it
        # sends anything (the receiver posts nothing for it here).
        if rank == 0:
            with pytest.raises(ValueError) as refused:
                keyed.send_activations(0, (torch.zeros(4, 3, 2), torch.zeros(4, 3)), key=(True, 4, (((3, 4), torch.float32),)))
            assert str(refused.value) == (
                "GPipeStrategy: stage 0's output for micro-batch 0 has shapes [4, 3, 2] float32, [4, 3] float32, where"
                " an input of the same shapes gave [4, 3, 4] float32, [4, 3] int64 before: its shapes depend on the"
                " input's values, not only on its shapes. Send them with every micro-batch: GPipeStrategy(headers='always')"
            )
    finally:
        dist.destroy_process_group()


def test_two_stages_over_gloo_equal_reference():
    from launch import free_port

    mp.spawn(_two_stage_worker, args=(free_port(),), nprocs=2, join=True)


def _one_f_one_b_worker(rank: int, port: int, out: str) -> None:
    """Four stages of 1F1B driven as the step drives them: each micro-batch's loss (scaled by its share of the
    samples) on the last stage as its forward ends; then GPipe's F-then-B; each stage's peak of saved activations."""
    from lightning_gpipe.schedule import GPipe, OneFOneB, Phase

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=4)
    try:
        link, cpu, m = StageLink(rank, 4, torch.device("cpu")), torch.device("cpu"), 16
        torch.manual_seed(0)
        layers = [nn.Linear(8, 8) if i % 2 == 0 else nn.Tanh() for i in range(8)]
        x = torch.randn(35, 8)  # uneven micro-batches: 3 rows, and 2 in the last five
        expected, _ = _reference_grads(copy.deepcopy(layers), x, loss=lambda y: y.pow(2).sum(-1).mean())
        mine = layers[2 * rank : 2 * rank + 2]
        peaks, ops = {}, []
        recording = recorded(ops)
        recording.__enter__()
        for schedule in (OneFOneB("never"), GPipe("never")):
            for p in (p for layer in mine for p in layer.parameters()):
                p.grad = None
            executor = StageExecutor(mine, rank, 4, cpu, link, schedule=schedule)
            executor.meter.start(executor.parameters())
            micro = split(x, m)
            if schedule.loss_per_microbatch and rank < 3:
                executor.run(micro, len(micro))
            elif schedule.loss_per_microbatch:  # the last stage: its loss between each forward and its backward
                executor.begin(len(micro))
                for action in schedule.actions(4, len(micro), rank):
                    if action.phase is Phase.FORWARD:
                        y = executor.forward_one(action, None, train=True)
                        (y.pow(2).sum(-1).mean() * len(micro[action.i]) / len(x)).backward()
                    else:
                        executor.backward_one(action)
                executor.flush()
            else:
                outputs = executor.forward(micro, len(micro), train=True)
                if rank == 3:
                    merge(outputs).pow(2).sum(-1).mean().backward()
                executor.backward()
            peaks[schedule.name] = executor.meter.stop()
            got = [p.grad for layer in mine for p in layer.parameters()]
            for g, e in zip(got, expected[2 * rank : 2 * rank + 2], strict=True):
                torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
        recording.__exit__(None, None, None)
        torch.save((peaks, ops), f"{out}/peaks{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_1f1b_over_four_stages_equals_reference_and_holds_fewer_activations(tmp_path):
    """1F1B's gradients equal one device's (1e-6), and stage 0 holds at most K of the M micro-batches' activations
    at once: its peak is at most K/M + 0.1 of F-then-B's at K=4, M=16, checkpoint="never"."""
    from launch import free_port

    mp.spawn(_one_f_one_b_worker, args=(free_port(), str(tmp_path)), nprocs=4, join=True)
    peaks, ops = zip(*(torch.load(tmp_path / f"peaks{rank}.pt") for rank in range(4)))
    assert nccl_order_problems(list(ops)) == []  # the messages pair up in one order on both ends, as NCCL needs
    assert peaks[0]["1f1b"] <= (4 / 16 + 0.1) * peaks[0]["gpipe"]
    assert [p["1f1b"] < p["gpipe"] for p in peaks] == [True] * 4
