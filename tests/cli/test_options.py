"""One definition of each option: every typer option of a fine-tune option is made from its
FinetuneConfig field (flags, default, bounds, help), and no default, bound, flag or help text of one is
written anywhere else in the package (issue 23, item 3)."""

import ast
from pathlib import Path

import pytest
import typer

from retrofit.cli import app
from retrofit.train.config import FIELDS, RUN_OPTIONS, bounds_text, cli_default

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = typer.main.get_command(app).commands
TAKES = {
    "finetune": set(FIELDS),
    "add-se": set(FIELDS),
    "sweep": {"epochs", "lr", *RUN_OPTIONS},
    "tune": {"epochs", *RUN_OPTIONS},
}
AXES = {"tune": {"lr", "phase2_epochs"}}  # tune searches these: its own options, their help from the field


def expected(name, param):
    """What the option of field ``name`` must be, from the field alone."""
    f = FIELDS[name]
    m = f.metadata
    flags = [flag for spec in m["flags"] for flag in spec.split("/")]
    assert sorted([*param.opts, *param.secondary_opts]) == sorted(flags), name
    assert param.default == cli_default(f), name
    assert m["help"] in param.help, name
    closed = not any(m[f"{side}_open"] and m[side] is not None for side in ("low", "high"))
    assert (param.min, param.max) == ((m["low"], m["high"]) if closed else (None, None)), name  # a click range
    if not closed:
        assert f"[{bounds_text(f).replace(' ', '')}]" in param.help, name


@pytest.mark.parametrize("command", sorted(TAKES))
def test_every_option_of_a_command_comes_from_its_field(command):
    params = {p.name: p for p in COMMANDS[command].params}
    for name in TAKES[command]:
        expected(name, params[name])
    for name in AXES.get(command, ()):
        assert FIELDS[name].metadata["help"] in params[name].help
    assert "lr" in params  # every command that fine-tunes sets the rate


def test_a_changed_field_changes_every_command(monkeypatch):
    """The options are made from the field when the commands are built: change a field's help and default and
    every command shows the new ones (nothing keeps a copy)."""
    import dataclasses

    import retrofit.cli.options as options

    f = FIELDS["mixup"]
    changed = dataclasses.field(default=0.5, metadata={**f.metadata, "help": "CHANGED HELP."})
    changed.name, changed.type = f.name, f.type
    monkeypatch.setitem(FIELDS, "mixup", changed)
    annotation, option = options.config_option("mixup")
    assert option.default == 0.5 and option.help == "CHANGED HELP."


def literals(tree):
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_default_flag_or_help_of_an_option_is_written_twice():
    """Outside retrofit/train/config.py: no string holds a field's help or names its flag, no function
    parameter or dataclass field named after an option has a default (it would be a second default), no
    comparison checks an option against its field's bound again (``batch_size < 1``: the field checks it). The
    exceptions are other things that share a name, each with its reason (OTHER)."""
    assert copies(ROOT / "retrofit") == []


def test_the_scan_finds_a_planted_copy(tmp_path):
    """The scan above can fail: a second default, a copied help and a hand-written flag are each found."""
    import shutil

    package = tmp_path / "retrofit"
    shutil.copytree(ROOT / "retrofit", package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(package / "train" / "loop.py", "a") as f:
        f.write(
            "\n\ndef planted(data, lr: float = 1e-3):\n    return data\n\n\nHELP = "
            f"{FIELDS['smoothing'].metadata['help']!r}\nFLAG = '--mixup'\n\n\ndef bound(config):\n"
            "    return config.batch_size < 1 or config.epochs < 1\n"
        )  # the second: not the field's bound
    assert copies(package) == [
        "train/loop.py: help of smoothing",
        "train/loop.py: flag --mixup",
        "train/loop.py: planted(lr=...)",
        "train/loop.py: bound of batch_size",
    ]


# parameters and dataclass fields named like an option that are not that option: (module, owner, name) -> why
OTHER = {
    ("measure/latency.py", "measure_latency", "seed"): "the seed of the timing input",
    ("sweep/check.py", "randomize", "seed"): "the seed of the random weights a check draws",
    ("blocks/attention.py", "build_attention", "device"): "a torch device to build the block on",
    ("blocks/se.py", "__init__", "device"): "a torch device to build the block on",
    ("blocks/scale.py", "__init__", "device"): "a torch device to build a folded gate's channel scale on",
    ("files/create.py", "build_named", "seed"): "the seed of a named model's random weights",
    ("sweep/tune/space.py", "space_from_options", "lr"): "the search axis or a fixed rate: None, not given",
    ("cli/tune.py", "tune_command", "lr"): "tune's search axis (a range), its default from the field",
    ("cli/tune.py", "tune_command", "phase2_epochs"): "tune's search axis: None, not searched",
    ("sweep/tune/space.py", "parse_space", "lr"): "the search axis: None, not searched",
    ("sweep/tune/space.py", "parse_space", "phase2_epochs"): "the search axis: None, not searched",
    ("sweep/ablation.py", "run_arm", "phase2_epochs"): "a run's searched phase-2 epochs: 0, none",
    ("sweep/tune/claim.py", "Budget", "epochs"): "the study's budget of training epochs",
    ("sweep/tune/space.py", "Space", "lr"): "the search axis: None, not searched",
    ("sweep/tune/space.py", "Space", "phase2_epochs"): "the search axis: (0,), not searched",
    ("train/distributed.py", "Dist", "device"): "the torch device a process trains on",
}
AXIS_FLAGS = {("cli/tune.py", "--lr"), ("cli/tune.py", "--phase2-epochs")}  # tune's search axes (above)


def bound_checked(node) -> str | None:
    """The option a comparison checks against its field's own bound (``x < low``, ``x <= low`` when the bound
    is open; ``x > high``...), or None. Another bound of the same option (an accuracy sweep's ``epochs < 1``,
    where the field allows 0) is not a copy."""
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.comparators[0], ast.Constant)):
        return None
    left, op, value = node.left, node.ops[0], node.comparators[0].value
    name = left.id if isinstance(left, ast.Name) else left.attr if isinstance(left, ast.Attribute) else None
    if name not in FIELDS or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    m = FIELDS[name].metadata
    low = isinstance(op, ast.LtE if m["low_open"] else ast.Lt) and value == m["low"]
    high = isinstance(op, ast.GtE if m["high_open"] else ast.Gt) and value == m["high"]
    return name if low or high else None


def copies(package: Path) -> list[str]:
    helps = {name: f.metadata["help"] for name, f in FIELDS.items()}
    flags = {flag for f in FIELDS.values() for spec in f.metadata["flags"] for flag in spec.split("/")}
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel == "train/config.py":
            continue
        tree = ast.parse(path.read_text())
        for text in literals(tree):
            found += [f"{rel}: help of {n}" for n, h in helps.items() if h[:40] in text]
            if text in flags and len(text) > 2 and (rel, text) not in AXIS_FLAGS:
                found.append(f"{rel}: flag {text}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = (
                    [None] * (len(node.args.args) - len(node.args.defaults))
                    + node.args.defaults
                    + node.args.kw_defaults
                )
                found += [
                    f"{rel}: {node.name}({arg.arg}=...)"
                    for arg, default in zip(args, defaults)
                    if default is not None and arg.arg in FIELDS and (rel, node.name, arg.arg) not in OTHER
                ]
            name = bound_checked(node)
            if name is not None:
                found.append(f"{rel}: bound of {name}")
            if isinstance(node, ast.ClassDef):  # a dataclass field named like an option, with a default
                found += [
                    f"{rel}: class {node.name}: {s.target.id} = ..."
                    for s in node.body
                    if isinstance(s, ast.AnnAssign)
                    and isinstance(s.target, ast.Name)
                    and s.value is not None
                    and s.target.id in FIELDS
                    and (rel, node.name, s.target.id) not in OTHER
                ]
    return found
