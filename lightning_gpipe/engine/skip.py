"""Skip connections across stages: a layer stashes a tensor, a later layer pops it.

The programming model is torchgpipe's, so a model written for it ports by changing one import::

    from lightning_gpipe.engine.skip import pop, skippable, stash

    @skippable(stash=["down1"])
    class Down(nn.Module):
        def forward(self, x):
            x = self.conv(x)
            yield stash("down1", x)  # kept for Up, possibly on a later stage
            return self.pool(x)

    @skippable(pop=["down1"])
    class Up(nn.Module):
        def forward(self, x):
            skip = yield pop("down1")
            return self.conv(torch.cat([self.up(x), skip], dim=1))

A skippable module's ``forward`` is a generator that yields :class:`stash` and :class:`pop` requests and returns
its output. Called anywhere outside the pipeline (a plain ``nn.Sequential`` on one device, a test, a debugger) the
stash waits in a per-thread dictionary until its pop takes it. Inside the pipeline the stage's executor installs
its own tracker: a tensor popped on another stage than the one that stashed it travels point to point between the
two stages, its gradient back the same way, and never through the stages in between.

Names are global unless a module is isolated: ``Down().isolate(ns)`` with ``ns = Namespace()`` gives its names a
namespace of their own, so one skippable class can be used several times in one model.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from torch import Tensor, nn

from lightning_gpipe.errors import SkipError
from lightning_gpipe.schedule.split import stage_owners

__all__ = [
    "Namespace",
    "SkipError",
    "SkipRoute",
    "SkipTracker",
    "StageTracker",
    "Port",
    "stage_ports",
    "pop",
    "skip_routes",
    "skippable",
    "stash",
    "use_tracker",
    "verify_skippables",
]

M = TypeVar("M", bound=type)


class Namespace:
    """A scope for skip names, so several instances of one skippable class keep their skips apart. ``label``
    only names it in messages."""

    _count = 0

    def __init__(self, label: Optional[str] = None) -> None:
        Namespace._count += 1
        self.label = label if label is not None else f"Namespace({Namespace._count})"

    def __repr__(self) -> str:
        return self.label


#: The namespace of every name that no :meth:`isolate` call moved elsewhere.
DEFAULT = Namespace("the default namespace")

Key = tuple[Namespace, str]


class stash:  # lower case, as torchgpipe's, so models port unchanged
    """``yield stash(name, tensor)`` inside a skippable ``forward``: keep ``tensor`` for the layer that pops ``name``."""

    __slots__ = ("name", "tensor")

    def __init__(self, name: str, tensor: Tensor) -> None:
        self.name, self.tensor = name, tensor


class pop:
    """``tensor = yield pop(name)`` inside a skippable ``forward``: take the tensor stashed as ``name``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class SkipTracker:
    """Where stashed tensors wait for their pops. This one is a dictionary, as on one device; a pop removes the
    tensor unless ``keep`` (profiling runs a layer several times on one stash)."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.tensors: dict[Key, Tensor] = {}

    def save(self, module: nn.Module, key: Key, tensor: Tensor) -> None:
        self.tensors[key] = tensor

    def load(self, module: nn.Module, key: Key) -> Tensor:
        if key not in self.tensors:
            raise SkipError(
                f"{type(module).__name__} pops {_show(key)}, but no layer has stashed it yet: the layer that stashes"
                " it must run earlier in the same forward"
            )
        return self.tensors[key] if self.keep else self.tensors.pop(key)


_local = threading.local()


def _current() -> SkipTracker:
    stack = getattr(_local, "stack", None)
    if not stack:
        stack = _local.stack = [SkipTracker()]
    return stack[-1]


@contextmanager
def use_tracker(tracker: SkipTracker) -> Iterator[SkipTracker]:
    """Inside the block, stashes and pops on this thread go to ``tracker``."""
    _current()
    _local.stack.append(tracker)
    try:
        yield tracker
    finally:
        _local.stack.pop()


def skippable(stash: Iterable[str] = (), pop: Iterable[str] = ()) -> Callable[[M], M]:
    """Class decorator: the module's ``forward`` yields ``stash(name, ...)`` for the names in ``stash`` and
    ``pop(name)`` for those in ``pop``, and returns its output.

    The class itself is kept (its ``state_dict`` keys do not change) and gains an `isolate` method.
    """
    stashes, pops = tuple(stash), tuple(pop)

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"@skippable decorates an nn.Module class, got {cls!r}")
        both = sorted(set(stashes) & set(pops))
        if both:
            raise SkipError(f"@skippable on {cls.__name__}: {both} are both stashed and popped by the same module")
        generator = cls.forward
        if not inspect.isgeneratorfunction(generator):
            raise TypeError(
                f"@skippable on {cls.__name__}: forward must be a generator that yields stash(...) and pop(...)"
                " and returns the output"
            )

        @functools.wraps(generator)
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return _drive(self, generator(self, *args, **kwargs))

        cls.forward = forward
        cls.stashes, cls.pops = stashes, pops
        cls.isolate = _isolate
        cls.skip_key = _skip_key
        return cls

    return decorate


def _isolate(self: nn.Module, ns: Namespace, *, only: Optional[Iterable[str]] = None) -> nn.Module:
    """Put this module's skip names (or those in ``only``) in namespace ``ns``; returns the module."""
    declared = set(self.stashes) | set(self.pops)
    names = declared if only is None else set(only)
    unknown = sorted(names - declared)
    if unknown:
        raise SkipError(
            f"{type(self).__name__}.isolate(only={sorted(names)}): {unknown} are neither stashed nor popped"
        )
    spaces = dict(getattr(self, "_skip_namespaces", {}))
    spaces.update((name, ns) for name in names)
    self._skip_namespaces = spaces
    return self


def _skip_key(self: nn.Module, name: str) -> Key:
    return getattr(self, "_skip_namespaces", {}).get(name, DEFAULT), name


def _drive(module: Any, generator: Any) -> Any:
    """Run a skippable forward, answering its requests from the current tracker."""
    tracker = _current()
    answer = None
    while True:
        try:
            request = generator.send(answer)
        except StopIteration as done:
            return done.value
        answer = None
        if isinstance(request, stash):
            _check_declared(module, request.name, module.stashes, "stashes")
            if not isinstance(request.tensor, Tensor):
                kind = type(request.tensor).__name__
                raise TypeError(f"{type(module).__name__} stashes {request.name!r} as a {kind}; stash a tensor")
            tracker.save(module, module.skip_key(request.name), request.tensor)
        elif isinstance(request, pop):
            _check_declared(module, request.name, module.pops, "pops")
            answer = tracker.load(module, module.skip_key(request.name))
        else:
            raise TypeError(
                f"{type(module).__name__}.forward yielded {request!r}; yield stash(name, tensor) or pop(name)"
            )


def _check_declared(module: Any, name: str, declared: tuple[str, ...], verb: str) -> None:
    if name not in declared:
        raise SkipError(
            f"{type(module).__name__} {verb} {name!r}, which its @skippable does not declare ({verb}: {list(declared)})"
        )


def is_skippable(module: nn.Module) -> bool:
    return hasattr(type(module), "stashes") and hasattr(type(module), "skip_key")


@dataclass(frozen=True)
class SkipRoute:
    """One skip: the layer (index in the Sequential) that stashes ``key`` and the layer that pops it."""

    key: Key
    stash_layer: int
    pop_layer: int
    stashed_by: str  # the stashing module's path in the Sequential, for messages
    popped_by: str

    @property
    def name(self) -> str:
        return _show(self.key)


def skip_routes(seq: nn.Sequential) -> list[SkipRoute]:
    """Every skip of ``seq``, in the order of its stashes; raises :class:`SkipError` on a pop without a stash, a
    name stashed or popped twice, or a stash never popped.

    A layer's skippable submodules count as that layer's: its stashes come before its pops.
    """
    stashed: dict[Key, tuple[int, str]] = {}
    popped: dict[Key, tuple[int, str]] = {}
    for index, layer in enumerate(seq):
        modules = [(path, m) for path, m in layer.named_modules(prefix=str(index)) if is_skippable(m)]
        for path, m in modules:
            for name in m.stashes:
                key = m.skip_key(name)
                if key in stashed:
                    raise SkipError(
                        f"{_show(key)} is stashed twice, by layer {stashed[key][1]} and by layer {path}"
                        f" ({type(m).__name__}); give one of them a namespace of its own with .isolate(Namespace())"
                    )
                stashed[key] = (index, f"{path} ({type(m).__name__})")
        for path, m in modules:
            for name in m.pops:
                key = m.skip_key(name)
                if key not in stashed:
                    raise SkipError(
                        f"layer {path} ({type(m).__name__}) pops {_show(key)}, but no layer before it stashes it"
                    )
                if key in popped:
                    raise SkipError(
                        f"{_show(key)} is popped twice, by layer {popped[key][1]} and by layer {path}"
                        f" ({type(m).__name__}); a stash is popped once"
                    )
                popped[key] = (index, f"{path} ({type(m).__name__})")
    never = [f"{_show(key)} (layer {path})" for key, (_, path) in stashed.items() if key not in popped]
    if never:
        raise SkipError(f"stashed but never popped: {', '.join(never)}; every stash needs one pop in a later layer")
    return [SkipRoute(key, s, popped[key][0], path, popped[key][1]) for key, (s, path) in stashed.items()]


@dataclass(frozen=True)
class Port:
    """One end, on this stage, of a skip that crosses stages."""

    route: int  # the skip's index in :func:`skip_routes`: it tells the skip's messages apart
    key: Key
    stage: int  # the stage at the other end


def stage_ports(routes: list[SkipRoute], balance: list[int], stage: int) -> tuple[list[Port], list[Port]]:
    """The skips ``stage`` sends (stashed here, popped on a later stage) and those it receives, in route order.
    A skip stashed and popped on one stage is neither: it costs no communication."""
    owner = stage_owners(balance)
    sends, receives = [], []
    for j, route in enumerate(routes):
        source, target = owner[route.stash_layer], owner[route.pop_layer]
        if source == stage and target != stage:
            sends.append(Port(j, route.key, target))
        elif target == stage and source != stage:
            receives.append(Port(j, route.key, source))
    return sends, receives


class StageTracker(SkipTracker):
    """One micro-batch's skips on one stage: stashes that other stages pop are collected in ``sent``; pops of
    tensors that other stages stashed are answered from ``received``; the rest stays local, as on one device."""

    def __init__(self, received: dict[Key, Tensor], outgoing: Iterable[Key]) -> None:
        super().__init__()
        self.received, self.outgoing = received, set(outgoing)
        self.sent: dict[Key, Tensor] = {}

    def save(self, module: nn.Module, key: Key, tensor: Tensor) -> None:
        if key in self.outgoing:
            self.sent[key] = tensor
        else:
            super().save(module, key, tensor)

    def load(self, module: nn.Module, key: Key) -> Tensor:
        if key in self.received:
            t = self.received[key]
            return t.clone() if t.requires_grad else t  # a layer working in place must not alter the kept leaf
        return super().load(module, key)

    def outgoing_tensors(self, ports: list[Port]) -> list[Tensor]:
        """The tensors to send, in ``ports``' order; raises if a declared stash did not happen."""
        missing = [_show(p.key) for p in ports if p.key not in self.sent]
        if missing:
            raise SkipError(f"{', '.join(missing)} declared by @skippable but not stashed in this forward")
        return [self.sent[p.key] for p in ports]


def verify_skippables(module: nn.Sequential) -> None:
    """Raise :class:`SkipError` if the skips of ``module`` do not match up (as :func:`skip_routes` checks)."""
    skip_routes(module)


def _show(key: Key) -> str:
    ns, name = key
    return repr(name) if ns is DEFAULT else f"{name!r} in {ns!r}"
