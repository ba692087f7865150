"""Every patch the pipeline makes to a user's, Lightning's or a library's object: one registry, one way to make it.

The strategy leaves the user's LightningModule unmodified; for the length of a step or a run it shadows a few
attributes with instance attributes, and nothing else sets attributes on objects it does not own. Each one is
listed in :data:`PATCHES` with the reason, and :func:`patched` (a block) and :func:`shadow` / :func:`unshadow`
(a patch that undoes itself when called) refuse any name not listed there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["PATCHES", "patched", "shadow", "unshadow"]

#: Attribute name -> (whose, for how long, and why).
PATCHES: dict[str, str] = {
    "forward": "LightningModule, one step: self(x) runs the pipeline (integration.step.PipelineCall); while a measured"
    " balance samples the first batch, it captures the input of self(x) (integration.balancing)",
    "log": "LightningModule, one step: the last stage records its self.log calls to share them; the others mute"
    " theirs and replay the last stage's (integration.logs)",
    "print": "LightningModule, one step: self.print after self(x) runs on the last stage and is sent to global rank 0,"
    " which alone prints (integration.step)",
    "parameters": "LightningModule and its Sequential, code around the backward and optimizer step of a step, and"
    " batch-end and epoch-end hooks for a run: refused there, since they would see one stage (integration.contract)",
    "named_parameters": "as parameters",
    "on_save_checkpoint": "LightningModule, one save: note what the hook puts into the checkpoint, which global rank 0"
    " takes from the last stage (integration.contract.LastStageSaved); undone by the hook's call",
    "_summary": "Lightning's ModelSummary callback, a run: summarize the whole module, not this rank's stage"
    " (integration.contract.frozen_summaries)",
    "_example_input_array": "LightningModule, a run: None, so Lightning's summary does not run one stage on the"
    " whole model's input; restored at teardown (integration.runtime)",
    "clip_grad_by_norm": "Lightning's precision plugin, a run: the norm over every stage's gradients, one all-reduce"
    " (integration.backward)",
    "step": "the torch optimizer, one optimizer step with GPipeStrategy(shard=...): once the step's closure has run,"
    " the optimizer steps this replica's share of the parameters (parallel.shard)",
    "_sigterm_notifier_fn": "Lightning's signal connector, a run: note SIGTERM without the collective Lightning's"
    " handler starts inside the handler, which pairs with another rank's messages and hangs (integration.runtime)",
    "rank": "lightning's rank_zero_only, one step on the last stage: notice rank-zero-only code after self(x), which"
    " would do nothing there (integration.step)",
    "get_torch_context_manager_or_global_device": "transformers.modeling_utils, while a model is built deferred:"
    " answer 'no device' so its weight initialisation runs and is recorded (model.deferred)",
}


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Shadow ``obj.name`` with ``value`` for the duration of the block (``name`` must be in :data:`PATCHES`).

    Written to the instance's ``__dict__`` directly: the attribute is a plain value (a function, a method), which
    ``nn.Module.__setattr__`` would store there too after its checks, and this runs several times per step.
    """
    previous = shadow(obj, name, value)
    try:
        yield
    finally:
        unshadow(obj, name, previous)


_MISSING = object()


def shadow(obj: Any, name: str, value: Any) -> Any:
    """Shadow ``obj.name`` with ``value`` until :func:`unshadow`; returns what to hand it."""
    if name not in PATCHES:
        raise KeyError(f"lightning_gpipe.patching: {name!r} is not in PATCHES; list it there with the reason")
    attributes = obj.__dict__
    previous = attributes.get(name, _MISSING)
    attributes[name] = value
    return previous


def unshadow(obj: Any, name: str, previous: Any = _MISSING) -> None:
    """Undo :func:`shadow`: ``previous`` is what it returned (by default, remove the shadowing attribute)."""
    if previous is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = previous
