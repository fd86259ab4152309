"""Helpers the tests of several layers share: a tiny ImageFolder and the models trained on it, small
networks of one's own, the one-error-line check of the CLI, and the runner of the pages' python blocks.
Fixtures live in conftest.py."""

import os
import re
import socket
import subprocess

import numpy as np
import timm
import torch
from conftest import randomize
from PIL import Image
from torch import nn

import retrofit

CLASSES, SIZE = 3, 32  # the fine-tune tests' data: 3 classes of SIZE x SIZE images


def make_folder(root, train=8, val=4, seed=0):
    """Class c: noise plus a bright channel c, so a small net can learn it."""
    g = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(CLASSES):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (g.random((SIZE, SIZE, 3)) * 80).astype(np.uint8)
                a[..., c] += 140
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def plain_model(seed=0):
    return randomize(timm.create_model("test_resnet", num_classes=CLASSES), seed=seed)


def se_model(plain=None, **recipe):
    torch.manual_seed(0)  # fc2's random init draws from the global RNG: the same model in any test order
    return retrofit.add_se(
        plain if plain is not None else plain_model(), input_size=(3, SIZE, SIZE), **{"r": 4, **recipe}
    )


FAST = dict(batch_size=8, lr=1e-2, workers=0)


def reference_top1(model, root):
    """Top-1 on val/ computed here, from PIL and timm's eval transform, not by the code under test."""
    cfg = timm.data.resolve_data_config({"input_size": (3, SIZE, SIZE)}, model=model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    classes = sorted(p.name for p in (root / "val").iterdir())
    hits = total = 0
    with torch.no_grad():
        for c, name in enumerate(classes):
            for f in sorted((root / "val" / name).iterdir()):
                x = tf(Image.open(f).convert("RGB"))[None]
                hits += int(model.eval()(x).argmax(1).item() == c)
                total += 1
    return 100 * hits / total


def one_error_line(result):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.conv(x))
        return self.head(x.mean((2, 3)))


class Unit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def custom_net():
    torch.manual_seed(0)
    return randomize(nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), Unit(16), Unit(16), nn.Conv2d(16, 32, 3, 2, 1), Unit(32)))


def five_class_model():
    """5 outputs for 3 classes of data: every arm gets a new head, which must be the same in all."""
    return randomize(timm.create_model("test_resnet", num_classes=5), seed=0)


class DropBranch(nn.Module):
    """A residual unit with stochastic depth written inline (as efficientvit_msra's ResidualDrop):
    its forward computes different things in train and eval mode."""

    def __init__(self, c=8, drop=0.5):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.drop = drop

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.training and self.drop > 0:
            mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - self.drop).div(1 - self.drop)
            return x + y * mask
        return x + y


def moved_off_identity(se, plain, generator):
    """``se``'s new parameters (those ``plain`` has not) moved by noise, as a fine-tune moves them: a
    check against the model's own outputs then sees a block that was dropped or did not load."""
    keys = set(plain.state_dict())
    with torch.no_grad():
        for name, p in se.named_parameters():
            if name not in keys:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return se


def safetensors_bytes(meta: dict, tensors: dict | None = None, data: bytes = b"") -> bytes:
    """A safetensors file written by hand (its 8-byte length, JSON header, data): any header, however
    hostile, without the library refusing to write it."""
    import json
    import struct

    header = json.dumps({**(tensors or {}), "__metadata__": meta}).encode()
    return struct.pack("<Q", len(header)) + header + data


def special_files(root, suffix):
    """What a path may be besides a regular file: links to /dev/zero and /dev/urandom (never end), a FIFO
    (waits for a writer forever), a directory, a symlink loop; name -> (path, what the message says)."""
    import os

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("zero", "urandom"):
        (root / f"{name}{suffix}").symlink_to(f"/dev/{name}")
        out[name] = (root / f"{name}{suffix}", "is not a regular file (a character device)")
    os.mkfifo(root / f"fifo{suffix}")
    (root / f"dir{suffix}").mkdir()
    (root / f"loop{suffix}").symlink_to(f"loop{suffix}")
    out.update(
        fifo=(root / f"fifo{suffix}", "is not a regular file (a FIFO)"),
        dir=(root / f"dir{suffix}", "is a directory"),
        loop=(root / f"loop{suffix}", "is a symlink loop"),
    )
    return out


def billion_laughs(key: str, levels: int = 9) -> str:
    """A YAML recipe of ~300 bytes whose ``key`` expands to 10^levels strings through nested aliases."""
    text = f'{key}: [&a0 ["l","l","l","l","l","l","l","l","l","l"]'
    for i in range(1, levels):
        text += f", &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]"
    return text + "]\n"


def rewrite_header(src, dst, edit):
    """Copy a safetensors file with its JSON header edited by ``edit(header)``: the data stay as they are."""
    import json
    import struct

    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return dst


def start_ranks(cmd, n=2, env=None, **kwargs):
    """The ``n`` processes that ``torchrun --nproc_per_node n`` starts for ``cmd``, started as torchrun does
    (its environment contract: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    without its agent, so that a test can kill one rank and read each rank's own output and exit code."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        **(env or {}),
        "WORLD_SIZE": str(n),
        "LOCAL_WORLD_SIZE": str(n),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    return [
        subprocess.Popen(
            cmd,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )
        for r in range(n)
    ]


def python_blocks(page):
    """The ```python blocks of a Markdown page (the README, a page of docs/), in order."""
    return re.findall(r"```python\n(.*?)\n```", page.read_text(), flags=re.S)


def run_python_blocks(page, namespace, root):
    """Run a page's python blocks as written, in order, in one ``namespace``, each compiled under the page's
    path (relative to ``root``) and its number, so a failure names the block. Returns how many ran."""
    blocks = python_blocks(page)
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.relative_to(root)} block {i + 1}", "exec"), namespace)
    return len(blocks)
