"""One step on one stage: the user's step code around the pipeline, and what the last stage shares.

The user's ``training_step`` (or validation, test, predict step) runs on every stage, with ``self(x)``
routed through the pipeline. One training step on stage j of K, in the order things happen::

    stage j < K-1                                   stage K-1 (the last)
    1. the user's step code up to self(x)           1. the same (every stage runs it, on the same batch)
    2. self(x): forward of micro-batches 0..M-1,    2. self(x): note the rank-wide random state, receive
       each output sent on as it is ready              and forward 0..M-1; self(x) returns the merged outputs
    3. the step ends there (StageFinished);        3. the user's code after self(x): the loss; its
       receive the last stage's logged calls (or       self.log calls are recorded, not made, and sent
       its error, raised here too); post every         to the others at once (their tensors stay on the
       receive still to come; make the calls           device); an error is sent instead
    4. backward of M-1..0, each as its gradient     4. the loss's backward, as Lightning would run it
       arrives, input gradients sent back; the         after the step, then M-1..0, each micro-batch's
       fresh gradients are held aside                  input gradients sent back at once; the fresh
                                                       gradients are held aside
    5. receive the last stage's results (or its     5. share the results without waiting: the step's
       error, raised here too); take its random        output, trainer.should_stop, the optimizers'
       state if it sent it; global rank 0 prints       settings, its self.print calls after self(x), and
       what it printed; return its output              the rank-wide random state if the code after
                                                       self(x) drew from it; make the calls
    6. Lightning: zero_grad, strategy.backward: the held gradients become .grad (every stage)
    7. the optimizer step; clipping by norm takes one all-reduce of the stages' squared norms

So no stage's backward waits for anything but its gradients, and the stages' logged calls leave the critical
path: the others make them while the last stage runs its backward, which it starts right after sending them.
Nothing in that send waits for the device: the calls travel pickled, their tensors as one buffer on the
device (on the CPU, pickled too). Every stage makes the same self.log calls, so an error Lightning raises for
one is raised on every stage; the others post every receive still to come before making them, so that none
of the last stage's messages is left without a receiver. The rank-wide random state (14 KiB on the CPU) joins
the results only if the code after self(x) drew from it: the others' streams are as they were at self(x),
where the last stage noted its own. Step 4 runs inside the step only where that is exact (see
:class:`BackwardPlan`); otherwise the last stage shares its logged calls with its results at the end of its
step, the others make them when they take the results, and every stage runs its backward in step 6, when
Lightning calls it.

Evaluation steps run 1, 2, 3 (the last stage's code) and 5, without gradients; the logged calls travel with
the results. Besides the transfers between neighbours, the last stage sends the logged calls (step 3: one
message to each other stage, or two with tensors on a GPU) and the results (step 5) point to point; a step's
collectives are clipping's all-reduce, and an observed step (``observe_every_n_steps``) adds a barrier before
it and a gather after it, and Lightning adds its own (``self.log(..., sync_dist=True)``, ``EarlyStopping``'s
decision).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningModule
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_gpipe.engine.broadcast import ObjectBroadcast
from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.rng import rank_random_state, set_rank_random_state
from lightning_gpipe.integration.backward import BackwardPlan, HeldGradients, loss_problem
from lightning_gpipe.integration.call import PipelineCall, StageFinished, prints_recorded, rank_zero_watched
from lightning_gpipe.integration.contract import StageError, parameters_refused
from lightning_gpipe.integration.logs import muted_logs, record_logs, replay_logs, shareable
from lightning_gpipe.integration.microsteps import batch_keys, run_per_microbatch
from lightning_gpipe.model.partition import check_forward
from lightning_gpipe.parallel.collectives import Failure
from lightning_gpipe.parallel.replicas import ReplicaAverage
from lightning_gpipe.patching import patched

__all__ = ["StageStep"]


class StageStep:
    """Runs the user's step hooks on one stage (steps 1 to 4 of the diagram above)."""

    def __init__(
        self, executor: StageExecutor, microbatches: int, sequential: str, device: torch.device,
        sharing: Optional[ObjectBroadcast], loss_backward: Callable[[Tensor], None], source: Optional[int] = None,
        microbatch_backward: Optional[Callable[[Tensor], None]] = None,
    ) -> None:  # fmt: skip
        if executor.k > 1 and sharing is None:
            raise ValueError(f"a pipeline of {executor.k} stages needs an ObjectBroadcast for the last stage's results")
        self.executor, self.microbatches, self.sequential, self.device = executor, microbatches, sequential, device
        self.sharing = sharing
        self.loss_backward = loss_backward  # Lightning's backward of a step's (scaled) loss: hooks, precision
        self.microbatch_backward = microbatch_backward or loss_backward  # one micro-batch's loss (1F1B): no hooks
        self.source = executor.k - 1 if source is None else source  # the last stage's global rank
        self.averager: Optional[ReplicaAverage] = None  # set for a step whose gradients the replicas average
        self._averaged: tuple[list[Tensor], bool] = ([], False)  # the parameters averaged, and whether held
        self.call: Optional[PipelineCall] = None  # the latest step's, for what it measured
        self._running: Optional[tuple[str, PipelineCall]] = None  # the hook under way and its self(x)
        self._checked_modes: set[bool] = set()  # module.training values whose forward has been checked
        self.plan: Optional[BackwardPlan] = None  # the latest training step's
        self.held = HeldGradients()  # this stage's gradients from a backward run in the step
        self._warned: set[str] = set()  # hooks warned of rank-zero-only code after self(x)

    def check_collective(self, name: str) -> None:
        """Raise if the step's code after ``self(x)``, which runs on the last stage alone, starts a collective:
        no other stage would ever join it."""
        if self._running is not None and self._running[1].returned and self.executor.k > 1:
            raise StageError(
                f"GPipeStrategy: {self._running[0]} called {name} after self(x). That code runs on the last stage"
                " alone, so no other stage would join the collective. Call it before self(x), or in a hook every"
                " stage runs (such as on_validation_epoch_end)."
            )

    @property
    def _early(self) -> bool:
        """Whether the stages run this training step's backward inside the step (step 4)."""
        return self.plan in (BackwardPlan.FRESH, BackwardPlan.ACCUMULATE)

    @property
    def backward_ran(self) -> bool:
        """Whether this stage's backward already ran inside the latest training step (step 4)."""
        return self._early

    def run(
        self, module: LightningModule, hook: str, train: bool, args: tuple, kwargs: dict,
        plan: Optional[BackwardPlan] = None,
    ) -> Any:  # fmt: skip
        """Run ``module.<hook>(*args, **kwargs)`` with ``self(x)`` routed through the pipeline; on every stage,
        return what the last stage's step returned. ``plan`` (training only) places the stages' backward."""
        executor = self.executor
        per_micro = train and executor.schedule.loss_per_microbatch  # the last stage's step runs per micro-batch
        self.plan = plan if train and (executor.k > 1 or per_micro) else None
        self.held.discard()
        if per_micro and self.plan is BackwardPlan.LATE:  # decided alike on every stage: refused on every stage
            raise StageError(
                f"GPipeStrategy(schedule={executor.schedule.name!r}) runs each micro-batch's backward inside the step,"
                " so no code can run between the step and its backward; this run has some (an on_before_zero_grad,"
                " optimizer_zero_grad or on_before_backward of the module, or a callback's): use schedule='gpipe'"
            )
        check = None
        if module.training not in self._checked_modes:  # forward may branch on self.training: check both
            self._checked_modes.add(module.training)
            check = partial(check_forward, module, self.sequential)
        run, keys = None, None
        if per_micro and not executor.is_last:  # the keys of the slices of the batch the last stage's steps take
            run, keys = partial(self._train_through, executor.parameters()), batch_keys(args, kwargs, self.microbatches)
        call = self.call = PipelineCall(executor, self.microbatches, train, check, run, keys)
        # The last stage records its calls of self.log; the others drop their own. Every stage makes the recorded
        # calls: the last at the end of its step (step 5), the others once they have them (step 3, or step 5).
        recording = executor.is_last and (executor.k > 1 or per_micro)
        logging = record_logs(module) if recording else nullcontext([]) if executor.k == 1 else muted_logs(module)
        # The last stage's self.print calls after self(x) go to global rank 0, which prints them (it alone prints).
        prints: list[tuple[tuple, dict]] = []
        printing = prints_recorded(module, call, prints) if executor.k > 1 and executor.is_last else nullcontext()
        rank_zero_code: list[bool] = []  # whether the code after self(x) asked if it runs on global rank 0
        watching = rank_zero_watched(call, rank_zero_code) if executor.k > 1 and executor.is_last else nullcontext()
        where = f"{type(module).__name__}.{hook}"
        refusal = (
            parameters_refused(module, module.get_submodule(self.sequential), where) if executor.k > 1 else nullcontext()
        )
        # The stage's parameters, for a backward in the step (0.2 ms here): taken while nothing waits on this stage,
        # on the last stage before its first input arrives, on the others after their forward.
        params = executor.parameters() if self._early and executor.is_last else []
        self._running = (where, call)
        with patched(module, "forward", call), logging as records, refusal, printing, watching:
            try:
                if per_micro and executor.is_last:
                    output = self._per_microbatch(module, hook, args, kwargs, records, params)
                else:
                    output = getattr(module, hook)(*args, **kwargs)
                if call.calls == 0:
                    raise RuntimeError(
                        f"GPipeStrategy: {where} never called self(...). The pipeline runs when the step calls the"
                        " module on its input, e.g. `logits = self(x)`."
                    )
            except StageFinished:
                output = None
            except Exception as error:
                # The other stages wait for this one's logs (per micro-batch: for its gradients too): send the error.
                if call.returned and executor.k > 1 and not per_micro:
                    self._fail(Failure.of(error), drain=False)
                raise
            finally:
                self._running = None
        if executor.k == 1:
            if per_micro:  # recorded to be merged: made now
                replay_logs(module, records, self.device)
            return output
        if executor.is_last:
            if rank_zero_code and where not in self._warned:
                self._warned.add(where)  # said on the last stage itself, which a rank-zero warning would skip
                warnings.warn(
                    f"GPipeStrategy: {where} ran rank-zero-only code after self(x) (a @rank_zero_only function,"
                    " rank_zero_info, self.logger.experiment, ...). That code runs on the last stage, where it does"
                    " nothing: call it before self(x) or in an epoch hook. self.print and self.log after self(x) do"
                    " reach global rank 0.",
                    stacklevel=2,
                )
            problem = loss_problem(output, where) if train and not per_micro else None
            if problem is not None:  # Lightning would refuse it before the backward: so do the other stages
                self._fail(Failure.of(problem), drain=False)
                raise problem
            logs_ahead = self._early and not per_micro  # per micro-batch: the backward ran, logs go with results
            if logs_ahead:
                with executor.timeline.span("logs"):  # step 3: the logged calls, their tensors left on the device
                    self._share(records, where, packed=True)
                self._backward_in_step(module, output, params)  # step 4
            with executor.timeline.span("results"):
                # The rank-wide streams, where the code after self(x) may have drawn (a backward leaves them as they
                # were): the others have them as they were at self(x), so they need them only if that code drew.
                random = rank_random_state(self.device)
                assert call.random is not None  # noted when self(x) began, which it has (the step returned)
                results = {
                    "records": None if logs_ahead else shareable(records),
                    "output": apply_to_collection(output, Tensor, Tensor.detach),
                    "should_stop": module.trainer.should_stop,
                    "random": None if _same_random(random, call.random) else random,
                    "param_groups": _hyperparameters(module) if train else None,
                    "prints": prints,
                }
                self._share(results, where)
            replay_logs(module, records, self.device)  # step 5: the same calls as every other stage
            return output
        if not self.backward_ran or per_micro:  # per micro-batch: the backward ran in self(x), logs come with results
            return self._take_shared(module)
        with executor.timeline.span("logs"):  # step 3: while the last stage runs its backward
            params = executor.parameters()
            records = self.sharing.receive_packed(self.source)  # type: ignore[union-attr]
            if isinstance(records, Failure):  # nothing was sent to this stage after it
                raise records.error
            # Every message still to come is posted first: should a logged call raise here, as it will on every
            # stage, the last stage's gradients and results still have a receiver and it does not wait forever.
            executor.post_receives()
            self.sharing.expect(self.source)  # type: ignore[union-attr]  # the results arrive during the backward
            replay_logs(module, records, self.device)
        # step 4: nothing this stage needs from the last stage's results
        with torch.autocast(self.device.type, enabled=False):  # as Lightning's backward, outside the step
            self.held.compute(executor.backward, params, self.plan)  # type: ignore[arg-type]
        self.start_average()  # the replicas' average travels while this stage waits for the results
        return self._take_shared(module)

    def _train_through(self, params: list[Tensor], inputs: Optional[list[Any]], n: int, keys: list[Hashable]) -> None:
        """A stage before the last, per-micro-batch loss: every action of its schedule, in ``self(x)``."""
        with torch.autocast(self.device.type, enabled=False):  # the backwards as Lightning's, outside the step
            self.held.compute(partial(self.executor.run, inputs, n, keys), params, self.plan)  # type: ignore[arg-type]
        self.start_average()

    def _per_microbatch(
        self, module: LightningModule, hook: str, args: tuple, kwargs: dict, records: list, params: list[Tensor]
    ) -> Any:
        """The last stage, per-micro-batch loss: its step once per micro-batch (integration.microsteps). If it fails,
        the rest of its actions are drained, so the other stages finish theirs, and they are sent the error."""
        step = partial(
            run_per_microbatch, module, hook, args, kwargs, self.executor, self.call, self.microbatches, records,
            self.microbatch_backward,
        )  # fmt: skip
        result: list[Any] = []
        try:
            self.held.compute(lambda: result.append(step()), params, self.plan)  # type: ignore[arg-type]
        except Exception as error:
            if self.executor.k > 1:
                self._fail(Failure.of(error), drain=True)
            raise
        self.start_average()
        return result[0]

    def _backward_in_step(self, module: LightningModule, output: Any, params: list[Tensor]) -> None:
        """Last stage, step 4: the loss's backward as Lightning would run it after the step, then every
        micro-batch's, into ``params`` (the stage's); the fresh gradients are held aside from Lightning's zero_grad
        as on the other stages."""
        loss = output["loss"] if isinstance(output, Mapping) else output
        closure_loss = loss / module.trainer.accumulate_grad_batches  # Lightning's own scaling of the step's loss
        executor = self.executor

        def backward() -> None:
            try:
                self.loss_backward(closure_loss)
            except Exception as error:  # no gradient has left yet: end the others' backward, then tell them
                self._fail(Failure.of(error), drain=True)
                raise
            executor.backward()

        with torch.autocast(self.device.type, enabled=False):  # as Lightning's backward, outside the step
            self.held.compute(backward, params, self.plan)  # type: ignore[arg-type]
        self.start_average()

    def start_average(self) -> None:
        """Post the average over the replicas of this stage's gradients (held or in ``.grad``), if this step's
        gradients are averaged; right after this stage's backward."""
        if self.averager is None:
            return
        params = self.executor.trainable_parameters()
        held = self.backward_ran and self.plan is BackwardPlan.FRESH
        self.averager.start(params, self.held.of(params) if held else [p.grad for p in params])
        self._averaged = (params, held)

    def finish_average(self) -> None:
        """Wait for the average posted by :meth:`start_average` and put it where the gradients were."""
        if self.averager is None or not self.averager.started:
            return
        averaged = self.averager.finish()
        params, held = self._averaged
        self._averaged = ([], False)
        if held:
            self.held.replace(params, averaged)
        else:
            for p, g in zip(params, averaged):
                p.grad = g

    def _share(self, results: Any, where: str, packed: bool = False) -> None:
        """Send ``results`` to the other stages; if they cannot travel, send them the error instead, and raise it.

        ``packed``: their tensors stay on the device (the logs, before the backward). Otherwise they go to the
        CPU, but for the random state's: there already, and walking the 625 numbers of Python's state would cost
        more than a millisecond here."""
        assert self.sharing is not None
        try:
            if packed:
                self.sharing.send_packed(results)
            else:
                self.sharing.send({k: v if k == "random" else apply_to_collection(v, Tensor, _cpu) for k, v in results.items()})
        except Exception as error:
            failure = Failure.of(
                TypeError(
                    f"GPipeStrategy: what {where} returned or logged cannot be sent to the other stages ({error})."
                    " Return and log tensors and plain Python values."
                )
            )
            self._fail(failure, drain=False)  # shared before the others' backward, or after this one's
            raise failure.error from error

    def _fail(self, failure: Failure, drain: bool) -> None:
        """Send the last stage's error to the others; ``drain``: first end the backward they are in (step 4, or the
        rest of a per-micro-batch step)."""
        assert self.sharing is not None
        if drain:
            self.executor.drain()
        self.sharing.send(failure)

    def _take_shared(self, module: LightningModule) -> Any:
        """Take the last stage's results."""
        assert self.sharing is not None
        with self.executor.timeline.span("results"):
            shared = self.sharing.receive(src=self.source)
        if isinstance(shared, Failure):
            self.held.discard()
            raise shared.error
        if shared["random"] is not None:  # the step's code after self(x) drew from the rank-wide streams
            set_rank_random_state(shared["random"], self.device)
        module.trainer.should_stop = shared["should_stop"]
        if shared["param_groups"] is not None:
            _set_hyperparameters(module, shared["param_groups"])
        for args, kwargs in shared["prints"]:  # self.print prints on global rank 0 only
            module.print(*args, **kwargs)
        if shared["records"] is not None:  # not sent ahead (step 3)
            replay_logs(module, shared["records"], self.device)  # an error here is the last stage's too: raised alike
        if self.plan is BackwardPlan.LATE:  # the backward follows
            self.executor.post_receives()
        return apply_to_collection(shared["output"], Tensor, lambda t: t.to(self.device))

    def wait(self) -> None:
        """Until the other stages have received everything this one shared."""
        if self.sharing is not None:
            self.sharing.wait()


def _hyperparameters(module: LightningModule) -> list[list[dict[str, Any]]]:
    """Every optimizer's parameter-group settings (learning rate, momentum, ...), which a step may change."""
    return [
        [
            {k: _cpu(v) if isinstance(v, Tensor) else v for k, v in group.items() if k not in ("params", "param_names")}
            for group in o.param_groups
        ]
        for o in module.trainer.optimizers
    ]


def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu()


def _same_random(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`rank_random_state` snapshots are the same state."""
    if a.keys() != b.keys() or a["python"] != b["python"]:
        return False
    (kind, keys, *rest), (kind_b, keys_b, *rest_b) = a["numpy"], b["numpy"]
    tensors = [(a[key], b[key]) for key in ("torch", "cuda") if key in a] + [(keys, keys_b)]
    return kind == kind_b and rest == rest_b and all(torch.equal(x, y) for x, y in tensors)


def _set_hyperparameters(module: LightningModule, settings: list[list[dict[str, Any]]]) -> None:
    for optimizer, groups in zip(module.trainer.optimizers, settings):
        for group, values in zip(optimizer.param_groups, groups):
            for key, value in values.items():
                if isinstance(group.get(key), Tensor):  # a tensor setting (a capturable optimizer's lr) stays put
                    group[key].copy_(value)
                else:
                    group[key] = value
