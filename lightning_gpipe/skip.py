"""Skip connections across stages, torchgpipe's programming model: the public names of
:mod:`lightning_gpipe.engine.skip`."""

from lightning_gpipe.engine.skip import Namespace, pop, skippable, stash, verify_skippables

__all__ = ["skippable", "stash", "pop", "Namespace", "verify_skippables"]
