"""A GPT-style decoder-only language model written as one nn.Sequential."""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from experiments.models.base import Classifier, init_linear


class Embedding(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, vocab_size: int, context: int, width: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        positions = torch.arange(t, device=idx.device)
        return self.dropout(self.tokens(idx) + self.positions(positions))  # (B, T, C)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.mlp(self.ln2(x)))


class Transformer(Classifier):
    input_kind = "tokens"
    perplexity = True

    def __init__(
        self, vocab_size: int = 256, context: int = 64, width: int = 128, depth: int = 4, heads: int = 4,
        dropout: float = 0.0, tie_embeddings: bool = True,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
    ) -> None:  # fmt: skip
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = nn.Sequential(
            Embedding(vocab_size, context, width, dropout),
            *[Block(width, heads, dropout) for _ in range(depth)],
            nn.LayerNorm(width),
            nn.Linear(width, vocab_size, bias=False),
        )
        if tie_embeddings:  # as GPT-2: the head scores tokens with their input embeddings (first and last stage)
            self.net[-1].weight = self.net[0].tokens.weight
        self.net.apply(init_linear)
        for block in self.net[1 : 1 + depth]:
            block.attn.proj.apply(partial(init_linear, depth=depth))
            block.mlp[2].apply(partial(init_linear, depth=depth))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)  # (B, T, vocab)
