"""Skip connections: the programming model on one device, their routes, and skips across real gloo stages."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_same_logs, assert_same_params, full_params, reference_run, run_scenarios, scenario
from torch import nn

import p2p_order

from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.microbatch import shape_keys, split
from lightning_gpipe.engine.p2p import StageLink
from lightning_gpipe.engine.skip import Namespace, Port, SkipError, pop, skip_routes, skippable, stage_ports, stash

MODES = ("always", "except_last", "never")


@skippable(stash=["skip"])
class Stash(nn.Module):
    """A linear layer that keeps its input for a later layer."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        yield stash("skip", x)
        return self.lin(x)


@skippable(pop=["skip"])
class Pop(nn.Module):
    """Adds the popped tensor, through tanh and scaled, to a linear layer's output."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        skip = yield pop("skip")
        return self.lin(x) + 2 * skip.tanh()


def _model(local: bool = True) -> nn.Sequential:
    """Layers 0..5: a skip from layer 0 to layer 4 and, with ``local``, one from layer 2 to layer 3. Split
    (2, 2, 2) in three stages, the first crosses from stage 0 to stage 2 and the second stays on stage 1."""
    torch.manual_seed(0)
    inner = Namespace("inner")
    return nn.Sequential(
        Stash(),
        nn.Tanh(),
        Stash().isolate(inner) if local else nn.Linear(4, 4),
        Pop().isolate(inner) if local else nn.Linear(4, 4),
        Pop(),
        nn.Linear(4, 2),
    )


def test_skippable_modules_run_in_a_plain_sequential():
    model = _model()
    x = torch.randn(3, 4)
    l0, l2, l3, l4, l5 = model[0].lin, model[2].lin, model[3].lin, model[4].lin, model[5]
    h0 = l0(x).tanh()
    h3 = l3(l2(h0)) + 2 * h0.tanh()
    expected = l5(l4(h3) + 2 * x.tanh())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert list(model.state_dict())[:2] == ["0.lin.weight", "0.lin.bias"]  # the class is kept: keys unchanged


def test_routes_and_ports():
    routes = skip_routes(_model())
    assert [(r.name, r.stash_layer, r.pop_layer) for r in routes] == [("'skip'", 0, 4), ("'skip' in inner", 2, 3)]
    outer = routes[0].key
    assert stage_ports(routes, [2, 2, 2], 0) == ([Port(0, outer, 2)], [])
    assert stage_ports(routes, [2, 2, 2], 1) == ([], [])  # the inner skip stays on stage 1
    assert stage_ports(routes, [2, 2, 2], 2) == ([], [Port(0, outer, 0)])
    assert stage_ports(routes, [5, 1], 0) == ([], [])


def test_interleaved_refuses_skips_between_stages():
    """Under interleaved 1F1B a skip must stay within one of the K*v stages (its messages are not ordered with the
    chunks'); skips inside a stage are allowed."""
    from lightning_gpipe.integration.build import _refuse_skips_between_chunks

    routes = skip_routes(_model())
    _refuse_skips_between_chunks(routes, [5, 1], "body")  # both skips inside stage 0
    with pytest.raises(SkipError, match=(
        r"GPipeStrategy\(schedule='interleaved'\) does not carry skip connections between stages, and body with"
        r" balance \[2, 2, 2\] has some that leave or reach stages \[0, 2\]: use schedule='1f1b' \(or 'gpipe'\),"
        " or a balance that keeps each skip within one stage"
    )):  # fmt: skip
        _refuse_skips_between_chunks(routes, [2, 2, 2], "body")


@pytest.mark.parametrize(
    "layers, message",
    [
        ([Pop()], "layer 0 (Pop) pops 'skip', but no layer before it stashes it"),
        ([Stash(), Stash(), Pop()], "'skip' is stashed twice, by layer 0 (Stash) and by layer 1 (Stash); give one of"
         " them a namespace of its own with .isolate(Namespace())"),
        ([Stash(), nn.ReLU()], "stashed but never popped: 'skip' (layer 0 (Stash)); every stash needs one pop in a"
         " later layer"),
        ([Stash(), Pop(), Pop()], "'skip' is popped twice, by layer 1 (Pop) and by layer 2 (Pop); a stash is popped"
         " once"),
    ],
)  # fmt: skip
def test_routes_refuse_unmatched_skips(layers, message):
    with pytest.raises(SkipError) as error:
        skip_routes(nn.Sequential(*layers))
    assert str(error.value) == message


def test_undeclared_names_and_plain_forwards_are_refused():
    @skippable(stash=["a"])
    class Wrong(nn.Module):
        def forward(self, x):
            yield stash("b", x)
            return x

    with pytest.raises(SkipError, match=r"^Wrong stashes 'b', which its @skippable does not declare \(stashes: \['a'\]\)$"):
        Wrong()(torch.ones(1))
    with pytest.raises(TypeError, match="forward must be a generator"):

        @skippable(pop=["a"])
        class Plain(nn.Module):
            def forward(self, x):
                return x

    with pytest.raises(SkipError, match=r"\['a'\] are both stashed and popped by the same module"):
        skippable(stash=["a"], pop=["a"])(Stash)
    with pytest.raises(SkipError, match=r"^Pop pops 'skip', but no layer has stashed it yet"):
        Pop()(torch.ones(1, 4))


def _reference(model: nn.Sequential, x: torch.Tensor, m: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One device, the same micro-batches: gradients and outputs."""
    ys = [model(chunk) for chunk in split(x, m)]
    y = torch.cat(ys)
    y.pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()], y.detach()


def _skip_worker(rank: int, port: int, k: int, balance: list[int], received: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=k)
    sources = []
    irecv = dist.irecv

    def recording(tensor, src=None, *args, **kwargs):
        sources.append((src, tuple(tensor.shape)))
        return irecv(tensor, src, *args, **kwargs)

    dist.irecv = recording
    ops: list = []
    order = p2p_order.recorded(ops)
    order.__enter__()
    try:
        link, keyed = StageLink(rank, k, torch.device("cpu")), StageLink(rank, k, torch.device("cpu"))
        for checkpoint, use in [(mode, link) for mode in MODES] + [(mode, keyed) for mode in MODES]:
            model = _model()
            x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
            expected, y_ref = _reference(copy.deepcopy(model), x, 3)
            routes = skip_routes(model)
            start = sum(balance[:rank])
            mine = list(model)[start : start + balance[rank]]
            executor = StageExecutor(
                mine, rank, k, torch.device("cpu"), link, checkpoint, skips=stage_ports(routes, balance, rank)
            )
            sources.clear()
            executor.meter.start(executor.parameters())
            keys = shape_keys(x, 3, True) if use is keyed else None  # as the strategy passes them
            executor.link = use
            outputs = executor.forward(split(x, 3), 3, train=True, keys=keys)
            received[(rank, checkpoint, "held")] = executor.meter.current
            if executor.is_last:
                y = torch.cat(outputs)
                torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
                y.pow(2).sum().backward()
            executor.backward()
            params = [p for layer in model for p in layer.parameters()]
            for p, e in zip(params, expected):
                if any(p is q for layer in mine for q in layer.parameters()):
                    torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-6)
            received[(rank, checkpoint, use is keyed)] = list(sources)
        received[(rank, "ops")] = ops
    finally:
        order.__exit__(None, None, None)
        dist.irecv = irecv
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "k, balance, between",
    [(3, [2, 2, 2], [1]), (4, [2, 1, 1, 2], [])],  # K=4: the inner skip goes from stage 1 to its neighbour
)
def test_skips_cross_stages_point_to_point(k, balance, between):
    """Stage 0 stashes for the last stage: outputs and gradients equal one device on the same three micro-batches,
    in every checkpoint mode, and the stages ``between`` (the inner skip stays on one of them) receive nothing but
    their neighbours' activations and gradients."""
    from launch import free_port

    with mp.Manager() as manager:
        received = manager.dict()
        mp.spawn(_skip_worker, args=(free_port(), k, balance, received), nprocs=k, join=True)
        received = dict(received)
    last = k - 1
    assert p2p_order.nccl_order_problems([received[(rank, "ops")] for rank in range(k)]) == []  # as NCCL needs
    for checkpoint in MODES:
        for rank in between:
            # Three micro-batches of a header and an activation from the stage before, three gradients from after.
            expected = [(rank - 1, (64,)), (rank - 1, (2, 4))] * 3 + [(rank + 1, (2, 4))] * 3
            assert sorted(received[(rank, checkpoint, False)]) == sorted(expected), (rank, checkpoint)
        from_first = [shape for src, shape in received[(last, checkpoint, False)] if src == 0]
        assert from_first == [(64,), (2, 4)] * 3  # each micro-batch's skip, header and tensor, straight from stage 0
        to_first = [shape for src, shape in received[(0, checkpoint, False)] if src == last]
        assert to_first == [(2, 4)] * 3  # and its gradient straight back
    # With the micro-batches' shape keys (all three of 2 rows: one key), the first micro-batch of the first keyed
    # step takes the only header of each stream, the skip's included; the others' shapes are known on both ends.
    for checkpoint, header in zip(MODES, [[(64,)], [], []]):
        from_first = [shape for src, shape in received[(last, checkpoint, True)] if src == 0]
        assert from_first == header + [(2, 4)] * 3, checkpoint
        for rank in between:
            assert received[(rank, checkpoint, True)].count((rank - 1, (64,))) == len(header), (rank, checkpoint)
    # Re-materializing every micro-batch, the last stage keeps each one's input and popped skip: 3 x 2 x (2, 4) fp32.
    assert received[(last, "always", "held")] == 3 * 2 * 2 * 4 * 4


def test_a_lightning_module_with_a_skip_trains_as_on_one_device(tmp_path):
    """K=3 (the skip goes from stage 0 to stage 2) and K=2, with clipping, accumulation, momentum and StepLR, equal
    single-device Lightning, F-then-B in each checkpoint mode and 1F1B; a stash without a pop stops every rank
    before training."""
    skip = {"model_class": "SkipClassifier"}
    scenarios = [scenario(f"k3_{mode}", 3, 4, mode, **skip) for mode in MODES]
    scenarios.append({**scenario("k3_1f1b", 3, 4, model_class="MeanSkipClassifier"),
                      "strategy": {"microbatches": 4, "schedule": "1f1b"}})  # the skip's gradient comes back in 1F1B's order
    (tmp_path / "k3").mkdir(), (tmp_path / "k2").mkdir()
    ranks = run_scenarios(3, scenarios, tmp_path / "k3")
    k2 = run_scenarios(2, [scenario("k2", 2, 3, **skip), {**scenario("unpopped", 2, 3), "model_class": "UnpoppedSkip",
                       "expect_error": True}], tmp_path / "k2")  # fmt: skip
    reference = reference_run(model_class="SkipClassifier")
    for run in [*(ranks[s["name"]] for s in scenarios[:-1]), k2["k2"]]:
        assert_same_params(full_params(run), reference["params"])
        assert_same_logs(run[0]["logged"], reference["logged"])
    mean_reference = reference_run(model_class="MeanSkipClassifier")
    assert_same_params(full_params(ranks["k3_1f1b"]), mean_reference["params"])
    assert_same_logs(ranks["k3_1f1b"][0]["logged"], mean_reference["logged"])
    message = "SkipError: stashed but never popped: 'early' (layer 0 (_StashTanh)); every stash needs one pop in a later layer"
    assert [r["error"] for r in k2["unpopped"]] == [message] * 2
