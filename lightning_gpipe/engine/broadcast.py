"""A picklable object from one rank to the others, point to point, without the sender waiting: the last stage's
logged calls and step results reach the other stages this way."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_gpipe.engine import posted
from lightning_gpipe.engine.p2p import OBJECT_TAG, from_host

__all__ = ["ObjectBroadcast", "Packed", "pack", "unpack"]


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
        self._pending: list[posted.PostedWork] = []  # posted holds their buffers
        self._expected: Optional[tuple[posted.PostedWork, Tensor, int]] = None  # a receive posted ahead, and its source

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
            self._send(from_host(part, self.device))

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
        for work in self._pending:
            work.wait()
        self._pending = []

    def _send(self, t: Tensor) -> None:
        """Post the sends of ``t`` to every other rank of the group, kept until :meth:`wait`."""
        me = dist.get_rank()
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else range(dist.get_world_size())
        self._pending += [posted.isend(t, r, group=self.group, tag=OBJECT_TAG) for r in ranks if r != me]

    def _irecv(self, t: Tensor, src: int) -> posted.PostedWork:
        return posted.irecv(t, src, group=self.group, tag=OBJECT_TAG)

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
        t = from_host(t, device) if t.device.type == "cpu" else t.to(device)  # a value logged from the host
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
