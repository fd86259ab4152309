"""Shared helpers: small CPU-friendly inputs and weights that are not fresh.

timm zero-initialises the last norm of each residual branch, which makes a broken insertion look
function-preserving; every equivalence test therefore runs on randomised weights and norm statistics.
"""
import pytest
import timm
import torch
from torch import nn


class ChannelsLast(nn.Module):
    """A Swin/ConvNeXt-style block: the residual sum happens on an (N, H, W, C) tensor."""

    def __init__(self, c=8):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        y = y + self.fc(y)
        return y.permute(0, 3, 1, 2)



def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, biases and norm statistics (in place); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            scale = (1.0 / fan_in) ** 0.5 if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|): the preservation criterion of the core issue."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


@pytest.fixture(scope="session")
def resnet50_random():
    """A resnet50 with random (not fresh) weights, eval mode. Tests must not modify it."""
    return randomize(timm.create_model("resnet50"))


@pytest.fixture(scope="session")
def inception_v3_random():
    return randomize(timm.create_model("inception_v3"))
