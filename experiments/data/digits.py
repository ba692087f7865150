"""scikit-learn's bundled 8x8 handwritten digits (shipped inside the package: nothing is downloaded)."""

from __future__ import annotations

import torch

from experiments.data.base import SplitDataModule


TARGETS = ("label", "strokes")


class DigitsDataModule(SplitDataModule):
    """Digits with their labels, or (``target="strokes"``) a per-pixel task: each pixel's class is whether the
    clean digit has a stroke there (intensity above a quarter), and the input gets Gaussian noise of std ``noise``."""

    def __init__(
        self, flatten: bool = True, features: int = 64, classes: int = 10, target: str = "label", noise: float = 0.0,
        **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(**kwargs)
        if (features, classes) != (64, 10):
            raise ValueError(f"digits are 8x8 images (64 features) of 10 classes, not {features} of {classes}")
        if target not in TARGETS:
            raise ValueError(f"DigitsDataModule(target={target!r}): choose one of {', '.join(TARGETS)}")
        if target == "strokes" and flatten:
            raise ValueError("DigitsDataModule(target='strokes') labels pixels of images: set flatten=false")
        self.flatten, self.target, self.noise = flatten, target, noise
        self.kind = "vector" if flatten else "image"
        self.target_kind = "pixels" if target == "strokes" else "label"

    def make(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        x, y = x[order], y[order]
        if self.target == "strokes":
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(self.seed + 1))
            return (x + self.noise * noise).unsqueeze(1), (x > 0.25).long()  # (N, 1, 8, 8), (N, 8, 8)
        return (x.flatten(1) if self.flatten else x.unsqueeze(1)), y  # (N, 64) or (N, 1, 8, 8)
