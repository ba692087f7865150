"""parallel/shard.py's StageShards on two gloo processes: each replica steps its share of every parameter, and the
result is the whole optimizer's step; its state gathers whole, loads back split, and ``full`` frees the rest."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_gpipe.instrument.timeline import Timeline
from lightning_gpipe.parallel.shard import GradientScatter, StageShards, _bounds, check_elementwise

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], lr=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.5),  # state built eagerly
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, shards, rank: int, scatter: bool = False) -> None:
    """Three steps on this replica's data, gradients averaged over two replicas as the strategy does: all-reduced
    whole, or (``scatter``) each replica receiving its share alone."""
    for step in range(3):
        generator = torch.Generator().manual_seed(10 * step + rank)
        x, y = torch.randn(4, 3, generator=generator), torch.randn(4, 1, generator=generator)
        if shards is not None:
            shards.gather()

        def closure():
            optimizer.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            params = list(model.parameters())
            if scatter:
                average = GradientScatter(shards)
                average.start(params, [p.grad for p in params])
                assert average.finish() == [None] * len(params)
                for p in params:
                    p.grad = None
            elif shards is not None:
                for p in params:
                    dist.all_reduce(p.grad.div_(2))
            return loss

        if shards is None:  # the reference: every replica's data, averaged, on one process
            optimizer.zero_grad()
            for replica in range(2):
                g = torch.Generator().manual_seed(10 * step + replica)
                xr, yr = torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)
                (((model(xr) - yr) ** 2).mean() / 2).backward()
            optimizer.step()
        else:
            with shards.stepping():
                optimizer.step(closure)


CASES = [("sgd", False, False), ("adamw", True, True), ("adagrad", False, True)]  # optimizer, full, scatter


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, full, scatter in CASES:
            _case(rank, name, full, scatter, out)
    finally:
        dist.destroy_process_group()


def _case(rank: int, name: str, full: bool, scatter: bool, out: str) -> None:
    model = _model()
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    params = list(model.parameters())
    shards = StageShards(optimizer, model, None, 2, rank, full, Timeline(rank))
    if full:  # between steps only this replica's elements are held, and the module holds placeholders
        assert all(p.untyped_storage().nbytes() == 0 for p in params)
        assert all(p.is_meta and p.shape == q.shape for p, q in zip(model.parameters(), params))
    _steps(model, optimizer, shards, rank, scatter)
    held = [p.untyped_storage().nbytes() for p in params]
    placed = [p is q for p, q in zip(model.parameters(), params)]
    state = shards.state_dict()
    sizes = [tuple(v.shape) for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    shards.close()
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "state": state, "held": held,
                "sizes": sizes, "closed": optimizer.state_dict(), "placed": placed,
                "whole_after_close": [p is q for p, q in zip(model.parameters(), params)]}, f"{out}/{name}.{rank}.pt")  # fmt: skip


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    from launch import free_port

    out = tmp_path_factory.mktemp("shards")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("name,full,scatter", CASES)
def test_shards_step_as_the_whole_optimizer(name, full, scatter, stepped):
    model = _model()
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    _steps(model, optimizer, None, 0)
    expected = optimizer.state_dict()
    for rank in range(2):
        got = torch.load(stepped / f"{name}.{rank}.pt")
        for p, q in zip(got["params"], model.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-6), (rank, p, q)
        # the state, gathered whole, is the whole optimizer's; after close() it is whole in place
        for state in (got["state"], got["closed"]):
            assert state["param_groups"] == expected["param_groups"]
            for i, entries in expected["state"].items():
                assert state["state"][i].keys() == entries.keys()
                for key, value in entries.items():
                    assert torch.allclose(state["state"][i][key], value, rtol=0, atol=1e-6), (rank, i, key)
        # per replica, state entries are its share: weights 15 = 8 + 7, 5 = 3 + 2, 5 x 1 = 3 + 2, bias 1 = 1 + 0
        shares = [hi - lo for p in model.parameters() for lo, hi in [_bounds(p.numel(), 2, rank)]]
        assert shares == ([8, 3, 3, 1] if rank == 0 else [7, 2, 2, 0])
        per_key = {"sgd": 1, "adamw": 2, "adagrad": 1}[name]
        assert got["sizes"] == [(s,) for s in shares for _ in range(per_key)]
        assert got["whole_after_close"] == [True] * 4
        if full:  # the stepped parameters' storage freed, until gathered
            assert got["held"] == [0, 0, 0, 0] and got["placed"] == [False] * 4
        else:
            assert got["placed"] == [True] * 4
            assert got["held"] == [p.untyped_storage().nbytes() for p in model.parameters()]


def test_only_elementwise_optimizers_are_split():
    lbfgs = torch.optim.LBFGS([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError) as error:
        check_elementwise(lbfgs, "full")
    assert str(error.value) == (
        "GPipeStrategy(shard='full') steps each replica's share of every parameter's elements, which keeps the"
        " optimizer's arithmetic only for an elementwise step; LBFGS is not one of SGD, Adam, AdamW, Adamax, NAdam,"
        " RAdam, RMSprop, Rprop, Adagrad, Adadelta: use one of them, or shard='none'"
    )


def test_full_refuses_buffers_that_live_in_a_parameters_storage():
    """shard='full' frees the parameters' storage between steps, which would free such a buffer with it."""
    layer = nn.Linear(2, 2)
    layer.register_buffer("first_row", layer.weight.detach()[0])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(ValueError) as error:
        StageShards(optimizer, layer, None, 2, 0, True, Timeline(0))
    assert str(error.value) == (
        "GPipeStrategy(shard='full') frees each parameter's storage between steps, and the buffers first_row live in"
        " a parameter's storage: use shard='optimizer' or 'none'"
    )


def test_a_failed_run_leaves_the_module_whole_in_shape():
    """After a failure no replica can gather: the parameters are back in the module, this replica's own elements
    as it held them and NaN elsewhere (no collective runs)."""
    layer = nn.Linear(3, 5)
    weight = layer.weight.detach().clone()
    shards = StageShards(torch.optim.SGD(layer.parameters(), lr=0.1), layer, None, 2, 1, True, Timeline(1))
    assert layer.weight.is_meta
    shards.abandon()
    flat = layer.weight.detach().view(-1)
    assert not layer.weight.is_meta and layer.weight.shape == (5, 3)
    assert torch.equal(flat[8:], weight.view(-1)[8:]) and flat[:8].isnan().all()  # replica 1 of 2 owns 8 .. 14
