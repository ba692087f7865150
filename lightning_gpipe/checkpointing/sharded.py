"""Sharded checkpoints: each stage writes its own tensors with ``torch.distributed.checkpoint``.

A sharded checkpoint is a folder. Tensors are stored under keys that do not depend on the partitioning
(``state_dict.<name>`` and ``optimizer_states.<i>.<name>.<key>``), so a pipeline of any K reads back
exactly its own parameters; everything else of the Lightning checkpoint (loops, schedulers, callbacks,
optimizer hyperparameters) sits in ``meta.pt``, written by global rank 0. The folder appears complete
or not at all: it is written as ``<path>.partial`` and renamed once every stage has finished.

Turn one into an ordinary Lightning checkpoint, loadable anywhere, with::

    python -m lightning_gpipe.checkpointing.sharded last.ckpt full.ckpt
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.cloud_io import _atomic_save
from torch import Tensor

from lightning_gpipe.checkpointing.state import Layout, merge_optimizer_states

__all__ = ["META", "is_sharded", "save_sharded", "load_sharded", "to_full_checkpoint", "stage_weights"]

META = "meta.pt"
_MODEL, _OPTIMIZER = "state_dict.", "optimizer_states."


def is_sharded(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META).is_file()


def _local_path(path: str | os.PathLike) -> Path:
    if "://" in str(path):
        raise ValueError(f"sharded checkpoints are written to a local or mounted folder; got {str(path)!r}")
    return Path(path)


def save_sharded(
    checkpoint: dict[str, Any],
    path: str | os.PathLike,
    layouts: Sequence[Layout],
    is_zero: bool,
    barrier: Callable[[], None],
    gather: Callable[[Any], list[Any]],
    broadcast: Callable[[Any], Any],
) -> None:
    """Write this stage's part of ``checkpoint`` (its ``state_dict`` and by-name ``optimizer_states``) into ``path``.

    Called on every rank. ``layouts`` number each optimizer's parameters as a single-device run does;
    ``gather`` brings each stage's small metadata to global rank 0, and ``broadcast`` its outcome back.
    """
    path = _local_path(path)
    partial = path.with_name(path.name + ".partial")
    tensors: dict[str, Tensor] = {_MODEL + name: t for name, t in checkpoint["state_dict"].items()}
    layouts_by_name, loose = [], []  # per optimizer: the by-name groups; non-tensor per-parameter values
    for i, state in enumerate(checkpoint.get("optimizer_states", [])):  # none in a weights-only checkpoint
        values: dict[str, dict[str, Any]] = {}
        for name, param_state in state["state"].items():
            for key, value in param_state.items():
                if isinstance(value, Tensor):
                    tensors[f"{_OPTIMIZER}{i}.{name}.{key}"] = value
                else:
                    values.setdefault(name, {})[key] = value
        layouts_by_name.append({"state": {}, "param_groups": state["param_groups"]})
        loose.append(values)
    stages = gather({"layouts": layouts_by_name, "loose": loose, "keys": list(checkpoint["state_dict"])})
    if is_zero:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    barrier()
    dcp.save(tensors, checkpoint_id=partial)
    failure = None
    if is_zero:
        try:
            _finish(checkpoint, partial, path, layouts, stages)
        except Exception as error:  # every rank learns of it, instead of waiting
            failure = f"{type(error).__name__}: {error}"
    failure = broadcast(failure)
    if failure is not None:
        raise RuntimeError(f"writing the sharded checkpoint {str(path)!r} failed on global rank 0: {failure}")


def _finish(checkpoint: dict[str, Any], partial: Path, path: Path, layouts: Sequence[Layout], stages: list[Any]) -> None:
    """Global rank 0 adds everything but the tensors to the folder, then puts it in place."""
    meta = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer_states")}
    meta["state_dict_keys"] = [key for stage in stages for key in stage["keys"]]
    if "optimizer_states" in checkpoint:
        meta["optimizer_states"] = [
            {**merge_optimizer_states([stage["layouts"][i] for stage in stages], layouts[i]),
             "param_names": layouts[i],
             "loose": {name: v for stage in stages for name, v in stage["loose"][i].items()}}
            for i in range(len(layouts))
        ]  # fmt: skip
    torch.save(meta, partial / META)
    _publish(partial, path)


def _publish(partial: Path, path: Path) -> None:
    """Put the finished folder in place of ``path``: the old checkpoint stays whole until the new one is."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.is_dir():
        path.rename(old)
    elif path.exists():
        path.unlink()
    partial.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_sharded(
    path: str | os.PathLike,
    state_dict: dict[str, Tensor],
    optimizer_names: Optional[Sequence[str]] = None,
    weights_only: Optional[bool] = None,
) -> dict[str, Any]:
    """The Lightning checkpoint in ``path`` restricted to one stage.

    ``state_dict`` is the stage's own (its keys and shapes are read); optimizer state is read for the
    parameters in ``optimizer_names`` (all of them when None, as in a single process without a
    process group). ``weights_only`` is passed to ``torch.load`` for ``meta.pt``. Called on every rank.
    """
    path = _local_path(path)
    meta = torch.load(path / META, weights_only=weights_only)
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    wanted: dict[str, Tensor] = {}
    for name, t in state_dict.items():  # a missing one fails in dcp.load, on every rank
        wanted[_MODEL + name] = torch.empty_like(t, device="cpu")
    mine = None if optimizer_names is None else set(optimizer_names)
    for key, info in stored.items():
        if key.startswith(_OPTIMIZER):
            name = key.split(".", 2)[2].rpartition(".")[0]
            if mine is None or name in mine:
                wanted[key] = torch.empty(info.size, dtype=info.properties.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(wanted, checkpoint_id=str(path), no_dist=not torch.distributed.is_initialized())
    checkpoint = {key: value for key, value in meta.items() if key not in ("optimizer_states", "state_dict_keys")}
    checkpoint["state_dict"] = {name: wanted[_MODEL + name] for name in state_dict}
    if "optimizer_states" in meta:
        checkpoint["optimizer_states"] = []
    for i, saved in enumerate(meta.get("optimizer_states", [])):
        names = {n: index for group, layout in zip(saved["param_groups"], saved["param_names"])
                 for n, index in zip(layout, group["params"])}  # fmt: skip
        state: dict[int, dict[str, Any]] = {}
        for name, values in saved["loose"].items():
            if mine is None or name in mine:
                state.setdefault(names[name], {}).update(values)
        prefix = f"{_OPTIMIZER}{i}."
        for key, value in wanted.items():
            if key.startswith(prefix):
                name, _, field = key[len(prefix) :].rpartition(".")
                state.setdefault(names[name], {})[field] = value
        checkpoint["optimizer_states"].append({"state": state, "param_groups": saved["param_groups"]})
    return checkpoint


def stage_weights(path: str | os.PathLike, own: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries named by ``own``'s keys from a weights file you trust: a Lightning checkpoint, a sharded
    checkpoint folder, or a state dict saved with ``torch.save``. Files are memory-mapped, and a folder is read by
    key, so only those tensors are read."""
    if is_sharded(path):
        return load_sharded(path, own, optimizer_names=[], weights_only=False)["state_dict"]
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else saved
    missing = [key for key in own if key not in state]
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise KeyError(f"the weights in {str(path)!r} lack {len(missing)} of this stage's entries: {shown}")
    return {key: state[key] for key in own}


def to_full_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert the sharded checkpoint in ``path`` into one ordinary Lightning checkpoint file ``out``.

    Runs in one process, no pipeline needed; the result loads with ``MyModule.load_from_checkpoint(out)``
    and resumes with any strategy.
    """
    meta = torch.load(_local_path(path) / META)
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    shapes = {name: stored[_MODEL + name] for name in meta["state_dict_keys"]}
    template = {name: torch.empty(info.size, dtype=info.properties.dtype) for name, info in shapes.items()}
    checkpoint = load_sharded(path, template)
    _atomic_save(checkpoint, out)  # Lightning's own: whole or absent
    return Path(out)


def _main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m lightning_gpipe.checkpointing.sharded SHARDED_CHECKPOINT_DIR FULL_CHECKPOINT_FILE")
    print(to_full_checkpoint(argv[0], argv[1]))


if __name__ == "__main__":
    _main(sys.argv[1:])
