"""Shared helpers: small CPU-friendly inputs and weights that are not fresh.

timm zero-initialises the last norm of each residual branch, which makes a broken insertion look
function-preserving; every equivalence test therefore runs on randomised weights and norm statistics.
"""

import pytest
import timm
import torch
from torch import nn

from retrofit.sweep.check import randomize  # the sweep's randomiser: one way to make weights not fresh

pytest_plugins = ["postgres"]  # tests/postgres.py: a real PostgreSQL server for the several-machine tests


class ChannelsLast(nn.Module):
    """A Swin/ConvNeXt-style block: the residual sum happens on an (N, H, W, C) tensor."""

    def __init__(self, c=8):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        y = y + self.fc(y)
        return y.permute(0, 3, 1, 2)


class Residual(nn.Module):
    """The smallest residual unit: x + conv(relu(conv(x))), then relu."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|): the preservation criterion of the core issue. Kept here, apart
    from retrofit.sweep.check's, so the tests' yardstick is not the code under test."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def one_error(result, *words):
    """A CLI run that failed on bad input: exit 2, one `error:` line holding ``words``, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in result.output


@pytest.fixture(scope="session")
def resnet50_random():
    """A resnet50 with random (not fresh) weights, eval mode. Tests must not modify it."""
    return randomize(timm.create_model("resnet50"))


@pytest.fixture(scope="session")
def inception_v3_random():
    return randomize(timm.create_model("inception_v3"))
