"""The last stage's step under a schedule whose loss runs per micro-batch (1F1B): the user's step once on each
micro-batch's slice of the batch, each loss's backward at once, and the step's logs and output merged back.

The gradient equals the whole batch's for a loss that is a mean over samples: micro-batch i's loss is scaled by
n_i / N (its share of the batch's samples; uneven micro-batches included). Logged values and the returned loss are
the sample-weighted means of the micro-batches' values, so a mean loss logs the whole batch's value. A loss that is
not a mean over samples (a sum, a statistic of the whole batch, a contrastive loss across samples) cannot be split
so: train it with ``schedule="gpipe"``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from numbers import Number
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.microbatch import batch_size, shape_keys, split
from lightning_gpipe.integration.backward import loss_problem
from lightning_gpipe.integration.call import PipelineCall
from lightning_gpipe.integration.logs import LogRecord
from lightning_gpipe.schedule import Phase

__all__ = ["run_per_microbatch", "batch_keys", "merge_logs", "merge_output"]


def _batch(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs["batch"]


def batch_keys(args: tuple, kwargs: dict, microbatches: int) -> Optional[list[Hashable]]:
    """The shape keys of a training step's batch split as the last stage splits it, for the stages before it
    (``None`` for a batch that does not split: the last stage refuses it)."""
    try:
        return shape_keys(_batch(args, kwargs), microbatches, True)
    except (TypeError, ValueError, KeyError, IndexError):
        return None


def run_per_microbatch(
    module: LightningModule, hook: str, args: tuple, kwargs: dict, executor: StageExecutor, call: PipelineCall,
    microbatches: int, records: list[LogRecord], backward: Callable[[Tensor], None],
) -> Any:  # fmt: skip
    """Run the last stage's actions: for each micro-batch, the user's ``hook`` on its slice of the batch (its
    ``self(x)`` the micro-batch's forward), the backward of its loss scaled by its share of the samples, then the
    stage's backward of it. ``records`` collects the logged calls and ends merged. Returns the merged output."""
    where = f"{type(module).__name__}.{hook}"
    name = executor.schedule.name
    batch = _batch(args, kwargs)
    try:
        slices = split(batch, microbatches)
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"GPipeStrategy(schedule={name!r}) runs {where} once per micro-batch, on its slice of the batch, which"
            f" must split along dim 0: {error}"
        ) from error
    rows = [batch_size(piece) for piece in slices]
    total, accumulate = sum(rows), module.trainer.accumulate_grad_batches
    executor.begin(len(slices), shape_keys(batch, microbatches, True))
    outputs: list[Any] = []
    bounds: list[tuple[int, int]] = []  # each forward's logged calls, as positions in ``records``
    shares: list[float] = []  # each forward's share of the batch's samples
    for action in executor.schedule.actions(executor.k, len(slices), executor.stage):
        if action.phase is Phase.BACKWARD or not executor.holds_loss(action):  # no step of the user's to run
            with executor.random.active():
                if action.phase is Phase.BACKWARD:
                    executor.backward_one(action)
                else:
                    executor.forward_one(action, None, train=True)
            continue
        piece = slices[action.i]
        call.expect(action, rows[action.i], len(slices), total)
        start = len(records)
        step_args, step_kwargs = ((piece, *args[1:]), kwargs) if args else ((), {**kwargs, "batch": piece})
        output = getattr(module, hook)(*step_args, **step_kwargs)
        if call.calls == 0:
            raise RuntimeError(
                f"GPipeStrategy: {where} never called self(...). The pipeline runs when the step calls the module on"
                " its input, e.g. `logits = self(x)`."
            )
        problem = loss_problem(output, where)
        if problem is not None:
            raise problem
        outputs.append(output)
        bounds.append((start, len(records)))
        shares.append(rows[action.i] / total)
        loss = output["loss"] if isinstance(output, Mapping) else output
        with torch.autocast(executor.device.type, enabled=False):  # as Lightning's backward, outside the step
            backward(loss * shares[-1] / accumulate)
    executor.flush()
    records[:] = merge_logs([records[s:e] for s, e in bounds], shares, where)
    return merge_output(outputs, shares, where)


def merge_logs(per_microbatch: list[list[LogRecord]], weights: list[float], where: str) -> list[LogRecord]:
    """One step's logged calls from each micro-batch's: the same names in the same order each time, each value the
    ``weights``-weighted sum of the micro-batches' values (the sample-weighted mean), the other arguments the first's."""
    first = [r[0] for r in per_microbatch[0]]
    for i, records in enumerate(per_microbatch[1:], 1):
        if [r[0] for r in records] != first:
            raise ValueError(
                f"GPipeStrategy: {where} runs once per micro-batch under a per-micro-batch schedule and logged"
                f" {first} for micro-batch 0 but {[r[0] for r in records]} for micro-batch {i}: log the same names"
                " on every call"
            )
    merged = []
    for position, (name, _, args, kwargs) in enumerate(per_microbatch[0]):
        values = [records[position][1] for records in per_microbatch]
        merged.append((name, _weighted(values, weights, f"self.log({name!r}, ...) of {where}"), args, kwargs))
    return merged


def merge_output(outputs: list[Any], weights: list[float], where: str) -> Any:
    """The step's output from each micro-batch's: the loss (and any other number in a returned dict) the
    sample-weighted mean."""
    if not isinstance(outputs[0], Mapping):
        return _weighted(outputs, weights, f"the loss {where} returned")
    return {key: _weighted([o[key] for o in outputs], weights, f"{key!r} of what {where} returned") for key in outputs[0]}


def _weighted(values: list[Any], weights: list[float], what: str) -> Any:
    if all(isinstance(v, Tensor) and v.numel() == 1 for v in values) or all(isinstance(v, Number) for v in values):
        return sum(w * v for w, v in zip(weights, values))
    raise TypeError(
        f"GPipeStrategy: {what} is {type(values[0]).__name__}; under a per-micro-batch schedule the step runs once"
        " per micro-batch and its values are merged as their sample-weighted mean, which needs a number or a"
        " one-element tensor"
    )
