"""Equal models give equal files: safetensors writes its metadata in a random order per process, and
retrofit.save rewrites the header in a fixed one (still a safetensors file that loads)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from retrofit.files.canonical import sort_metadata
from support import make_folder, se_model

TESTS = Path(__file__).resolve().parents[1]
SAVE = (
    "import sys; sys.path.insert(0, {tests!r}); import retrofit; from support import se_model; "
    "retrofit.save(se_model(), sys.argv[1])"
)


def header_of(raw):
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


def header(path):
    return header_of(Path(path).read_bytes())


def test_two_processes_save_the_same_bytes(tmp_path):
    """Three processes (three random orders of safetensors' map): one file, byte for byte."""
    paths = [tmp_path / f"se{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", SAVE.format(tests=str(TESTS)), str(p)], check=True, timeout=300)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(digests) == 1
    meta = header(paths[0])["__metadata__"]
    assert list(meta) == sorted(meta)
    model = retrofit.load(paths[0])  # retrofit's reader checks every metadata value and tensor
    with safe_open(str(paths[0]), "pt") as f:  # and safetensors' own
        assert f.metadata() == meta and set(f.keys()) == set(model.state_dict())


def test_sort_metadata_keeps_the_length_the_entries_and_the_data(tmp_path):
    path = tmp_path / "t.safetensors"
    meta = {"zeta": "1", "alpha": "ünïcode \"quoted\" \\ and\nnewline", "mid": "[3, 32, 32]"}
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)}
    save_file(tensors, str(path), metadata=meta)
    before = path.read_bytes()
    n = int.from_bytes(before[:8], "little")
    assert sort_metadata(path)
    after = path.read_bytes()
    assert len(after) == len(before) and after[:8] == before[:8] and after[8 + n :] == before[8 + n :]
    assert header(path) == header_of(before) and list(header(path)["__metadata__"]) == ["alpha", "mid", "zeta"]
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("b"), tensors["b"]) and torch.equal(f.get_tensor("a"), tensors["a"])


def test_two_equal_fine_tunes_give_equal_files(tmp_path):
    data = make_folder(tmp_path / "data")
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    for run in ("a", "b"):
        result = CliRunner().invoke(
            app,
            [
                "finetune",
                str(ckpt),
                "--data",
                str(data),
                "--epochs",
                "2",
                "-b",
                "8",
                "-j",
                "0",
                "-o",
                str(tmp_path / run),
            ],
        )
        assert result.exit_code == 0, result.output
    for name in ("last.safetensors", "best.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
