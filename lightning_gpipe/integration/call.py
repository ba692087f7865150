"""``self(x)`` during a step: the pipeline in place of the module's forward, and what the last stage's code after it
may do that must reach global rank 0 (``self.print``) or cannot (rank-zero-only code)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Callable, Optional

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.microbatch import batch_size, merge, shape_keys, split, split_sizes
from lightning_gpipe.engine.rng import rank_random_state
from lightning_gpipe.patching import patched
from lightning_gpipe.schedule import Action

__all__ = ["PipelineCall", "StageFinished", "prints_recorded", "rank_zero_watched"]


class StageFinished(BaseException):
    """Ends the user's step on a stage that has no loss to compute (a BaseException so ``except Exception`` passes it)."""


class PipelineCall:
    """Stands in for ``LightningModule.forward`` during a step: ``self(x)`` runs the pipeline on the whole batch.

    With a schedule whose loss runs per micro-batch (1F1B), a stage that is not the last trains through every action
    of its schedule in ``self(x)`` (``run``); the last stage's step runs once per micro-batch, and ``self(x)`` is then
    that micro-batch's forward alone (:meth:`expect`).
    """

    def __init__(
        self, executor: StageExecutor, microbatches: int, train: bool, check: Optional[Callable[[Any], None]] = None,
        run: Optional[Callable[[Optional[list[Any]], int, list[Hashable]], None]] = None,
        keys: Optional[list[Hashable]] = None,
    ) -> None:  # fmt: skip
        self.executor, self.microbatches, self.train = executor, microbatches, train
        self.check = check  # called with the first input, to verify the module's forward contract
        self.run = run  # trains through the whole schedule (a stage before the last, per-micro-batch loss)
        self.keys = keys  # the micro-batches' shape keys, when not those of self(x)'s input (per-micro-batch loss)
        self.calls = 0
        self.returned = False  # whether the pipeline ran to the end and handed the step its output
        self.samples = self.n = 0  # batch size and micro-batch count, once called
        self.random: Optional[dict[str, Any]] = None  # last stage: the rank-wide random state at self(x)
        self.one: Optional[tuple[Action, int]] = None  # per micro-batch: the forward to run, and its rows

    def expect(self, action: Action, rows: int, n: int, samples: int) -> None:
        """The next ``self(x)`` is micro-batch ``action.i``'s forward, of ``rows`` samples (of ``samples`` in ``n``
        micro-batches), in a step run once per micro-batch."""
        self.one, self.n, self.samples = (action, rows), n, samples
        self.calls, self.returned = 0, False

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(
                "GPipeStrategy: the step called self(...) a second time. The pipeline runs the model once per"
                " step on the whole batch: compute everything from the output of one self(x) call."
            )
        if args or kwargs:
            raise TypeError(
                "GPipeStrategy: self(...) takes exactly one input under the pipeline, as nn.Sequential does;"
                f" got {1 + len(args)} positional and {len(kwargs)} keyword arguments"
            )
        if self.check is not None:
            self.check(x)
            self.check = None  # once a step (the last stage's step may run once per micro-batch)
        executor = self.executor
        if executor.is_last and executor.k > 1 and self.random is None:  # idle until its first input: no time lost
            self.random = rank_random_state(executor.device)
        if self.one is not None:
            return self._one(x, *self.one)
        self.samples = batch_size(x)
        micro = split(x, self.microbatches) if executor.is_first else None
        self.n = len(micro) if micro is not None else len(split_sizes(self.samples, self.microbatches))
        keys = self.keys if self.keys is not None else shape_keys(x, self.microbatches, self.train)
        if self.run is not None and self.train:
            if len(keys) != self.n:  # keys of the batch's slices, which the last stage's steps take
                raise ValueError(
                    f"GPipeStrategy(schedule={executor.schedule.name!r}) runs the step once per micro-batch, on its"
                    f" slice of the batch: the batch splits into {len(keys)} micro-batches, but self(x)'s input of"
                    f" {self.samples} rows into {self.n}. x must be the batch's samples, in order, one row each."
                )
            self.run(micro, self.n, keys)
            raise StageFinished
        outputs = executor.forward(micro, self.n, self.train, keys)
        if not executor.is_last:
            raise StageFinished
        assert outputs is not None
        self.returned = True
        return merge(outputs)

    def _one(self, x: Any, action: Action, rows: int) -> Any:
        if batch_size(x) != rows:
            raise ValueError(
                f"GPipeStrategy(schedule={self.executor.schedule.name!r}) runs the step once per micro-batch, on its"
                f" slice of the batch: micro-batch {action.i} holds {rows} samples, but self(x) got {batch_size(x)}"
                " rows. x must be the batch's samples, in order, one row each."
            )
        with self.executor.random.active():
            output = self.executor.forward_one(action, x if self.executor.is_first else None, train=True)
        self.returned = True
        return output


def prints_recorded(module: LightningModule, call: PipelineCall, prints: list[tuple[tuple, dict]]) -> Any:
    """Inside the block, ``module.print`` after ``self(x)`` returned records its arguments into ``prints``."""
    original = module.print

    def print_(*args: Any, **kwargs: Any) -> None:
        if call.returned:
            prints.append((args, kwargs))
        else:
            original(*args, **kwargs)

    return patched(module, "print", print_)


class _WatchedRank(int):
    """``rank_zero_only.rank`` that notes when code compares it with 0, once ``call`` has returned: rank-zero-only
    code (``@rank_zero_only``, a logger's ``experiment``) asking whether it runs where it does not."""

    def __new__(cls, rank: int, call: PipelineCall, seen: list[bool]) -> _WatchedRank:
        watched = super().__new__(cls, rank)
        watched.call, watched.seen = call, seen
        return watched

    def _note(self, other: Any) -> None:
        if other == 0 and self.call.returned:
            self.seen.append(True)

    def __eq__(self, other: Any) -> bool:
        self._note(other)
        return int(self) == other

    def __gt__(self, other: Any) -> bool:
        self._note(other)
        return int(self) > other

    __hash__ = int.__hash__


def rank_zero_watched(call: PipelineCall, seen: list[bool]) -> Any:
    return patched(rank_zero_only, "rank", _WatchedRank(getattr(rank_zero_only, "rank", 0), call, seen))
