"""The small convolutional net of manifests/tinycnn.toml: NCHW images [batch, 3, 32, 32] -> 10 class
logits. Two conv / batch-norm / ReLU blocks, max and global average pooling, one linear layer.
Weights and batch-norm statistics are seeded (not trained): what kiln checks is that every format
computes the same function, which random-but-fixed weights exercise as well as trained ones."""

from __future__ import annotations

import numpy as np


def build():
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self, classes: int = 10):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            )
            self.classifier = nn.Linear(32, classes)

        def forward(self, image):
            return self.classifier(torch.flatten(self.features(image), 1))

    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial batch-norm statistics, so folding them is really tested
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
                layer.weight.uniform_(0.8, 1.2)
                layer.bias.uniform_(-0.1, 0.1)
    return model.eval()


def validation_images(count: int = 16, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth seeded images (low-resolution noise upsampled, plus a per-image gradient), normalized
    like camera images: more like real inputs than white noise, and reproducible."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, (count, 3, size // 8, size // 8))
    images = np.kron(coarse, np.ones((1, 1, 8, 8)))
    ramp = np.linspace(0.0, 1.0, size)
    images += rng.uniform(-0.3, 0.3, (count, 1, 1, 1)) * ramp[None, None, :, None]
    return ((images - 0.5) / 0.25).astype(np.float32)
