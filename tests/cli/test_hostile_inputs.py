"""Hostile inputs on the command line (issue 22, items 1 to 5): each is one `error:` line of at most a few
hundred characters, in bounded time and memory. The commands run in one child process under a 6 GiB
address-space limit (the torch import alone reserves about 3.6 GiB of it) and a time limit: before the
fixes, the billion laughs and the 1-billion-parameter model ran out of that memory, metadata nested
100,000 deep ended in `internal error: RecursionError`, a FIFO given as --space waited forever, and the
messages that quoted a bad value repeated all of it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import billion_laughs, make_folder, rewrite_header, safetensors_bytes, special_files

CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from typer.testing import CliRunner
from retrofit.cli import app
out = []
for args in json.loads(sys.argv[1]):
    start = time.monotonic()
    result = CliRunner().invoke(app, args)
    out.append(dict(args=args, code=result.exit_code, output=result.output[-2000:], size=len(result.output),
                    seconds=time.monotonic() - start))
print(json.dumps(out))
"""
DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_YAML = "r: " + "[" * 50_000 + "]" * 50_000 + "\n"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """(command line, words its error line holds), over files made here."""
    root = tmp_path_factory.mktemp("hostile")
    data = make_folder(root / "data", train=1, val=1)
    import timm

    import retrofit

    saved = retrofit.save(
        retrofit.add_se(timm.create_model("test_resnet", num_classes=3), r=4, input_size=(3, 32, 32)),
        root / "se.safetensors",
    )
    out = []
    for key in ("recipe", "model_kwargs", "input_size"):
        deep = rewrite_header(
            saved, root / f"deep_{key}.safetensors", lambda h, k=key: h["__metadata__"].update({k: DEEP_JSON})
        )
        out.append((["finetune", str(deep), "--data", str(data)], [f"metadata '{key}' is nested more than 32 levels"]))
    (root / "deep.yaml").write_text(DEEP_YAML)
    out.append((["add-se", "test_resnet", "--recipe", str(root / "deep.yaml")], ["is nested more than 32 levels deep"]))
    out.append(
        (
            ["tune", "test_resnet", "--space", str(root / "deep.yaml"), "--data", str(data), "--trials", "1"],
            ["is nested more than 32 levels deep"],
        )
    )
    for key in ("r", "position", "only", "stages"):
        (root / f"laughs_{key}.yaml").write_text(billion_laughs(key, 9))
        out.append((["add-se", "test_resnet", "--recipe", str(root / f"laughs_{key}.yaml")], ["uses an alias (*a0)"]))
    out.append(
        (
            ["tune", "test_resnet", "--space", str(root / "laughs_r.yaml"), "--data", str(data), "--trials", "1"],
            ["uses an alias (*a0)"],
        )
    )
    for name, (path, what) in special_files(root / "st", ".safetensors").items():
        out.append((["add-se", "test_resnet", "--checkpoint", str(path)], [what]))
        folder = ["has no config.json: not a folder written by retrofit.save_pretrained"]  # a folder is a saved model
        out.append((["finetune", str(path), "--data", str(data)], folder if name == "dir" else [what]))
    for path, what in special_files(root / "yaml", ".yaml").values():
        out.append((["add-se", "test_resnet", "--recipe", str(path)], [what]))
        out.append((["tune", "test_resnet", "--space", str(path), "--data", str(data), "--trials", "1"], [what]))
    million = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(1_000_000)}
    (root / "million.safetensors").write_bytes(safetensors_bytes({}, million))
    out.append(
        (["add-se", "test_resnet", "--checkpoint", str(root / "million.safetensors")], ["more than the 16,777,216"])
    )
    giant = rewrite_header(
        saved, root / "giant.safetensors", lambda h: h["__metadata__"].update(architecture="vit_giant_patch14_224")
    )
    out.append((["finetune", str(giant), "--data", str(data)], ["does not hold the weights of vit_giant_patch14_224"]))
    return out


def test_hostile_inputs_are_one_short_line_in_bounded_time_and_memory(cases):
    run = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([args for args, _ in cases])],
        capture_output=True,
        text=True,
        timeout=480,
        cwd=Path(__file__).parent,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.splitlines()[-1])
    for (args, words), got in zip(cases, results):
        lines = [ln for ln in got["output"].splitlines() if ln.strip()]
        assert got["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, got["output"][:600])
        assert got["size"] <= 300, (args, got["size"], lines[0][:300])
        for w in words:
            assert w in lines[0], (args, w, lines[0])
