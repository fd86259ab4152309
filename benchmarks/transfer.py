"""Does SE help? A transfer task where accuracy is not saturated, every arm against its controls.

Data: scikit-learn's handwritten digits (8x8 greyscale, shipped inside the package), upscaled to 32x32.

1. **Pretraining** (the user's model): a plain timm CNN (``test_resnet``, timm's tiny ResNet) learns the
   digits 0 to 4 (75% of their images; its top-1 on the other 25% is printed). Its classifier has 10
   outputs, so the new task (5 classes) gets a new head in every arm.
2. **Transfer**: the digits 5 to 9, with ``--shots`` training images per class drawn per seed from one
   half of their images; the other half (fixed) is the validation set. Every arm is a
   :func:`retrofit.finetune` of the same pretrained network with the same seed: the same new head (built
   from the seed), the same images in the same order; the SE arms' blocks also come from the seed.
3. **Arms** (phase 1: ``--epochs`` epochs at ``--lr``; phase 2: ``--phase2-epochs`` more with everything
   trainable at ``lr / 10``):

   * ``head only``: the new classifier (control);
   * ``head + norms``: the classifier and the norm layers' affine parameters (the sweep's control);
   * ``head + SE <position>``: SE blocks (default recipe: r 16, preserving init) at each position, and
     the classifier;
   * ``full fine-tune``: the classifier, then everything (phase 2) (control);
   * ``SE standard + phase 2``: head + SE at the standard position, then everything;
   * ``..., distill``: the same with ``distill=True`` (KL to the original network's logits);
   * ``head + SE standard`` with label smoothing 0.1, mixup 0.2, or a model EMA (decay 0.99, its own
     row): the evidence behind the defaults of those options.

Every arm runs with the fine-tune's options off (label smoothing 0, no mixup, EMA or distillation)
except the one it names: this experiment chose the defaults (label smoothing 0.1 is the one it kept).

Printed: each arm's val top-1 and loss after its last epoch, mean ± std over the seeds, and the
paired difference to the ``head only`` and ``full fine-tune`` controls (and, for the option arms, to
``head + SE standard``) with a 95% t-interval over the seeds. Nothing is tuned to favour an arm: the
settings are the tool's defaults plus a learning rate chosen before any arm was run.

Run: ``python benchmarks/transfer.py`` (needs ``pip install -c constraints.txt '.[bench]'``); 2 CPU
threads; about 12 minutes on a quiet 2-core machine (validation after every epoch is most of it).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

POSITIONS = ("standard", "pre", "post", "identity", "inside")
OFF = dict(smoothing=0.0)  # every option off (the others are off by default) but the one an arm names


def write_images(root: Path, images: np.ndarray, labels: np.ndarray, ids, size: int) -> None:
    for i in ids:
        folder = root / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")


def make_data(root: Path, size: int, shots: int, seeds: list[int]) -> dict[int, Path]:
    """``root/pretrain`` (digits 0-4: train/val) and one folder per seed for 5-9, all sharing one val/."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.images, digits.target
    old, new = np.flatnonzero(y < 5), np.flatnonzero(y >= 5)
    tr, va = train_test_split(old, test_size=0.25, random_state=0, stratify=y[old])
    write_images(root / "pretrain" / "train", x, y, tr, size)
    write_images(root / "pretrain" / "val", x, y, va, size)
    pool, val = train_test_split(new, test_size=0.5, random_state=0, stratify=y[new])
    write_images(root / "val", x, y, val, size)
    folders = {}
    for seed in seeds:
        g = np.random.default_rng(seed)
        chosen = np.concatenate([g.choice(pool[y[pool] == c], shots, replace=False) for c in range(5, 10)])
        folder = root / f"seed{seed}"
        write_images(folder / "train", x, y, chosen, size)
        (folder / "val").symlink_to(Path("..") / "val", target_is_directory=True)  # relative to the link
        folders[seed] = folder
    return folders


def pretrain_on(model: torch.nn.Module, root: Path, size: int, epochs: int) -> float:
    """The user's own training before retrofit (``digits.pretrain``: a plain loop on the same timm data
    stack); returns its val top-1."""
    from digits import pretrain

    from retrofit.train.data import ImageFolderData

    data = ImageFolderData.open(root, model, (3, size, size), augment=False)
    torch.manual_seed(0)
    pretrain(model, data, epochs, batch=64, lr=2e-3, seed=0)
    with torch.no_grad():
        hits = sum((model(b.images).argmax(1) == b.targets).sum().item() for b in data.val_loader(256, workers=0))
    return 100 * hits / len(data.val)


def arms(epochs: int, phase2: int) -> list[tuple[str, str | None, dict, str]]:
    """(name, SE position or None, finetune options, the metrics row to read)."""
    last, last2 = f"epoch {epochs}", f"epoch {epochs + phase2}"
    p2 = dict(phase2_epochs=phase2)
    out = [("head only", None, {}, last), ("head + norms", None, dict(train_norms=True), last)]
    out += [(f"head + SE {p}", p, {}, last) for p in POSITIONS]
    out += [
        ("full fine-tune", None, p2, last2),
        ("SE standard + phase 2", "standard", p2, last2),
        ("head + SE standard, distill", "standard", dict(distill=True), last),
        ("SE standard + phase 2, distill", "standard", dict(distill=True, **p2), last2),
        ("head + SE standard, smoothing 0.1", "standard", dict(smoothing=0.1), last),
        ("head + SE standard, mixup 0.2", "standard", dict(mixup=0.2), last),
        ("head + SE standard, EMA 0.99", "standard", dict(ema_decay=0.99), f"{last} (ema)"),
    ]
    return out


def interval(diffs: list[float]) -> str:
    """Mean and 95% t-interval of paired differences over seeds (scipy ships with scikit-learn)."""
    from scipy.stats import t

    d = np.asarray(diffs)
    if len(d) < 2:
        return f"{d.mean():+.2f}"
    half = t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}]"


def main() -> None:
    import timm
    from rich.console import Console
    from rich.table import Table

    import retrofit

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--shots", type=int, default=10, help="training images per class of the new task")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10, help="phase-1 epochs")
    ap.add_argument("--phase2-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--only", default=None, help="arm names separated by ; (default: all)")
    ap.add_argument(
        "--prepare",
        type=Path,
        default=None,
        help="only write the data (DIR/seed<k>/, DIR/val/) and the pretrained model "
        "(DIR/pretrained.safetensors) into the new folder DIR, for `retrofit sweep --data`",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    console = Console(width=200)
    seeds = list(range(args.seeds))
    size = args.size
    t0 = time.perf_counter()
    chosen = arms(args.epochs, args.phase2_epochs)
    if args.only:
        chosen = [a for a in chosen if a[0] in args.only.split(";")]
    results: dict[str, list[dict]] = {name: [] for name, *_ in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if args.prepare is None else args.prepare
        root.mkdir(exist_ok=args.prepare is None)
        folders = make_data(root, size, args.shots, seeds)
        torch.manual_seed(0)
        plain = timm.create_model(args.model, num_classes=10)
        pre_top1 = pretrain_on(plain, root / "pretrain", size, args.pretrain_epochs)
        console.print(
            f"pretrained {args.model} on digits 0-4: val top-1 {pre_top1:.2f}% ({time.perf_counter() - t0:.0f} s)"
        )
        if args.prepare is not None:
            from safetensors.torch import save_model

            save_model(plain, str(root / "pretrained.safetensors"))
            console.print(f"wrote {root}/seed0..{len(seeds) - 1} (train/, val/) and {root}/pretrained.safetensors")
            return
        for seed in seeds:
            for name, position, options, row in chosen:
                model = copy.deepcopy(plain)
                if position is not None:
                    torch.manual_seed(seed)
                    model = retrofit.add_se(model, position=position, input_size=(3, size, size), inplace=True)
                result = retrofit.finetune(
                    model,
                    folders[seed],
                    epochs=args.epochs,
                    lr=args.lr,
                    batch_size=args.batch_size,
                    augment=False,
                    seed=seed,
                    workers=0,
                    input_size=(3, size, size),
                    restore_best=False,
                    **{**OFF, **options},
                )
                results[name].append(result.row(row))
            console.print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)")
    elapsed = time.perf_counter() - t0

    def top1(name):
        return [r["top1"] for r in results[name]]

    title = (
        f"{args.model}, digits 0-4 -> 5-9, {args.shots} images per class, {len(seeds)} seeds, val "
        f"{results[chosen[0][0]][0]['val_images']} images; phase 1 {args.epochs} epochs at lr {args.lr:g}, "
        f"phase 2 {args.phase2_epochs} epochs at lr {args.lr / 10:g}; batch {args.batch_size}, no augmentation"
    )
    table = Table(title=title, title_justify="left")
    for col in ("arm", "top-1 % (mean ± std)", "val loss", "Δ vs head only [95% CI]", "Δ vs full fine-tune [95% CI]"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for name, *_ in chosen:
        t1, loss = np.array(top1(name)), np.array([r["val_loss"] for r in results[name]])
        deltas = [
            interval(list(t1 - np.array(top1(c)))) if c in results and c != name else ""
            for c in ("head only", "full fine-tune")
        ]
        table.add_row(
            name,
            f"{t1.mean():.2f} ± {t1.std(ddof=1) if len(t1) > 1 else 0:.2f}",
            f"{loss.mean():.4f} ± {loss.std(ddof=1) if len(loss) > 1 else 0:.4f}",
            *deltas,
        )
    console.print(table)
    base = "head + SE standard"
    if base in results:
        effects = Table(
            title=f"Each option against {base} without it (paired over seeds, 95% CI)", title_justify="left"
        )
        effects.add_column("option", justify="left")
        effects.add_column("Δ top-1", justify="right")
        for name in results:
            if name.startswith(base + ",") or name == "SE standard + phase 2, distill":
                ref = "SE standard + phase 2" if "phase 2" in name else base
                if ref in results:
                    effects.add_row(f"{name} vs {ref}", interval(list(np.array(top1(name)) - np.array(top1(ref)))))
        console.print(effects)
    console.print(
        f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} CPU(s), torch {torch.__version__}, timm {timm.__version__}, 2 threads; "
        f"{elapsed:.0f} s in all"
    )


if __name__ == "__main__":
    main()
