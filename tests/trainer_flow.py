"""The tiny flow the trainer runs of tests/test_trainers.py train on."""

import torch

from flows import Flow


def train_flow() -> Flow:
    """24 samples of 4 features, reshuffled every epoch, in batches of 4: 6 batches an epoch."""
    g = torch.Generator().manual_seed(0)
    items = [{"x": torch.randn(4, generator=g), "y": float(i % 3), "key": f"s{i}"} for i in range(24)]
    return Flow.items(items).shuffle(seed=3).batch(4)
