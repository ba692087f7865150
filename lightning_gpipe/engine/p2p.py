"""Asynchronous point-to-point transfers between stages, and the rules that keep their order on both ends.

Activations travel forward with a small header describing their shapes and dtypes, so nothing is fixed at the
first step: batch sizes, sequence lengths and dtypes may change from step to step. Reading a header is a host read,
which on a GPU waits for the device, so a header is sent only when needed: each forward carries a *key*, the shapes
and dtypes of its micro-batch's input (every stage holds the same batch, so both ends compute the same key), and both
ends of a stream of messages remember the shapes that went with each key (:class:`ShapeMemory`). A key met before
sends its tensors alone, into buffers the receiver shapes from memory; a new key sends its header first. A forward
without a key (``None``; or a link built with ``headers="always"``) always sends one. A stage whose output shapes
depend on the input's values, not only on its shapes, is refused at its sender, naming the shapes. Gradients travel
backward shaped like the activations the receiving stage sent, so they need no header.

**Order.** NCCL matches the point-to-point messages between two ranks by the order they are posted, not by tag
(gloo matches by tag too), and torch runs both directions between two ranks on one stream, each operation waiting
for its match. So the operations two ranks post towards each other must pair up one by one: the n-th of one rank's
is a send where the n-th of the other's is its receive, or the reverse (two receives facing each other would wait
for ever). Both sides derive that order from the same data, the schedule's action lists
(:class:`~lightning_gpipe.schedule.Schedule`), and post in it:

1. *Forward, stage j to j+1*: for each forward action of stage j, in order, micro-batch i's header, then its
   tensors, then the skips stage j stashes for later stages, in the ports' order. Stage j+1 receives them in its
   own forward order, which is the same micro-batches in the same order; it posts the next forward's header receive
   one action ahead (:meth:`StageLink.recv_activations`), except when a skip from stage j follows each micro-batch's
   activations (that skip comes first on the wire) and under a loss per micro-batch (1F1B), where the two stages
   exchange gradients between their forwards, so that a receive posted ahead would face one of stage j's. Whether a
   header is sent is decided alike on both ends: by the key, against memories that change only when a header
   passes.
2. *Backward, stage j+1 to j*: for each backward action of stage j+1, in order, micro-batch i's input gradients,
   and the gradients of skips popped there. Under F-then-B stage j posts every gradient receive of the step at once,
   after its forwards, in its own backward order (``StageExecutor.post_receives``), the order of stage j+1's
   backwards. When backwards run between forwards (1F1B), stage j posts each gradient receive where the stage that
   sends it (j+1, or the stage that pops a skip) runs that backward among its forwards, read from that stage's own
   action list (``StageExecutor.run``): after sending the forward that precedes it there.
3. *Last stage to every other*: the step's logged calls (when its backward runs inside the step) and then its
   results, on ``OBJECT_TAG`` (:class:`~lightning_gpipe.engine.broadcast.ObjectBroadcast`). Stage K-2 also takes
   gradients from it: it receives the logged calls first, then posts every gradient receive, then the results'
   receive, which is the order in which the last stage sends them (calls, its backward's gradients, results).
4. *Failures*: a last stage whose step failed after the others began their backward sends zeros in place of every
   gradient, in backward order (``StageExecutor.drain``), then the error as its results: every posted receive is
   matched, and the others raise it.
5. *Several chunks per rank* (interleaved 1F1B): two ranks exchange activations and gradients in both directions,
   and these rules do not order them; `lightning_gpipe.engine.pairs` posts them in one sequence per pair of ranks
   (:func:`~lightning_gpipe.schedule.messages.pair_orders`), with this module's headers and tags.

Tags (for gloo) number each message by micro-batch, model chunk (for schedules that put several stages of the
model on one rank) and kind (header, activations, gradients, three per skip route). With
``LIGHTNING_GPIPE_ORDER_STRICT=1`` in the environment every message takes tag 0, so gloo too matches them by the
order they were posted, as NCCL does: a send and receive posted in different orders then swap buffers or fail
instead of passing. The test suite runs in that mode (``tests/conftest.py``), and its multi-process scenarios also
record the order each rank posts its operations in and check that every two ranks' pair up (``tests/p2p_order.py``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gpipe.engine import posted
from lightning_gpipe.engine.microbatch import Tensors
from lightning_gpipe.engine.skip import Port

__all__ = [
    "Endpoint", "StageLink", "ShapeMemory", "carries_grad", "needs_header", "MAX_SKIPS", "MAX_CHUNKS", "OBJECT_TAG", "ORDER_STRICT",
    "HEADERS", "from_host",
]

#: When activations carry a header: ``"auto"`` for a key not met before, ``"always"`` with every micro-batch.
HEADERS = ("auto", "always")
Specs = tuple[tuple[tuple[int, ...], torch.dtype], ...]  # shapes and dtypes of the tensors of one message

_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
)  # fmt: skip
_HEADER_LEN = 64  # int64 slots: a count, then (dtype, ndim, *shape) per tensor
_HEADER, _ACTIVATION, _GRADIENT = range(3)
#: Every message on tag 0, matched by order as NCCL matches (a test mode; see the module's docstring).
ORDER_STRICT = os.environ.get("LIGHTNING_GPIPE_ORDER_STRICT", "0") == "1"
_KIND_BITS = 12  # a message's tag: its micro-batch, its model chunk, then its kind (gloo matches on tags; NCCL on order)
_CHUNK_BITS = 5  # up to 32 model chunks per rank (interleaved schedules)
_MAX_MICROBATCHES = 1 << (31 - _KIND_BITS - _CHUNK_BITS)
#: Model chunks a rank may hold (interleaved schedules): each has its own tags.
MAX_CHUNKS = 1 << _CHUNK_BITS  # tags are 32-bit signed integers
# The tag of ObjectBroadcast's messages: a kind no micro-batch's message takes.
OBJECT_TAG = 0 if ORDER_STRICT else (1 << _KIND_BITS) - 1
#: Skip connections that may cross stages in one model (each takes three kinds of message).
MAX_SKIPS = ((1 << _KIND_BITS) - 4) // 3


def carries_grad(t: Tensor) -> bool:
    """Whether a tensor crossing a stage boundary gets a gradient sent back for it."""
    return _carries_grad(t.dtype)


def _carries_grad(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


class ShapeMemory:
    """The shapes sent with each key on one stream of messages (a stage's activations to the next, or one skip
    route), kept alike by its sender and its receiver: both remember a key when its header passes, and forget the
    oldest past ``limit`` keys (:attr:`LIMIT` by default; 0 remembers none: a header every time), so both always
    agree on which keys need a header."""

    LIMIT = 256

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._specs: dict[Hashable, Specs] = {}

    def get(self, key: Optional[Hashable]) -> Optional[Specs]:
        """The shapes remembered for ``key``; ``None`` when a header must pass."""
        return None if key is None else self._specs.get(key)

    def put(self, key: Optional[Hashable], specs: Specs) -> None:
        if key is None or not self.limit:
            return
        if len(self._specs) >= self.limit:
            del self._specs[next(iter(self._specs))]
        self._specs[key] = specs

    def __len__(self) -> int:
        return len(self._specs)


class Endpoint:
    """One rank's end of the pipeline's point-to-point messages: its sends kept until they complete, its memories of
    the shapes sent on each stream (:class:`ShapeMemory`), and how many headers passed. Ranks are those of ``group``
    (the pipeline's), or global ranks without one.

    ``headers="auto"`` sends an activation header only for a key not met before (see the module's docstring);
    ``"always"`` sends one with every micro-batch.
    """

    def __init__(self, device: torch.device, group: Optional[dist.ProcessGroup] = None, headers: str = "auto") -> None:
        if headers not in HEADERS:
            raise ValueError(f"headers={headers!r}: choose one of {', '.join(HEADERS)}")
        self.device, self.group = device, group
        self._limit = ShapeMemory.LIMIT if headers == "auto" else 0
        self._memories: dict[tuple[str, int], ShapeMemory] = {}  # per stream: ("out" | "in", its number)
        self.headers_sent = self.headers_received = 0  # counted, for tests and reports
        self._sends: list[posted.PostedWork] = []  # posted holds their buffers

    def _rank(self, rank: int) -> int:
        """The global rank of ``rank`` in the group."""
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _isend(self, t: Tensor, rank: int, tag: int) -> None:
        t = t.detach().to(self.device).contiguous()
        self._sends = [work for work in self._sends if not work.is_completed()]  # NCCL's completed ones let go
        self._sends.append(posted.isend(t, self._rank(rank), group=self.group, tag=tag))

    def _irecv(self, t: Tensor, rank: int, tag: int) -> posted.PostedWork:
        return posted.irecv(t, self._rank(rank), group=self.group, tag=tag)

    def _memory(self, direction: str, stream: int = -1) -> ShapeMemory:
        if (direction, stream) not in self._memories:
            self._memories[(direction, stream)] = ShapeMemory(self._limit)
        return self._memories[(direction, stream)]

    def flush(self) -> None:
        """Wait until every posted send has completed, so their buffers may be freed."""
        for work in self._sends:
            work.wait()
        self._sends.clear()


class StageLink(Endpoint):
    """The sends and receives of one stage to the stage before it and the stage after it (and to the ends of its
    skips); its streams are the activations (-1) and each skip route. ``headers``: see :class:`Endpoint`."""

    def __init__(
        self, stage: int, k: int, device: torch.device, group: Optional[dist.ProcessGroup] = None,
        headers: str = "auto",
    ) -> None:  # fmt: skip
        super().__init__(device, group, headers)
        self.stage, self.k = stage, k
        self._headers: dict[int, tuple[posted.PostedWork, Tensor]] = {}
        self._gradients: dict[int, tuple[list[posted.PostedWork], list[Optional[Tensor]]]] = {}
        self._skip_gradients: dict[tuple[int, int], tuple[posted.PostedWork, Tensor]] = {}

    def _send_tensors(self, i: int, xs: Tensors, stage: int, key: Optional[Hashable], route: int = -1) -> None:
        """Post ``xs`` to ``stage``, after their header unless the key's shapes are remembered on both ends."""
        header_kind, data_kind = _kinds(route)
        what = f"stage {self.stage}'s " + ("output" if route < 0 else f"skip (route {route})")
        if needs_header(self._memory("out", route), key, xs, f"{what} for micro-batch {i}"):
            self._isend(_encode_header(xs, self.device), stage, _tag(i, header_kind))
            self.headers_sent += 1
        for x in xs:
            self._isend(x, stage, _tag(i, data_kind))

    # -- forward: stage j sends to j + 1 --------------------------------------------------------

    def send_activations(self, i: int, xs: Tensors, key: Optional[Hashable] = None) -> None:
        """Post the sends of micro-batch ``i``'s stage output to the next stage; ``key``: its input's shapes."""
        self._send_tensors(i, xs, self.stage + 1, key)

    def expect_activations(self, i: int, key: Optional[Hashable] = None) -> None:
        """Post the receive of micro-batch ``i``'s header ahead of time, if one will come for ``key``."""
        if self._memory("in").get(key) is None:
            header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
            self._headers[i] = (self._irecv(header, self.stage - 1, _tag(i, _HEADER)), header)

    def recv_activations(
        self, i: int, ahead: Optional[int] = None, key: Optional[Hashable] = None, ahead_key: Optional[Hashable] = None
    ) -> Tensors:
        """Receive micro-batch ``i``'s input (of key ``key``) from the previous stage; post the header of ``ahead``
        (of key ``ahead_key``) meanwhile."""
        specs = self._specs_in(i, key, self.stage - 1, -1)
        xs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in specs]
        works = [self._irecv(x, self.stage - 1, _tag(i, _ACTIVATION)) for x in xs]
        if ahead is not None:
            self.expect_activations(ahead, ahead_key)
        for work in works:
            work.wait()
        return tuple(xs)

    def _specs_in(self, i: int, key: Optional[Hashable], stage: int, route: int) -> Specs:
        """The shapes of micro-batch ``i``'s message from ``stage`` (activations, or skip ``route``): remembered for
        ``key``, or read from its header (the one :meth:`expect_activations` posted, if it did)."""
        memory = self._memory("in", route)
        if route < 0 and i in self._headers:
            work, header = self._headers.pop(i)
        elif (known := memory.get(key)) is not None:
            return known
        else:
            header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
            work = self._irecv(header, stage, _tag(i, _kinds(route)[0]))
        work.wait()
        specs = _decode_header(header)  # the host read that waits for the device
        memory.put(key, specs)
        self.headers_received += 1
        return specs

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

    def send_skip(self, i: int, port: Port, x: Tensor, key: Optional[Hashable] = None) -> None:
        """Post the sends of micro-batch ``i``'s stashed tensor to the stage that pops it."""
        self._send_tensors(i, (x,), port.stage, key, port.route)

    def recv_skip(self, i: int, port: Port, key: Optional[Hashable] = None) -> Tensor:
        """Receive micro-batch ``i``'s tensor that ``port.stage`` stashed."""
        ((shape, dtype),) = self._specs_in(i, key, port.stage, port.route)
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


def needs_header(memory: ShapeMemory, key: Optional[Hashable], xs: Tensors, what: str) -> bool:
    """Whether ``xs``, sent with ``key`` on the stream that ``memory`` remembers, go after a header (then remembered);
    raises if the key's remembered shapes differ from theirs, naming ``what`` they are."""
    specs = _specs(xs)
    known = memory.get(key)
    if known is None:
        memory.put(key, specs)
        return True
    if known != specs:
        raise ValueError(
            f"GPipeStrategy: {what} has shapes {_show(specs)}, where an input of the same shapes gave {_show(known)}"
            " before: its shapes depend on the input's values, not only on its shapes. Send them with every"
            " micro-batch: GPipeStrategy(headers='always')"
        )
    return False


def _tag(i: int, kind: int, chunk: int = 0) -> int:
    if not 0 <= i < _MAX_MICROBATCHES:
        raise ValueError(f"micro-batch {i}: a step carries at most {_MAX_MICROBATCHES} micro-batches between stages")
    if ORDER_STRICT:
        return 0
    return (((i << _CHUNK_BITS) | chunk) << _KIND_BITS) | kind


def _kinds(route: int) -> tuple[int, int]:
    """The kinds of a header and of its tensors: between neighbours (``route`` -1), or on skip ``route``."""
    return (_HEADER, _ACTIVATION) if route < 0 else (_skip_kind(route, _HEADER), _skip_kind(route, _ACTIVATION))


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
    return from_host(header, device)


def from_host(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor ``t`` on ``device``, without waiting for the device: a copy from pageable memory to a GPU
    synchronizes the stream, so it goes through pinned memory there."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _decode_header(header: Tensor) -> Specs:
    fields = header.tolist()
    specs, pos = [], 1
    for _ in range(fields[0]):
        dtype, ndim = _DTYPES[fields[pos]], fields[pos + 1]
        specs.append((tuple(fields[pos + 2 : pos + 2 + ndim]), dtype))
        pos += 2 + ndim
    return tuple(specs)


def _specs(xs: Tensors) -> Specs:
    return tuple((tuple(x.shape), x.dtype) for x in xs)


def _show(specs: Specs) -> str:
    return ", ".join(f"{list(shape)} {str(dtype).removeprefix('torch.')}" for shape, dtype in specs)
