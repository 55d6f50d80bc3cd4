"""Default models for the recipes: M5 and a small CNN, with configurable output heads.

``outputs`` says what a model predicts, the same way for every model here:

- an int ``n``: one head with ``n`` outputs, returned as a tensor — ``n`` classes, or 1 for a
  regression target;
- a mapping ``{name: n}``: one head per name, returned as a dict (multi-task);
- with ``sequence=S`` the features are pooled into ``S`` positions instead of one, so each head
  gives ``(B, S, n)`` — e.g. YESNO's 8 words with 2 classes each: ``(B, 8, 2)``.

Audio models take ``(B, T)`` or ``(B, channels, T)`` waveforms. Any ``nn.Module`` can be used
by a recipe instead of these.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

Outputs = int | Mapping[str, int]


class Heads(nn.Module):
    """Linear heads on features ``(..., C)``: a tensor for an int spec, a dict for a mapping."""

    def __init__(self, features: int, outputs: Outputs, dropout: float = 0.0):
        super().__init__()
        self.single = isinstance(outputs, int)
        spec = {"out": outputs} if isinstance(outputs, int) else dict(outputs)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(features, n) for name, n in spec.items()})

    def forward(self, features: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        features = self.dropout(features)
        out = {name: head(features) for name, head in self.heads.items()}
        return out["out"] if self.single else out


def pool(features: torch.Tensor, sequence: int | None) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, C)`` by global average, or ``(B, S, C)`` averaging 1-D
    features over ``sequence`` equal spans."""
    if sequence is None:
        return features.flatten(2).mean(-1)
    if features.dim() != 3:
        raise ValueError("sequence outputs need 1-D (time) features")
    return nn.functional.adaptive_avg_pool1d(features, sequence).transpose(1, 2)


def _channels_first(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Add the channel axis to an input without one: (B, T) -> (B, 1, T), (B, H, W) -> (B, 1, H, W)."""
    x = x.float()
    return x.unsqueeze(1) if x.dim() == dims + 1 else x


class M5(nn.Module):
    """M5 (Dai et al., "Very deep convolutional neural networks for raw waveforms", arXiv
    1610.00087), as in the UrbanSound8K tutorial: Conv1d(80, stride 4) then three kernel-3
    convolutions, each with batch norm, ReLU and max-pool 4; global average; linear heads.

    ``width`` is the first layer's channels (128 in the paper: 128, 128, 256, 512). Inputs need
    at least ~8000 frames (32000 in the tutorial: 4 s at 8 kHz)."""

    def __init__(self, outputs: Outputs = 10, in_channels: int = 1, width: int = 128,
                 stride: int = 4, sequence: int | None = None, dropout: float = 0.0):
        super().__init__()
        sizes = [in_channels, width, width, 2 * width, 4 * width]
        kernels, strides = [80, 3, 3, 3], [stride, 1, 1, 1]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv1d(sizes[i], sizes[i + 1], kernels[i], strides[i]),
                       nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(), nn.MaxPool1d(4)]
        self.features = nn.Sequential(*layers)
        self.sequence = sequence
        self.heads = Heads(sizes[-1], outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.heads(pool(self.features(_channels_first(x, 1)), self.sequence))


class LogSpectrogram(nn.Module):
    """Log power spectrogram: ``(B, C, T)`` -> ``(B, C * (n_fft // 2 + 1), frames)``."""

    def __init__(self, n_fft: int = 256, hop: int | None = None):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop or n_fft // 2
        self.window: torch.Tensor
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames = x.shape
        spec = torch.stft(x.reshape(batch * channels, frames), self.n_fft, self.hop,
                          window=self.window, return_complex=True)
        power = torch.log(spec.abs().pow(2) + 1e-6)
        return power.reshape(batch, channels * power.shape[1], power.shape[2])


class SmallCNN(nn.Module):
    """A small CNN for classification, regression or multi-task heads.

    ``dims=1`` (audio): waveform -> log spectrogram (``n_fft``) -> per-frequency batch norm ->
    ``depth`` Conv1d blocks over time. ``dims=2`` (images, feature maps): ``depth`` Conv2d blocks.
    Each block is conv 3 + batch norm + ReLU, max-pooled by 2 between blocks; channels start at
    ``width`` and double per block."""

    def __init__(self, outputs: Outputs = 2, dims: int = 1, in_channels: int = 1,
                 width: int = 32, depth: int = 2, n_fft: int = 256, sequence: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 (audio) or 2 (images), got {dims}")
        self.dims, self.sequence = dims, sequence
        conv, norm, maxpool = ((nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d) if dims == 1
                               else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d))
        if dims == 1:
            self.frontend: nn.Module = LogSpectrogram(n_fft)
            channels = in_channels * (n_fft // 2 + 1)
        else:
            self.frontend = nn.Identity()
            channels = in_channels
        layers: list[nn.Module] = [norm(channels)]
        for i in range(depth):
            out = width * 2**i
            layers += [conv(channels, out, 3, padding=1), norm(out), nn.ReLU()]
            if i < depth - 1:
                layers.append(maxpool(2, ceil_mode=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.heads = Heads(channels, outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        features = self.features(self.frontend(_channels_first(x, self.dims)))
        return self.heads(pool(features, self.sequence))
