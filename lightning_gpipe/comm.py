"""Asynchronous point-to-point transfers between neighbouring stages, and between the two ends of a skip.

Activations travel forward with a small header describing their shapes and dtypes, so nothing
is fixed at the first step: batch sizes, sequence lengths and dtypes may change from step to step.
Gradients travel backward shaped like the activations the receiving stage sent, so they need
no header. Every message pair between two stages is posted in the same order on both sides,
as NCCL requires; gloo additionally gets a distinct tag per message kind and micro-batch.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_gpipe.microbatch import Tensors
from lightning_gpipe.skip import Port

__all__ = ["StageLink", "ObjectBroadcast", "Packed", "pack", "unpack", "carries_grad"]

_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
)  # fmt: skip
_HEADER_LEN = 64  # int64 slots: a count, then (dtype, ndim, *shape) per tensor
_HEADER, _ACTIVATION, _GRADIENT = range(3)
_KIND_BITS = 12  # a message's tag: its micro-batch, then its kind (gloo matches on tags; NCCL on order)
_OBJECT = (1 << _KIND_BITS) - 1  # the tag of ObjectBroadcast's messages: a kind no micro-batch's message takes
#: Skip connections that may cross stages in one model (each takes three kinds of message).
MAX_SKIPS = ((1 << _KIND_BITS) - 4) // 3


def carries_grad(t: Tensor) -> bool:
    """Whether a tensor crossing a stage boundary gets a gradient sent back for it."""
    return _carries_grad(t.dtype)


def _carries_grad(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


class StageLink:
    """The sends and receives of one stage to the stage before it and the stage after it."""

    def __init__(self, stage: int, k: int, device: torch.device, group: Optional[dist.ProcessGroup] = None) -> None:
        self.stage, self.k, self.device, self.group = stage, k, device, group
        self._sends: list[tuple[dist.Work, Tensor]] = []
        self._headers: dict[int, tuple[dist.Work, Tensor]] = {}
        self._gradients: dict[int, tuple[list[dist.Work], list[Optional[Tensor]]]] = {}
        self._skip_gradients: dict[tuple[int, int], tuple[dist.Work, Tensor]] = {}

    def _rank(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage) if self.group is not None else stage

    def _isend(self, t: Tensor, stage: int, tag: int) -> None:
        t = t.detach().to(self.device).contiguous()
        # Keep each buffer until its send completes; drop those that already have.
        self._sends = [(work, buf) for work, buf in self._sends if not work.is_completed()]
        self._sends.append((dist.isend(t, self._rank(stage), group=self.group, tag=tag), t))

    def _irecv(self, t: Tensor, stage: int, tag: int) -> dist.Work:
        work = dist.irecv(t, self._rank(stage), group=self.group, tag=tag)
        assert work is not None
        return work

    # -- forward: stage j sends to j + 1 --------------------------------------------------------

    def send_activations(self, i: int, xs: Tensors) -> None:
        """Post the sends of micro-batch ``i``'s stage output to the next stage."""
        self._isend(_encode_header(xs, self.device), self.stage + 1, _tag(i, _HEADER))
        for x in xs:
            self._isend(x, self.stage + 1, _tag(i, _ACTIVATION))

    def expect_activations(self, i: int) -> None:
        """Post the receive of micro-batch ``i``'s header ahead of time."""
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        self._headers[i] = (self._irecv(header, self.stage - 1, _tag(i, _HEADER)), header)

    def recv_activations(self, i: int, ahead: Optional[int] = None) -> Tensors:
        """Receive micro-batch ``i``'s input from the previous stage; post the header of ``ahead`` meanwhile."""
        if i not in self._headers:
            self.expect_activations(i)
        work, header = self._headers.pop(i)
        work.wait()
        xs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in _decode_header(header)]
        works = [self._irecv(x, self.stage - 1, _tag(i, _ACTIVATION)) for x in xs]
        if ahead is not None:
            self.expect_activations(ahead)
        for work in works:
            work.wait()
        return tuple(xs)

    # -- backward: stage j sends to j - 1 -------------------------------------------------------

    def expect_gradients(self, i: int, sent: Sequence[tuple[torch.Size, torch.dtype]]) -> None:
        """Post the receive of the gradients for micro-batch ``i``'s outputs, ``sent`` as (shape, dtype) earlier."""
        grads = [
            torch.empty(shape, dtype=dtype, device=self.device) if _carries_grad(dtype) else None
            for shape, dtype in sent
        ]
        works = [self._irecv(g, self.stage + 1, _tag(i, _GRADIENT)) for g in grads if g is not None]
        self._gradients[i] = (works, grads)

    def recv_gradients(self, i: int) -> list[Optional[Tensor]]:
        """The gradients posted by :meth:`expect_gradients`, ``None`` where an output has none."""
        works, grads = self._gradients.pop(i)
        for work in works:
            work.wait()
        return grads

    def send_gradients(self, i: int, grads: list[Tensor]) -> None:
        """Post the sends of the gradients for micro-batch ``i``'s inputs to the previous stage."""
        for g in grads:
            self._isend(g, self.stage - 1, _tag(i, _GRADIENT))

    # -- skips: stage j sends a stashed tensor to the stage that pops it, which sends its gradient back --------

    def send_skip(self, i: int, port: Port, x: Tensor) -> None:
        """Post the sends of micro-batch ``i``'s stashed tensor to the stage that pops it."""
        self._isend(_encode_header((x,), self.device), port.stage, _tag(i, _skip_kind(port.route, _HEADER)))
        self._isend(x, port.stage, _tag(i, _skip_kind(port.route, _ACTIVATION)))

    def recv_skip(self, i: int, port: Port) -> Tensor:
        """Receive micro-batch ``i``'s tensor that ``port.stage`` stashed."""
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        self._irecv(header, port.stage, _tag(i, _skip_kind(port.route, _HEADER))).wait()
        ((shape, dtype),) = _decode_header(header)
        x = torch.empty(shape, dtype=dtype, device=self.device)
        self._irecv(x, port.stage, _tag(i, _skip_kind(port.route, _ACTIVATION))).wait()
        return x

    def expect_skip_gradient(self, i: int, port: Port, shape: torch.Size, dtype: torch.dtype) -> None:
        """Post the receive of the gradient for micro-batch ``i``'s tensor sent through ``port``."""
        if _carries_grad(dtype):
            g = torch.empty(shape, dtype=dtype, device=self.device)
            work = self._irecv(g, port.stage, _tag(i, _skip_kind(port.route, _GRADIENT)))
            self._skip_gradients[(i, port.route)] = (work, g)

    def recv_skip_gradient(self, i: int, port: Port) -> Optional[Tensor]:
        """The gradient posted by :meth:`expect_skip_gradient`, ``None`` for a tensor that carries none."""
        if (i, port.route) not in self._skip_gradients:
            return None
        work, g = self._skip_gradients.pop((i, port.route))
        work.wait()
        return g

    def send_skip_gradient(self, i: int, port: Port, g: Tensor) -> None:
        """Post the send of the gradient for micro-batch ``i``'s tensor that ``port.stage`` stashed."""
        self._isend(g, port.stage, _tag(i, _skip_kind(port.route, _GRADIENT)))

    def flush(self) -> None:
        """Wait until every posted send has completed, so their buffers may be freed."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()


class _TensorPickler(pickle.Pickler):
    """Pickles CPU tensors as numpy arrays: several times faster than torch's own pickling, which serializes
    every storage as a small file."""

    def reducer_override(self, obj: Any) -> Any:
        if (
            type(obj) is Tensor and obj.device.type == "cpu" and obj.layout is torch.strided and not obj.requires_grad
            and obj.dtype in _NUMPY and not obj.is_neg()
        ):  # fmt: skip
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


_NUMPY = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
          torch.uint8, torch.bool)  # fmt: skip


def _tag(i: int, kind: int) -> int:
    return (i << _KIND_BITS) | kind


def _skip_kind(route: int, kind: int) -> int:
    """Skip ``route``'s own kinds of message, after the three between neighbours."""
    return 3 + 3 * route + kind


def _encode_header(xs: Tensors, device: torch.device) -> Tensor:
    fields = [len(xs)]
    for x in xs:
        if x.dtype not in _DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {x.dtype} between stages; supported: {_DTYPES}")
        fields += [_DTYPES.index(x.dtype), x.dim(), *x.shape]
    if len(fields) > _HEADER_LEN:
        shapes = [tuple(x.shape) for x in xs]
        raise ValueError(
            f"a stage output of {len(xs)} tensors with shapes {shapes} is too large to describe in a"
            f" {_HEADER_LEN}-slot header; pass fewer tensors between stages"
        )
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[: len(fields)] = torch.tensor(fields, dtype=torch.int64)
    return _from_host(header, device)


def _from_host(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor ``t`` on ``device``, without waiting for the device: a copy from pageable memory to a GPU
    synchronizes the stream, so it goes through pinned memory there."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _decode_header(header: Tensor) -> list[tuple[list[int], torch.dtype]]:
    fields = header.tolist()
    specs, pos = [], 1
    for _ in range(fields[0]):
        dtype, ndim = _DTYPES[fields[pos]], fields[pos + 1]
        specs.append((fields[pos + 2 : pos + 2 + ndim], dtype))
        pos += 2 + ndim
    return specs


class ObjectBroadcast:
    """A picklable object from one rank to all, without the sender waiting for the receivers.

    The last stage shares what its step produced this way, while the other stages, done with their backward
    or idle until their gradients arrive, take the object in. An object that pickles into less than
    ``capacity`` bytes travels in one message, a larger one in two. A step's results fit in the default: its
    logs and loss, and the rank-wide random state (about 14 KiB on CPU: torch's, numpy's and Python's).
    ``pack``: whether :meth:`send_packed` keeps tensors on the device (default: on every device but the CPU).

    Each message goes to each receiver point to point, on a tag of its own: gloo runs a collective on a thread
    of its own, one more thread to wake on each side of every message (on a busy CPU, a scheduler's time slice
    each). Between two ranks the messages keep their order with the stages' other messages, as NCCL requires.
    """

    def __init__(
        self, device: torch.device, group: Optional[dist.ProcessGroup] = None, capacity: int = 32768,
        pack: Optional[bool] = None,
    ) -> None:  # fmt: skip
        self.device, self.group, self.capacity = device, group, capacity
        self.pack = device.type != "cpu" if pack is None else pack
        self._pending: list[tuple[dist.Work, Tensor]] = []
        self._expected: Optional[tuple[dist.Work, Tensor, int]] = None  # a receive posted ahead, and its source

    def send(self, obj: Any) -> None:
        self.wait()
        buffer = io.BytesIO()
        _TensorPickler(buffer).dump(obj)
        data = buffer.getbuffer()
        head = bytearray(self.capacity)
        head[:8] = len(data).to_bytes(8, "little")
        first = min(len(data), self.capacity - 8)
        head[8 : 8 + first] = data[:first]
        parts = [torch.frombuffer(head, dtype=torch.uint8)]
        if len(data) > first:
            parts.append(torch.frombuffer(bytearray(data[first:]), dtype=torch.uint8))
        for part in parts:
            self._send(_from_host(part, self.device))

    def send_packed(self, obj: Any) -> None:
        """Send ``obj`` with its tensors packed into one buffer on the device and the rest pickled: nothing waits
        for the device's queued work (its tensors may still be computing), and nothing is copied to the host.
        On the CPU (unless ``pack``) there is nothing to wait for: it travels pickled whole, in one message."""
        if not self.pack:
            self.send(apply_to_collection(obj, Tensor, Tensor.detach))
            return
        packed, buffer = pack(obj, self.device)
        self.send(packed)
        if buffer is not None:
            self._send(buffer)

    def receive_packed(self, src: int) -> Any:
        """The object ``src`` sent with :meth:`send_packed`, its tensors on this rank's device; or whatever ``src``
        sent with :meth:`send` instead (an error, say)."""
        packed = self.receive(src)
        if not isinstance(packed, Packed):
            return packed
        buffer = None
        if packed.specs:
            buffer = self._receive(packed.nbytes, src)
        return unpack(packed, buffer)

    def expect(self, src: int) -> None:
        """Post the receive of the next object from ``src`` (its first message) ahead of time, so that it travels
        while this rank works; :meth:`receive` then only waits for what has not arrived yet."""
        head = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        self._expected = (self._irecv(head, src), head, src)

    def receive(self, src: int) -> Any:
        if self._expected is not None:
            work, head, posted = self._expected
            self._expected = None
            if posted != src:
                raise RuntimeError(f"a receive from rank {posted} was posted ahead; asked to receive from rank {src}")
            work.wait()
        else:
            head = self._receive(self.capacity, src)
        raw = head.cpu().numpy().tobytes()
        size = int.from_bytes(raw[:8], "little")
        data = raw[8 : 8 + size]
        if size > len(data):
            data += self._receive(size - len(data), src).cpu().numpy().tobytes()
        return pickle.loads(data)

    def wait(self) -> None:
        """Until the receivers have everything sent so far."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    def _send(self, t: Tensor) -> None:
        """Post the sends of ``t`` to every other rank of the group, kept until :meth:`wait`."""
        me = dist.get_rank()
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else range(dist.get_world_size())
        self._pending += [(dist.isend(t, r, group=self.group, tag=_OBJECT), t) for r in ranks if r != me]

    def _irecv(self, t: Tensor, src: int) -> dist.Work:
        work = dist.irecv(t, src, group=self.group, tag=_OBJECT)
        assert work is not None
        return work

    def _receive(self, nbytes: int, src: int) -> Tensor:
        t = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._irecv(t, src).wait()
        return t


@dataclass(frozen=True)
class _Slot:
    """Where the ``index``-th tensor of a packed object was."""

    index: int


@dataclass
class Packed:
    """The host part of a packed object: the object with its tensors replaced by slots, and each tensor's shape
    and dtype; the tensors' bytes lie in one buffer on the device (see :func:`pack`)."""

    skeleton: Any
    specs: list[tuple[torch.Size, torch.dtype]]

    def ranges(self) -> list[tuple[int, int]]:
        """Each tensor's (start, size) in bytes in the buffer; every start aligned for any dtype's view."""
        ranges, start = [], 0
        for shape, dtype in self.specs:
            size = shape.numel() * dtype.itemsize
            ranges.append((start, size))
            start += -(-size // _PACK_ALIGN) * _PACK_ALIGN
        return ranges

    @property
    def nbytes(self) -> int:
        start, size = self.ranges()[-1] if self.specs else (0, 0)
        return start + size


_PACK_ALIGN = 16  # bytes


def pack(obj: Any, device: torch.device) -> tuple[Packed, Optional[Tensor]]:
    """``obj``'s tensors (detached) as one byte buffer on ``device`` (``None`` without tensors), and the rest.
    Only device work is queued: nothing waits for the tensors' values."""
    tensors: list[Tensor] = []

    def slot(t: Tensor) -> _Slot:
        tensors.append(t.detach())
        return _Slot(len(tensors) - 1)

    packed = Packed(apply_to_collection(obj, Tensor, slot), [(t.shape, t.dtype) for t in tensors])
    if not tensors:
        return packed, None
    buffer = torch.empty(packed.nbytes, dtype=torch.uint8, device=device)
    for t, (start, size) in zip(tensors, packed.ranges()):
        t = _from_host(t, device) if t.device.type == "cpu" else t.to(device)  # a value logged from the host
        buffer[start : start + size].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    return packed, buffer


def unpack(packed: Packed, buffer: Optional[Tensor]) -> Any:
    """The object :func:`pack` took apart, its tensors views of ``buffer``."""
    if buffer is None:
        return packed.skeleton
    tensors = [
        buffer[start : start + size].view(dtype).reshape(shape)
        for (shape, dtype), (start, size) in zip(packed.specs, packed.ranges())
    ]
    return apply_to_collection(packed.skeleton, _Slot, lambda s: tensors[s.index])
