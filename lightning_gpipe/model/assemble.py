"""Moving layers' tensors between ranks: the whole model onto global rank 0 when a run ends, and back out before the next.

After a run, global rank 0 holds the whole trained model (unless ``gather_model`` says otherwise), so user code
after ``trainer.fit`` (``model(x)``, ``model.state_dict()``, ``torch.save``) sees what single-device training would
have left; the other ranks keep their own stage, with :class:`~lightning_gpipe.model.partition.AbsentLayer` in place of
the rest. Before the next run (``validate`` after ``fit``, a second ``fit``, a new Trainer on the same model),
every rank takes the tensors of the layers it lacks from global rank 0, so partitioning always starts from the
whole model.

Only tensors travel: every parameter and buffer of a layer (non-persistent buffers too), by name. Each rank
keeps every layer's module object (an absent layer holds it with its storage freed), and the tensors go back
into it: the layers' classes need not pickle, and their identity (a skip connection's namespace, the hooks the
user registered) and attributes stay as the user built them. A parameter two layers share is shared again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gpipe.model.partition import AbsentLayer, live_layers
from lightning_gpipe.model.tied import names_by_parameter
from lightning_gpipe.parallel.collectives import gather_to_first

__all__ = ["gather_layers", "fill_from_first", "layer_tensors", "shared_parameters"]


def gather_layers(
    seq: nn.Sequential, stage: int, k: int, ranks: Optional[Sequence[int]] = None, tied: Sequence[Sequence[str]] = ()
) -> None:
    """Put every stage's layers into ``seq`` on the first stage; ``ranks`` are the stages' global ranks (0..k-1 by
    default). ``tied``: per parameter tied across stages, its names in ``seq``; its copies become one again."""
    parts = gather_to_first([(i, layer_tensors(layer)) for i, layer in live_layers(seq)], stage, k, ranks)
    for part in parts[1:]:
        _insert(seq, part)
    if stage == 0:
        _tie(seq, tied)


def fill_from_first(seq: nn.Sequential, stage: int, k: int, gather: Callable[[Any], list[Any]]) -> None:
    """Give every rank the layers of ``seq`` it lacks, from global rank 0, which must hold them all.

    ``gather`` is an all-gather of a small object over the pipeline's ranks. Raises the same error on every
    rank when rank 0 lacks layers.
    """
    absent = [i for i, layer in enumerate(seq._modules.values()) if isinstance(layer, AbsentLayer)]
    wanted: list[list[int]] = gather(absent)
    if not any(wanted):
        return
    if wanted[0]:
        raise RuntimeError(
            f"GPipeStrategy: the module was left partitioned by an earlier run, and global rank 0 lacks layers"
            f" {wanted[0]} of its Sequential, so it cannot be cut again. A run gathers the whole model on global"
            " rank 0 when it ends, unless it failed, ran with GPipeStrategy(gather_model=False), or built the model"
            " deferred (configure_model, trainer.init_module()) with the default gather_model=None: pass"
            " gather_model=True to use the module in another run, or build it afresh."
        )
    if stage == 0:
        layers = list(seq._modules.values())
        tied = shared_parameters(seq)  # which the receivers' copies must share again
        for rank in range(1, k):
            if wanted[rank]:
                dist.send_object_list([([(i, layer_tensors(layers[i])) for i in wanted[rank]], tied)], dst=rank)
    elif absent:
        box: list[Any] = [None]
        dist.recv_object_list(box, src=0)
        layers, tied = box[0]
        _insert(seq, layers)
        _tie(seq, tied)


def shared_parameters(seq: nn.Sequential) -> list[list[str]]:
    """Per parameter that several layers of ``seq`` use, its names in ``seq``."""
    return [names for names in names_by_parameter(seq).values() if len(names) > 1]


def _tie(seq: nn.Sequential, tied: Sequence[Sequence[str]]) -> None:
    """Make every name of each group in ``tied`` refer to the parameter under its first name."""
    for first, *others in tied:
        p = seq.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(seq.get_submodule(owner), attr, p)


def layer_tensors(layer: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``layer`` by name (each once), detached."""
    named = [*layer.named_parameters(), *layer.named_buffers()]
    return {name: t.detach() for name, t in named}


def _insert(seq: nn.Sequential, layers: list[tuple[int, dict[str, Tensor]]]) -> None:
    """Put each absent layer of ``seq`` back, with the tensors given for it."""
    names = list(seq._modules)
    for index, tensors in layers:
        absent = seq._modules[names[index]]
        if not isinstance(absent, AbsentLayer) or absent.held is None:
            raise RuntimeError(f"GPipeStrategy: layer {index} of the pipelined Sequential is not an absent layer to fill")
        seq._modules[names[index]] = _filled(absent, tensors)


def _filled(absent: AbsentLayer, tensors: dict[str, Tensor]) -> nn.Module:
    """The layer ``absent`` holds, its storage back and its values those of ``tensors``."""
    layer = absent.held
    for t, nbytes in absent.freed:
        t.untyped_storage().resize_(nbytes)
    absent.freed.clear()
    own = dict([*layer.named_parameters(), *layer.named_buffers()])
    if own.keys() != tensors.keys():
        raise RuntimeError(
            f"GPipeStrategy: layer {absent.index} ({absent.kind}) has tensors {sorted(own)} here and"
            f" {sorted(tensors)} on the rank that sent them: the model must be built alike on every rank"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            t = own[name]
            if t.device.type != "meta":
                t.copy_(value)
                continue
            owner, _, attr = name.rpartition(".")  # built on the meta device (deferred): it gets storage now
            module = layer.get_submodule(owner)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value.clone(), requires_grad=t.requires_grad)
            else:
                module._buffers[attr] = value.clone()
    return layer
