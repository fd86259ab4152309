"""Shared helpers: small CPU-friendly inputs and weights that are not fresh.

timm zero-initialises the last norm of each residual branch, which makes a broken insertion look
function-preserving; every equivalence test therefore runs on randomised weights and norm statistics.
"""

import os

import pytest
import timm
import torch
from torch import nn

from retrofit.sweep.check import randomize  # the sweep's randomiser: one way to make weights not fresh

pytest_plugins = ["postgres"]  # tests/postgres.py: a real PostgreSQL server for the several-machine tests

# pytest-xdist's workers (`-n auto` in pyproject.toml's addopts): at most this many, whatever the cores; each holds
# a few models and the study tests start more processes of their own
MAX_WORKERS = 4


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # xdist's hook: pytest -p no:xdist still loads this file
def pytest_xdist_auto_num_workers(config):
    return max(1, min(cores(), MAX_WORKERS))


def pytest_configure(config):
    """Each of N workers gets 1/N of the cores for torch's threads. On the 2-core VM (2026-12-06, nothing else
    running) the suite took 13 min 30 s in one process and 8 min 29 s in two workers of one thread; two workers
    of two threads were 60% through it at 9 minutes (stopped there).
    xdist's workers also export COLUMNS=80 and LINES=24, as may a developer's shell; the CLI wraps to an
    exported COLUMNS, as on a terminal, so the tests (and the processes they start) drop both: their output is
    what a redirected run prints."""
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, cores() // workers))


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
