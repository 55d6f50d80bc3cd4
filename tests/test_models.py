"""The recipes' default models: M5 and SmallCNN with single, regression, multi-task and
sequence heads, and model specs (including a user's own factory)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flows.errors import FlowsError
from flows.training.models import M5, SmallCNN
from recipes.common import build_model


def test_m5_is_the_tutorial_network() -> None:
    model = M5(10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (1, 128, 80, 4), (128, 128, 3, 1), (128, 256, 3, 1), (256, 512, 3, 1)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.MaxPool1d) for m in model.modules()) == 4
    out = model(torch.randn(3, 1, 32_000))
    assert out.shape == (3, 10)
    assert model(torch.randn(3, 32_000)).shape == (3, 10)  # (B, T) works too


@pytest.mark.parametrize("make", [lambda **k: M5(width=8, **k), lambda **k: SmallCNN(width=8, **k)])
def test_audio_heads(make) -> None:
    x = torch.randn(2, 1, 8000)
    assert make(outputs=4)(x).shape == (2, 4)
    assert make(outputs=1)(x).shape == (2, 1)  # regression
    multi = make(outputs={"tier": 4, "score": 1})(x)
    assert {k: v.shape for k, v in multi.items()} == {"tier": (2, 4), "score": (2, 1)}
    assert make(outputs=2, sequence=8)(x).shape == (2, 8, 2)  # YESNO: 8 words, yes/no


def test_small_cnn_on_images_and_stereo() -> None:
    images = SmallCNN(5, dims=2)
    assert images(torch.randn(4, 62, 47)).shape == (4, 5)  # (B, H, W): LFW-sized tensors
    assert images(torch.randn(4, 1, 62, 47, dtype=torch.float64)).shape == (4, 5)
    stereo = SmallCNN(3, in_channels=2)
    assert stereo(torch.randn(2, 2, 4000)).shape == (2, 3)


def test_gradients_reach_every_parameter() -> None:
    model = SmallCNN({"a": 3, "b": 1}, sequence=None)
    out = model(torch.randn(4, 1, 4000))
    (out["a"].sum() + out["b"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def tiny_factory(outputs: int) -> nn.Module:
    """A user's own model, named on the command line as ``tests.test_models:tiny_factory``."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(outputs))


def test_build_model_by_name_or_factory() -> None:
    assert isinstance(build_model("m5", 10), M5)
    assert isinstance(build_model("smallcnn", 3, dims=2), SmallCNN)
    mine = build_model("tests.test_models:tiny_factory", 7)
    assert mine(torch.randn(2, 1, 100)).shape == (2, 7)
    with pytest.raises(FlowsError, match="smallcnn"):
        build_model("resnet", 2)


def test_any_module_can_replace_a_recipes_model() -> None:
    from recipes.yesno import YesNo

    mine = nn.Linear(3, 3)
    assert YesNo(YesNo.Config(), model=mine).model() is mine
    assert isinstance(YesNo(YesNo.Config(model="m5")).model(), M5)
