"""A byte-level corpus from the Python standard library's own source files, on every machine with Python."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from experiments.data.base import SplitDataModule


def stdlib_corpus(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the standard library's top-level ``.py`` files, in name order."""
    root = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


class TextDataModule(SplitDataModule):
    """Next-byte prediction over windows of ``context`` bytes; vocabulary: the 256 byte values."""

    kind = "tokens"
    vocab_size = 256

    def __init__(self, context: int = 64, max_bytes: int = 400_000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.context, self.max_bytes = context, max_bytes

    def make(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.frombuffer(bytearray(stdlib_corpus(self.max_bytes)), dtype=torch.uint8).long()
        n = (len(data) - 1) // self.context
        x = data[: n * self.context].view(n, self.context)  # (N, T)
        y = data[1 : n * self.context + 1].view(n, self.context)  # (N, T), shifted by one byte
        return x, y
