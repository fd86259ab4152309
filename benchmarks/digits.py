"""Real data, on CPU, in a few minutes: retrofit a trained plain CNN and fine-tune the SE blocks.

Data: scikit-learn's handwritten digits (1,797 8x8 greyscale images of 10 classes, shipped inside
the package), split 75/25 (stratified, fixed seed) and written as an ImageFolder of upscaled PNGs.
A plain timm CNN is trained on it first and plays the user's "pretrained" model; then:

1. top-1 of that original model;
2. top-1 of the retrofitted model at step 0, with ``init: preserve`` and with ``init: paper``;
3. top-1 after a short phase-1 fine-tune (SE blocks only, backbone frozen), for both inits.

Targets (issue 3): preserve equals the original exactly at step 0 (checked on the logits, bitwise),
and the fine-tuned SE model is at least as accurate as the original.

Run: ``python benchmarks/digits.py`` (needs ``pip install -c constraints.txt '.[bench]'``).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def write_digits(root: Path, size: int, seed: int) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train, val = train_test_split(idx, test_size=0.25, random_state=seed, stratify=digits.target)
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")


def pretrain(model: torch.nn.Module, data, epochs: int, batch: int, lr: float, seed: int) -> None:
    """The user's own training, before retrofit: a plain loop over the same timm data stack."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    loader = data.train_loader(batch, batch_size=batch, seed=seed, workers=0)  # one process: micro-batch = batch
    opt = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=0.05)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs)
    model.train()
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        for batch_ in loader:
            loss = F.cross_entropy(model(batch_.images), batch_.targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step(epoch + 1)
    model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module, data) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b.images) for b in data.val_loader(256, workers=0)])


def main() -> None:
    import timm
    from rich.console import Console
    from rich.table import Table

    import retrofit
    from retrofit.train.data import ImageFolderData

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default="test_resnet", help="a plain timm CNN (test_resnet: timm's tiny ResNet; resnet18...)"
    )
    ap.add_argument("--size", type=int, default=32, help="image side after upscaling the 8x8 digits")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2, help="phase-1 fine-tuning epochs")
    ap.add_argument("--position", default="standard")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    console = Console(width=200)
    input_size = (3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        write_digits(root, args.size, args.seed)
        plain = timm.create_model(args.model, num_classes=10)
        data = ImageFolderData.open(root, plain, input_size, augment=False)  # no flips: a flipped 2 is no 2
        t0 = time.perf_counter()
        pretrain(plain, data, args.pretrain_epochs, batch=64, lr=2e-3, seed=args.seed)
        t_pre = time.perf_counter() - t0
        reference = logits(plain, data)
        results, exact = {}, None
        for init in ("preserve", "paper"):
            se = retrofit.add_se(
                copy.deepcopy(plain), position=args.position, r=args.r, init=init, input_size=input_size
            )
            if init == "preserve":
                exact = torch.equal(logits(se, data), reference)
            t0 = time.perf_counter()
            results[init] = retrofit.finetune(
                se,
                root,
                epochs=args.epochs,
                batch_size=64,
                lr=1e-2,
                augment=False,
                seed=args.seed,
                workers=0,
                input_size=input_size,
                restore_best=False,
            )
            results[init].seconds = time.perf_counter() - t0
    pre, paper = results["preserve"], results["paper"]
    original = pre.row("original")
    last = f"epoch {args.epochs}"
    table = Table(
        title=f"{args.model} on scikit-learn digits ({len(data.train)} train / {len(data.val)} val, "
        f"{args.size}x{args.size}); SE {args.position}, r {args.r}; phase 1: {args.epochs} epoch(s), "
        f"SE blocks only",
        title_justify="left",
    )
    for col in ("model", "init", "top-1 %", "top-5 %", "val loss"):
        table.add_column(col, justify="left" if col in ("model", "init") else "right")

    def add(label, init, row):
        table.add_row(label, init, f"{row['top1']:.2f}", f"{row['top5']:.2f}", f"{row['val_loss']:.4f}")

    add(f"original (plain {args.model}, {args.pretrain_epochs} epochs)", "", original)
    add("retrofitted, step 0", "preserve", pre.row("step 0"))
    add("retrofitted, step 0", "paper", paper.row("step 0"))
    add(f"retrofitted, after phase 1 ({last})", "preserve", pre.row(last))
    add(f"retrofitted, after phase 1 ({last})", "paper", paper.row(last))
    console.print(table)
    console.print(
        f"preserve at step 0 equals the original: logits bitwise equal = {exact}, top-1 "
        f"{pre.row('step 0')['top1']:.2f} vs {original['top1']:.2f}"
    )
    console.print(
        f"fine-tuned (preserve) >= original: {pre.row(last)['top1'] >= original['top1']} "
        f"({pre.row(last)['top1']:.2f} vs {original['top1']:.2f})"
    )
    console.print(
        f"time: pretraining {t_pre:.0f} s, fine-tuning {pre.seconds:.0f} s (preserve) and "
        f"{paper.seconds:.0f} s (paper), evaluations included"
    )


if __name__ == "__main__":
    main()
