"""Running one stage's part of the pipeline schedule for a mini-batch."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_gpipe.engine.batchnorm import batchnorm_stats_kept, commit, deferred_norms
from lightning_gpipe.engine.microbatch import TensorOrTensors, Tensors, as_tuple, tensors_in
from lightning_gpipe.engine.p2p import StageLink, carries_grad
from lightning_gpipe.engine.recompute import BufferReplay, ForwardState
from lightning_gpipe.engine.rng import StageRandom
from lightning_gpipe.engine.skip import Key, Port, StageTracker, use_tracker
from lightning_gpipe.instrument.memory import ActivationMeter
from lightning_gpipe.instrument.timeline import Timeline
from lightning_gpipe.schedule import Action, GPipe, Phase, Schedule

__all__ = ["StageExecutor"]


@dataclass
class _Slot:
    """What one micro-batch leaves behind on this stage between its forward and its backward."""

    inputs: Any  # the stage input; on stages after the first, leaves that collect gradients
    outputs: Optional[Tensors]  # None when re-materialized: recomputed from ``inputs`` in backward
    state: Optional[ForwardState]  # set when re-materialized
    sent: tuple[tuple[torch.Size, torch.dtype], ...] = ()  # shapes and dtypes of the outputs sent forward
    leaves: Optional[Tensors] = None  # last stage: detached outputs that the loss is computed from
    held: list = field(default_factory=list)  # what the activation meter counts for ``inputs`` and ``popped``
    popped: dict[Key, Tensor] = field(default_factory=dict)  # skips received from earlier stages: leaves too
    stashed: Optional[Tensors] = None  # skips sent to later stages, in the ports' order; None when re-materialized
    stashed_sent: tuple[tuple[torch.Size, torch.dtype], ...] = ()
    buffers: dict[int, Tensor] = field(default_factory=dict)  # re-materialized: buffers the forward changed, as before it


class StageExecutor:
    """One pipeline stage: its layers, its links to the neighbouring stages, and an interpreter of its schedule.

    The schedule (:class:`~lightning_gpipe.schedule.Schedule`) gives this stage's actions for M micro-batches;
    :meth:`forward_one` and :meth:`backward_one` run one action each, and :meth:`post_receives` posts the receives
    of every gradient the backward actions will take, in their order. For a schedule whose loss sees the whole
    batch (GPipe's), training splits in two phases, as Lightning does: :meth:`forward` runs the forward actions
    inside ``training_step``; :meth:`backward` runs the backward actions once the last stage's loss has filled the
    gradients of its outputs (where, the step flow decides).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        stage: int,
        k: int,
        device: torch.device,
        link: Optional[StageLink],
        checkpoint: str = "except_last",
        random: Optional[StageRandom] = None,
        schedule: Optional[Schedule] = None,
        skips: tuple[list[Port], list[Port]] = ([], []),
    ) -> None:
        if k > 1 and link is None:
            raise ValueError(f"a pipeline of {k} stages needs a StageLink")
        self.sends, self.receives = skips  # skips this stage stashes for later stages, and those it pops
        self.layers = list(layers)
        self.stage, self.k, self.device = stage, k, device
        self.link = link
        self.schedule: Schedule = GPipe(checkpoint) if schedule is None else schedule  # ``checkpoint``: GPipe's
        # The order of messages between two ranks (lightning_gpipe.engine.p2p, rule 1): a skip from the previous
        # stage follows micro-batch i's activations, and in training under a loss per micro-batch the stages post
        # gradient receives and sends between their forwards: then the next header is posted only when it is due.
        self._ahead = not any(port.stage == stage - 1 for port in self.receives)
        if self.schedule.stages_per_rank != 1:
            raise NotImplementedError(
                f"schedule {self.schedule.name!r} gives each rank {self.schedule.stages_per_rank} model chunks; the"
                " executor runs one per rank"
            )
        self.random = random if random is not None else StageRandom(stage, device)  # the stage's dropout stream
        self.timeline = Timeline(stage, device)  # records only while a step is being observed
        self.meter = ActivationMeter()
        self.deferred_norms = deferred_norms(self.layers)  # batch norms that update once per mini-batch
        self.buffers = BufferReplay(self.layers)  # what a recompute must read of the buffers its forward changed
        self._slots: list[Optional[_Slot]] = []
        self._keys: list[Optional[Hashable]] = []  # each micro-batch's input shapes, this step (see StageLink)
        self._orders: dict[tuple[int, Phase], list[Action]] = {}
        self._last_forward = -1  # this step's last forward micro-batch (begin)
        self._taken: dict[int, tuple[Any, dict[Key, Tensor]]] = {}  # each micro-batch's input, once received
        self._backward_done: set[int] = set()  # the micro-batches whose backward ran (or was drained)
        self._posted: set[tuple[int, int]] = set()  # gradient receives posted: (micro-batch, skip route or -1)
        self._ahead_of: dict[int, int] = {}  # each forward's next one in this step

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.k - 1

    def holds_loss(self, action: Action) -> bool:
        """Whether ``action`` runs the model's last stage, whose output the loss takes."""
        return self.is_last

    def run_layers(self, x: Any) -> TensorOrTensors:
        """This stage's layers applied in order, as ``nn.Sequential`` would."""
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(
        self, inputs: Optional[Sequence[Any]], n: int, train: bool, keys: Optional[Sequence[Hashable]] = None
    ) -> Optional[list[TensorOrTensors]]:
        """Run the forward actions for ``n`` micro-batches.

        ``inputs`` are the micro-batches on the first stage (ignored elsewhere: those receive
        them); ``keys``, each micro-batch's input shapes, as every stage computes them alike
        (:func:`~lightning_gpipe.engine.microbatch.shape_keys`), spare the headers of shapes met
        before. Returns the outputs on the last stage; in training, detached leaves whose
        gradients :meth:`backward` reads.
        """
        with self.random.active():
            return self._forward(inputs, n, train, keys)

    def backward(self) -> None:
        """Run the backward actions, after the loss has filled the gradients of the last stage's outputs."""
        with self.random.active():
            self._backward()

    def begin(self, n: int, keys: Optional[Sequence[Hashable]] = None) -> None:
        """Start a step of ``n`` micro-batches (of input shapes ``keys``): nothing of the last one is kept."""
        if keys is not None and len(keys) != n:
            raise ValueError(f"{len(keys)} shape keys for {n} micro-batches")
        self._keys = list(keys) if keys is not None else [None] * n
        self._slots = [None] * n
        self._taken = {}
        self._backward_done = set()
        self._posted = set()
        forwards = self._actions(n, Phase.FORWARD)
        self._last_forward = forwards[-1].i
        self._ahead_of = {a.i: b.i for a, b in zip(forwards, forwards[1:])}  # each forward's next, for its header

    def _forward(
        self, inputs: Optional[Sequence[Any]], n: int, train: bool, keys: Optional[Sequence[Hashable]]
    ) -> Optional[list[TensorOrTensors]]:
        self.begin(n, keys)
        outputs = []
        for action in self._actions(n, Phase.FORWARD):
            x = inputs[action.i] if self.is_first else None  # type: ignore[index]
            outputs.append(self.forward_one(action, x, train))
        self.flush()  # the next stage takes the last activations during its own forward; this one waits anyway
        return outputs if self.is_last else None

    def run(self, inputs: Optional[Sequence[Any]], n: int, keys: Optional[Sequence[Hashable]] = None) -> None:
        """Train on ``n`` micro-batches with every action of this stage's schedule in order, on a stage that is not
        the last (whose loss runs per micro-batch between its actions, driven by the step). Each gradient receive is
        posted where the stage that sends it runs that backward among its forwards (lightning_gpipe.engine.p2p,
        rule 2), so that the messages between the two pair up in one order on both ends."""
        with self.random.active():
            self.begin(n, keys)
            due = {None: _due(self.schedule.actions(self.k, n, self.stage + 1))}  # gradients from the next stage
            for port in self.sends:  # and from the stages that pop this one's skips
                due[port.route] = _due(self.schedule.actions(self.k, n, port.stage))
            for action in self.schedule.actions(self.k, n, self.stage):
                if action.phase is Phase.FORWARD:
                    self.forward_one(action, inputs[action.i] if self.is_first else None, train=True)  # type: ignore[index]
                    for i in due[None].get(action.i, ()):
                        self._expect_gradient(i)
                    for port in self.sends:
                        for i in due[port.route].get(action.i, ()):
                            self._expect_skip_gradient(i, port)
                else:
                    self.backward_one(action)
            self.flush()

    def forward_one(self, action: Action, x: Any, train: bool) -> Optional[TensorOrTensors]:
        """Run the forward ``action`` of the step :meth:`begin` started: ``x`` is its micro-batch on the first stage
        (the others receive it, and post the header of their next forward meanwhile). Returns the output on the last
        stage, in training as detached leaves whose gradients :meth:`backward_one` reads. After the step's last
        forward, deferred batch norms take the whole mini-batch's statistics."""
        i = action.i
        if not self.is_first:
            with self.timeline.span("recv", i):
                ahead = self._ahead and not (train and self.schedule.loss_per_microbatch)
                x = self._receive(i, self._ahead_of.get(i) if ahead else None, train)
        popped = self._receive_skips(i, train)
        if train:
            self._taken[i] = (x, popped)
        state = ForwardState.capture(self.device) if train and action.recompute else None
        watched = self.buffers.before() if state else []
        with self.timeline.span("forward", i), self.meter.saving(), torch.set_grad_enabled(train and state is None):
            y, stashed = self._run(x, popped)
        buffers = self.buffers.after(watched) if state else {}
        ys = as_tuple(y)
        if train:
            held = self.meter.hold(tensors_in(x) + list(popped.values())) if state else []
            self._slots[i] = _Slot(
                inputs=x, outputs=None if state else ys, state=state, sent=_specs(ys), held=held,
                popped=popped, stashed=None if state else stashed, stashed_sent=_specs(stashed), buffers=buffers,
            )  # fmt: skip
        output: Optional[TensorOrTensors] = None
        if not self.is_last:
            self.link.send_activations(i, ys, self._keys[i])  # type: ignore[union-attr]
        elif train:
            leaves = tuple(t.detach().requires_grad_(carries_grad(t)) for t in ys)
            self._slots[i].leaves = leaves  # type: ignore[union-attr]
            output = leaves[0] if isinstance(y, Tensor) else leaves
        else:
            output = y
        for port, t in zip(self.sends, stashed):  # after the activations, in the order the receiver takes them
            self.link.send_skip(i, port, t, self._keys[i])  # type: ignore[union-attr]
        if train and i == self._last_forward:
            commit(self.deferred_norms)  # the whole mini-batch's statistics, once
        return output

    def post_receives(self) -> None:
        """Post the receives of every gradient the backward actions will take, in the order they will arrive.

        Called as soon as the step is known to go on to its backward, so that the next stage's sends never wait
        for them; the backward phase posts them itself otherwise.
        """
        for action in self._actions(len(self._slots), Phase.BACKWARD):
            self.post_receive(action.i)

    def post_receive(self, i: int) -> None:
        """Post the receives of micro-batch ``i``'s output gradients (and its skips') that are not posted yet, once
        its forward has run."""
        if self.is_last:
            return
        if (i, -1) not in self._posted:
            self._expect_gradient(i)
        for port in self.sends:
            if (i, port.route) not in self._posted:
                self._expect_skip_gradient(i, port)

    def _expect_gradient(self, i: int) -> None:
        slot = self._slots[i]
        assert slot is not None, f"micro-batch {i} has no forward on stage {self.stage}"
        self.link.expect_gradients(i, slot.sent)  # type: ignore[union-attr]
        self._posted.add((i, -1))

    def _expect_skip_gradient(self, i: int, port: Port) -> None:
        slot = self._slots[i]
        assert slot is not None, f"micro-batch {i} has no forward on stage {self.stage}"
        shape, dtype = slot.stashed_sent[self.sends.index(port)]
        self.link.expect_skip_gradient(i, port, shape, dtype)  # type: ignore[union-attr]
        self._posted.add((i, port.route))

    def parameters(self) -> list[Tensor]:
        """This stage's parameters, each once."""
        return list({id(p): p for layer in self.layers for p in layer.parameters()}.values())

    def trainable_parameters(self) -> list[Tensor]:
        """This stage's parameters that may get gradients, each once."""
        return [p for p in self.parameters() if p.requires_grad]

    def drain(self) -> None:
        """Instead of the rest of a training step: take what the stages before still send, and send zeros back as
        the input gradients of every micro-batch whose backward has not run, in the schedule's order.

        The last stage calls it when its step failed after the stages before it started their backward, so that
        they finish it and then learn of the failure; every message they posted is matched.
        """
        for action in self.schedule.actions(self.k, len(self._slots), self.stage):
            self.drain_one(action)
        self.flush()

    def drain_one(self, action: Action) -> None:
        """:meth:`drain`'s part for one action: a forward takes its input if it has not, a backward whose forward
        ran sends zeros back."""
        i = action.i
        if action.phase is Phase.FORWARD:
            if self._slots[i] is None and i not in self._backward_done:  # taken, for the zeros of its backward
                x, popped = self._taken.get(i) or (self._receive(i, None, False), self._receive_skips(i, False))
                self._slots[i] = _Slot(inputs=x, outputs=None, state=None, popped=popped)
            return
        slot = self._slots[i]
        if slot is not None:  # its backward has not run
            if not self.is_first:
                zeros = [torch.zeros_like(x) for x in as_tuple(slot.inputs) if carries_grad(x)]
                self.link.send_gradients(i, zeros)  # type: ignore[union-attr]
            for port in self.receives:
                popped = slot.popped[port.key]
                if carries_grad(popped):
                    self.link.send_skip_gradient(i, port, torch.zeros_like(popped))  # type: ignore[union-attr]
            self.meter.release(slot.held)
            self._slots[i] = None
            self._backward_done.add(i)

    def _backward(self) -> None:
        self.post_receives()
        for action in self._actions(len(self._slots), Phase.BACKWARD):
            self.backward_one(action)
        self.flush()

    def backward_one(self, action: Action) -> None:
        """Run the backward ``action``: its output gradients (received, or the last stage's leaves' own), the
        recompute if its forward kept only the input, then its input gradients sent to the stage before."""
        i = action.i
        slot = self._slots[i]
        assert slot is not None, f"micro-batch {i} has no forward on stage {self.stage}"
        self.post_receive(i)  # receives that no peer's order placed before this backward: posted now
        if self.is_last:
            grads = [leaf.grad for leaf in slot.leaves]  # type: ignore[union-attr]
        else:
            with self.timeline.span("recv", i):
                grads = self.link.recv_gradients(i)  # type: ignore[union-attr]
        skip_grads = [self.link.recv_skip_gradient(i, port) for port in self.sends]  # type: ignore[union-attr]
        outputs, stashed = slot.outputs, slot.stashed
        if outputs is None:
            with self.timeline.span("recompute", i), self.meter.saving(), batchnorm_stats_kept(self.layers):
                with slot.state.replay(), self.buffers.replayed(slot.buffers):  # type: ignore[union-attr]
                    y, stashed = self._run(slot.inputs, slot.popped)
                    outputs = as_tuple(y)
        roots = zip((*outputs, *stashed), (*grads, *skip_grads))  # type: ignore[misc]
        pairs = [(y, g) for y, g in roots if g is not None and y.requires_grad]
        with self.timeline.span("backward", i):
            if pairs:
                torch.autograd.backward([y for y, _ in pairs], [g for _, g in pairs])
        if not self.is_first:
            self.link.send_gradients(i, _input_grads(slot.inputs))  # type: ignore[union-attr]
        for port in self.receives:
            popped = slot.popped[port.key]
            if carries_grad(popped):
                self.link.send_skip_gradient(i, port, _input_grads(popped)[0])  # type: ignore[union-attr]
        self.meter.release(slot.held)
        self._slots[i] = None
        self._backward_done.add(i)
        self._taken.pop(i, None)

    def flush(self) -> None:
        """Wait until this stage's sends have completed."""
        if self.link is not None:
            with self.timeline.span("send"):
                self.link.flush()

    def _actions(self, n: int, phase: Phase) -> list[Action]:
        """This stage's actions of ``phase`` for ``n`` micro-batches, in order (the schedule, derived once per n)."""
        key = (n, phase)
        if key not in self._orders:
            self._orders[key] = [a for a in self.schedule.actions(self.k, n, self.stage) if a.phase is phase]
        return self._orders[key]

    def _receive(self, i: int, ahead: Optional[int], train: bool) -> Any:
        ahead_key = self._keys[ahead] if ahead is not None else None
        xs = self.link.recv_activations(i, ahead, self._keys[i], ahead_key)  # type: ignore[union-attr]
        if train:
            xs = tuple(x.requires_grad_(carries_grad(x)) for x in xs)
        return xs[0] if len(xs) == 1 else xs

    def _receive_skips(self, i: int, train: bool) -> dict[Key, Tensor]:
        popped = {}
        for port in self.receives:
            with self.timeline.span("recv", i):
                x = self.link.recv_skip(i, port, self._keys[i])  # type: ignore[union-attr]
            popped[port.key] = x.requires_grad_(train and carries_grad(x))
        return popped

    def _run(self, x: Any, popped: dict[Key, Tensor]) -> tuple[TensorOrTensors, Tensors]:
        """The stage's layers on ``x``; also returns the tensors stashed for later stages, in the ports' order."""
        if not self.sends and not self.receives:  # skips within the stage, if any, keep to the thread's own tracker
            return self.run_layers(_fresh(x)), ()
        with use_tracker(StageTracker(popped, (p.key for p in self.sends))) as tracker:
            y = self.run_layers(_fresh(x))
        return y, tuple(tracker.outgoing_tensors(self.sends))


def _due(peer: list[Action]) -> dict[int, list[int]]:
    """For a stage that sends its forwards' outputs to ``peer`` (whose actions these are) and takes their gradients
    back: after its forward of micro-batch ``i``, the gradient receives to post, in the order ``peer`` runs those
    backwards among its forwards (both take the forwards in the same order)."""
    due: dict[int, list[int]] = {}
    last = -1
    for action in peer:
        if action.phase is Phase.FORWARD:
            last = action.i
        else:
            due.setdefault(last, []).append(action.i)
    return due


def _fresh(x: Any) -> Any:
    """A received input as the layers may use it: a copy of each leaf that collects gradients, so a layer
    working in place (``ReLU(inplace=True)``) neither trips autograd nor alters the input kept for recompute."""
    if isinstance(x, Tensor):
        return x.clone() if x.requires_grad else x
    if isinstance(x, tuple) and all(isinstance(t, Tensor) for t in x):
        return tuple(_fresh(t) for t in x)
    return x


def _specs(xs: Tensors) -> tuple[tuple[torch.Size, torch.dtype], ...]:
    return tuple((x.shape, x.dtype) for x in xs)


def _input_grads(inputs: Any) -> list[Tensor]:
    """Gradients of a stage input, zeros where autograd left none (an input the stage ignores)."""
    return [x.grad if x.grad is not None else torch.zeros_like(x) for x in as_tuple(inputs) if carries_grad(x)]
