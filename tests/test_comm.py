"""The engine's messages: ObjectBroadcast's objects, packed (their tensors stay on the device) or pickled, in order;
StageLink's order-strict mode; messages held until they complete (engine.posted)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_gpipe.engine import p2p, posted
from lightning_gpipe.engine.broadcast import ObjectBroadcast, pack, unpack
from lightning_gpipe.engine.p2p import ShapeMemory, StageLink


def _logged() -> list:
    """Records as the last stage logs them: tensors of every kind among plain values."""
    loss = torch.tensor(0.75, requires_grad=True) * 2
    return [
        ("loss", loss, (), {"prog_bar": True}),
        ("mixed", {"mask": torch.tensor([True, False, True]), "counts": torch.arange(4).reshape(2, 2),
                   "half": torch.linspace(0, 1, 5, dtype=torch.bfloat16), "z": torch.tensor([1 + 2j]),
                   "empty": torch.empty(0, 3)}, (1, 2.5), {"batch_size": 7}),
    ]  # fmt: skip


def _assert_same(got: object, expected: object) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected.detach()) and not got.requires_grad
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected)
        for g, e in zip(got, expected):
            _assert_same(g, e)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            _assert_same(got[key], expected[key])
    else:
        assert got == expected


def test_pack_round_trip_keeps_every_dtype_and_shape():
    records = _logged()
    packed, buffer = pack(records, torch.device("cpu"))
    assert buffer is not None and buffer.dtype == torch.uint8 and buffer.numel() == packed.nbytes
    starts = [start for start, _ in packed.ranges()]
    assert all(start % 16 == 0 for start in starts) and starts == sorted(starts)
    # loss (4 B), mask (3 B), counts (32 B), half (10 B), z (8 B), empty (0 B): each from a 16-byte boundary
    assert packed.ranges() == [(0, 4), (16, 3), (32, 32), (64, 10), (80, 8), (96, 0)]
    _assert_same(unpack(packed, buffer), records)


def test_pack_without_tensors():
    packed, buffer = pack([("x", 1.5, (), {})], torch.device("cpu"))
    assert buffer is None and packed.nbytes == 0
    assert unpack(packed, buffer) == [("x", 1.5, (), {})]


def _broadcast_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=3)
    try:
        cpu = torch.device("cpu")
        large = {"random": torch.arange(5000, dtype=torch.int64)}  # 40 KB: beyond the first message's capacity
        for packing in (True, False):  # on a GPU the records travel packed; on the CPU pickled whole
            channel = ObjectBroadcast(cpu, pack=packing)
            if rank == 2:
                other = dist.isend(torch.full((3,), 7.0), 0, tag=1)  # a stage's message to rank 0, a tag of its own
                channel.send_packed(_logged())
                channel.send({"step": 3})
                channel.send_packed([("no tensors", 2, (), {})])
                channel.send(large)
                channel.send(RuntimeError("an error instead"))
                channel.wait()
                other.wait()
            else:
                _assert_same(channel.receive_packed(2), _logged())
                channel.expect(2)  # posted ahead, as a stage does before its backward
                assert channel.receive(2) == {"step": 3}
                assert channel.receive_packed(2) == [("no tensors", 2, (), {})]
                _assert_same(channel.receive(2), large)
                error = channel.receive_packed(2)  # what send sent comes back as it is
                assert isinstance(error, RuntimeError) and str(error) == "an error instead"
                if rank == 0:
                    stage_message = torch.empty(3)
                    dist.irecv(stage_message, 2, tag=1).wait()
                    assert torch.equal(stage_message, torch.full((3,), 7.0))
        # Order-strict mode: every message on one tag, so receives posted in another order than the sends take the
        # wrong buffers, as under NCCL; with tags, gloo matches them right.
        if rank in (0, 1):
            link, spec = StageLink(rank, 3, cpu), [(torch.Size([2]), torch.float32)]
            for strict in (False, True):
                p2p.ORDER_STRICT = strict
                if rank == 1:
                    link.send_gradients(0, [torch.zeros(2)])
                    link.send_gradients(1, [torch.ones(2)])
                    link.flush()
                else:
                    link.expect_gradients(1, spec)  # micro-batch 1 first: not the order they are sent in
                    link.expect_gradients(0, spec)
                    first, second = link.recv_gradients(0)[0], link.recv_gradients(1)[0]
                    assert (first.tolist(), second.tolist()) == (([1.0, 1.0], [0.0, 0.0]) if strict else ([0.0, 0.0], [1.0, 1.0]))
        # Within a group (a pipeline of data-parallel replicas): only its ranks take part.
        group = dist.new_group([0, 2])
        if rank != 1:
            channel = ObjectBroadcast(cpu, group)
            if rank == 2:
                channel.send({"to": "the group"})
                channel.wait()
            else:
                assert channel.receive(2) == {"to": "the group"}
        # Handles dropped before their messages completed, as by a rank that raised between posting and waiting:
        # the messages are still made, and the connection between the two ranks carries the next one. With gloo's
        # handles alone (dist.isend, dist.irecv) both messages were lost and the broadcast below never completed.
        if rank == 0:
            posted.irecv(torch.empty(3), 2, tag=2)
            posted.isend(torch.full((3,), 5.0), 2, tag=3)
        elif rank == 2:
            time.sleep(0.3)  # rank 0 has dropped both handles
            posted.isend(torch.full((3,), 4.0), 0, tag=2).wait()
            late = torch.empty(3)
            posted.irecv(late, 0, tag=3).wait()
            assert torch.equal(late, torch.full((3,), 5.0))
        last = torch.tensor([rank])
        dist.broadcast(last, 2)
        assert last.item() == 2
        posted.settle()  # waits for rank 0's two
        assert posted.held() == 0
    finally:
        dist.destroy_process_group()


def test_objects_reach_every_rank_in_order():
    """From the last rank to each other one, point to point: packed and pickled objects, one larger than the
    first message, in the order sent, apart from other messages between the same ranks; and within a group. Also:
    the order-strict mode takes messages by order, as NCCL does, where tags would match them; and messages whose
    handles were dropped still complete (engine.posted)."""
    from launch import free_port

    ranks = mp.spawn(_broadcast_worker, args=(free_port(),), nprocs=3, join=False)
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=1):  # raises as soon as a rank fails
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the ranks did not finish in 120 s")


def test_shape_memory_forgets_its_oldest_key_alike_on_both_ends():
    """Sender and receiver each keep one memory per stream; both forget the oldest key past the limit, so they
    agree on which keys need a header however many shapes a run meets."""
    ends = [ShapeMemory(), ShapeMemory()]
    for key in range(ShapeMemory.LIMIT + 1):
        for memory in ends:
            memory.put(key, (((key, 4), torch.float32),))
    for memory in ends:
        assert len(memory) == ShapeMemory.LIMIT
        assert memory.get(0) is None and memory.get(1) == (((1, 4), torch.float32),)
        assert memory.get(None) is None  # no key: a header every time


def test_the_pair_check_finds_what_nccl_would_not_match():
    """tests/p2p_order.py: two ranks' operations towards each other must pair up one by one."""
    from p2p_order import nccl_order_problems

    good = [[("send", 1, 8), ("recv", 1, 4)], [("recv", 0, 8), ("send", 0, 4)]]
    assert nccl_order_problems(good) == []
    facing = [[("send", 1, 8), ("recv", 1, 4), ("send", 1, 8)], [("recv", 0, 8), ("recv", 0, 8), ("send", 0, 4)]]
    assert nccl_order_problems(facing) == [
        "ranks 0 and 1, operation 1: rank 0 posts ('recv', 4), rank 1 posts ('recv', 8) (rank 0 from there:"
        " [('recv', 4), ('send', 8)]; rank 1: [('recv', 8), ('send', 4)])"
    ]
    resized = [[("send", 1, 8)], [("recv", 0, 4)]]
    assert nccl_order_problems(resized)[0].startswith("ranks 0 and 1, operation 0: rank 0 posts ('send', 8)")
    unmatched = [[("send", 2, 8)], [], [("recv", 0, 8), ("recv", 0, 8)]]  # rank 1 takes no part
    assert nccl_order_problems(unmatched) == [
        "ranks 0 and 2, operation 1: rank 0 posts None, rank 2 posts ('recv', 8) (rank 0 from there: []; rank 2:"
        " [('recv', 8)])"
    ]
