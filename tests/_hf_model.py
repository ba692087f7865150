"""transformers' GPT-2, its blocks in a Sequential, built in ``configure_model`` as a user of the strategy would.

A module of its own: importing transformers takes seconds, which only the scenarios that use it should pay.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2Model

transformers.logging.set_verbosity_error()  # the tiny config's token ids lie outside its vocabulary: said once

WIDTH, VOCAB, CLASSES = 16, 64, 3


class _Embed(nn.Module):
    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding) -> None:
        super().__init__()
        self.wte, self.wpe = wte, wpe

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))


class _Block(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple, 5 the hidden state


class _MeanHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, classes)
        return self.lin(x.mean(1))


class GPT2Blocks(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = None

    def configure_model(self) -> None:
        if self.body is not None:
            return
        config = GPT2Config(n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
                            eos_token_id=0)  # fmt: skip
        gpt = GPT2Model(config)
        self.body = nn.Sequential(_Embed(gpt.wte, gpt.wpe), *[_Block(b) for b in gpt.h], gpt.ln_f, _MeanHead())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(tokens)

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        return F.cross_entropy(self(tokens), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def token_loaders(n: int = 24, length: int = 8) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1234)
    data = TensorDataset(torch.randint(0, VOCAB, (n, length), generator=g), torch.randint(0, CLASSES, (n,), generator=g))
    return DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)
