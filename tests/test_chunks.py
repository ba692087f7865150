"""Several model chunks per rank (interleaved 1F1B), driven directly: no Lightning, real gloo processes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from p2p_order import nccl_order_problems, recorded

from lightning_gpipe.engine.chunks import RankChunks
from lightning_gpipe.engine.microbatch import merge, shape_keys, split
from lightning_gpipe.engine.pairs import PairedLink
from lightning_gpipe.schedule import Phase
from lightning_gpipe.schedule.interleaved import Interleaved1F1B


def _model(stages: int) -> list[nn.Sequential]:
    """``stages`` chunks of two layers each."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(stages)]


def _loss(y: torch.Tensor) -> torch.Tensor:
    return y.pow(2).sum(-1).mean()


def _worker(rank: int, k: int, port: int, out: str) -> None:
    """K ranks of v=2 chunks: a training step per checkpoint mode and batch shape (M = K and 2K; 19 rows, uneven
    micro-batches; a second step of the same shapes sends no header), then an evaluation forward."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=k)
    cpu, v = torch.device("cpu"), 2
    try:
        results, ops = [], []
        with recorded(ops):
            for checkpoint, m, rows in (("never", k, 8), ("always", 2 * k, 19), ("except_last", 2 * k, 19)):
                model = _model(k * v)
                reference = copy.deepcopy(model)
                x = torch.randn(rows, 6)
                micro = split(x, m)
                y_ref = nn.Sequential(*reference)(x)
                # the sharpest reference: the same micro-batches, each loss scaled by its share of the samples
                sum(_loss(nn.Sequential(*reference)(piece)) * len(piece) / rows for piece in micro).backward()
                schedule = Interleaved1F1B(checkpoint, v)
                link = PairedLink(rank, k, cpu, schedule)
                mine = [model[c * k + rank] for c in range(v)]
                executor = RankChunks([list(chunk) for chunk in mine], rank, k, cpu, link, schedule)
                keys = shape_keys(x, m, True)
                for _ in range(2):  # two steps: gradients accumulate, the second sends no header
                    if rank < k - 1:
                        executor.run(micro, len(micro), keys)
                    else:
                        executor.begin(len(micro), keys)
                        for action in executor.actions(len(micro)):
                            if action.phase is Phase.BACKWARD:
                                executor.backward_one(action)
                                continue
                            y = executor.forward_one(action, None, train=True)
                            if executor.holds_loss(action):
                                (_loss(y) * len(micro[action.i]) / rows).backward()
                        executor.flush()
                expected = [2 * p.grad for c in range(v) for p in reference[c * k + rank].parameters()]
                got = [p.grad for chunk in mine for p in chunk.parameters()]
                for g, e in zip(got, expected, strict=True):
                    torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
                with torch.no_grad():
                    outputs = executor.forward(micro, len(micro), train=False, keys=shape_keys(x, m, False))
                    odd = executor.forward(split(x, k + 1), k + 1, train=False, keys=shape_keys(x, k + 1, False))
                if rank == k - 1:  # evaluation takes any M, not only multiples of K
                    torch.testing.assert_close(merge(outputs), y_ref, rtol=0, atol=1e-6)
                    torch.testing.assert_close(merge(odd), y_ref, rtol=0, atol=1e-6)
                results.append((link.headers_sent, link.headers_received))
        torch.save((results, ops), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("k", [3])
def test_interleaved_ranks_equal_one_device_and_pair_up(k, tmp_path):
    """Every chunk's gradients equal one device's on the same micro-batches (1e-6) in each checkpoint mode, evaluation
    outputs too; every two ranks' messages pair up in one order, as NCCL needs; headers only for new shapes. K=3: a
    pair of neighbours, and the wrap from the last rank to the first (K=2, where two ranks exchange activations both
    ways, runs in tests/test_strategy.py's launch, under the same pair check)."""
    from launch import free_port

    mp.spawn(_worker, args=(k, free_port(), str(tmp_path)), nprocs=k, join=True)
    results, ops = zip(*(torch.load(tmp_path / f"rank{rank}.pt") for rank in range(k)))
    assert nccl_order_problems(list(ops)) == []
    # per link: one header per boundary it sends across for each new key (train, then evaluation shapes)
    sent = [r[-1][0] for r in results]
    assert sum(sent) == sum(r[-1][1] for r in results) > 0


def test_a_batch_the_schedule_cannot_order_is_refused_before_any_message():
    """Interleaved 1F1B takes micro-batches in groups of K: a short batch splitting into 3 at K=2 is refused, with
    the values, when its step begins (every rank alike, before it sends anything)."""
    schedule, cpu = Interleaved1F1B("never", 2), torch.device("cpu")
    executor = RankChunks([[nn.Linear(2, 2)], [nn.Linear(2, 2)]], 0, 2, cpu, PairedLink(0, 2, cpu, schedule), schedule)
    with pytest.raises(ValueError, match=(
        r"GPipeStrategy\(schedule='interleaved'\): this batch splits into 3 micro-batches: interleaved 1F1B takes"
        r" micro-batches in groups of K: microbatches=3 is not a multiple of K=2. Every batch needs at least M rows"
    )):  # fmt: skip
        executor.begin(3)
    with pytest.raises(ValueError, match="schedule 'interleaved' runs 2 chunks per rank, given 1"):
        RankChunks([[nn.Linear(2, 2)]], 0, 2, cpu, PairedLink(0, 2, cpu, schedule), schedule)
