"""scikit-learn's bundled 8x8 handwritten digits (shipped inside the package: nothing is downloaded)."""

from __future__ import annotations

import torch

from experiments.data.base import SplitDataModule


class DigitsDataModule(SplitDataModule):
    def __init__(self, flatten: bool = True, features: int = 64, classes: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        if (features, classes) != (64, 10):
            raise ValueError(f"digits are 8x8 images (64 features) of 10 classes, not {features} of {classes}")
        self.flatten = flatten
        self.kind = "vector" if flatten else "image"

    def make(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        x, y = x[order], y[order]
        return (x.flatten(1) if self.flatten else x.unsqueeze(1)), y  # (N, 64) or (N, 1, 8, 8)
