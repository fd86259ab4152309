"""docs/reference/file-format.md: what retrofit's files hold and the bounds a file may ask for, made from the
format's one definition (the keys and their meaning in retrofit/files/header.py and retrofit/files/folder.py,
the bounds in retrofit/files/bounds.py and retrofit/inputs.py) and from a file and a folder this script saves.
`python tools/file_format_doc.py` writes it; tests/test_docs.py fails when it is not up to date."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import timm
from safetensors import safe_open

import retrofit
from retrofit.files.bounds import HEADER_BYTES, SIZES, TENSORS
from retrofit.files.folder import (
    ADAPTER_FILE,
    CARD_FILE,
    CONFIG,
    CONFIG_BYTES,
    CONFIG_FILE,
    JSON_KEYS,
    MODEL_FILE,
    OPTIONAL_JSON_KEYS,
)
from retrofit.files.header import (
    ADAPTER_FORMAT,
    ADAPTER_METADATA,
    BASE_NAME,
    FORMAT,
    MAX_PATH,
    METADATA,
    MODEL_KWARGS,
    OPTIONAL_METADATA,
)
from retrofit.inputs import MAX_DEPTH
from retrofit.surgery.info import FOLD_KINDS

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "file-format.md"


def table(header: str, rows: list[tuple[str, ...]]) -> str:
    lines = [f"| {header} |", "| " + " | ".join("---" for _ in header.split(" | ")) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def metadata_table() -> str:
    groups = (("every file", METADATA), ("adapters", ADAPTER_METADATA), ("optional", OPTIONAL_METADATA))
    return table("key | in | what it holds", [(f"`{k}`", where, v) for where, keys in groups for k, v in keys.items()])


def config_table() -> str:
    return table("key | what it holds", [(f"`{k}`", v) for k, v in CONFIG.items()])


def bounds_table() -> str:
    rows = [(f"`{name}`", f"{low:,} to {high:,}") for name, (low, high) in SIZES.items()]
    rows += [
        (
            "a safetensors header",
            f"at most {HEADER_BYTES:,} bytes and {TENSORS:,} tensors, checked before it is parsed",
        ),
        ("`config.json`", f"at most {CONFIG_BYTES:,} bytes"),
        ("JSON nesting (metadata values, `config.json`)", f"at most {MAX_DEPTH} levels, checked before it is parsed"),
        ("a module path in `folds`", f"at most {MAX_PATH} characters"),
        ("`base_name`", f"at most {BASE_NAME} characters, one printable line"),
    ]
    return table("value | bound", rows)


def kinds_table() -> str:
    return table("kind | where the block's constant scale went", [(f"`{k}`", v) for k, v in FOLD_KINDS.items()])


def examples() -> tuple[str, str]:
    """The metadata of a saved file and the config.json of a saved folder: a timm resnet18 (10 classes,
    random weights) with the default recipe at 3x64x64."""
    model = retrofit.add_se(timm.create_model("resnet18", num_classes=10), input_size=(3, 64, 64))
    with tempfile.TemporaryDirectory() as tmp:
        path = retrofit.save(model, Path(tmp) / "se18.safetensors")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        folder = retrofit.save_pretrained(model, Path(tmp) / "se18")
        config = (folder / "config.json").read_text()
    order = [*METADATA, *ADAPTER_METADATA, *OPTIONAL_METADATA]  # safetensors keeps no order of its metadata
    parsed = JSON_KEYS + OPTIONAL_JSON_KEYS  # the values that are JSON text, shown parsed
    shown = {k: json.loads(meta[k]) if k in parsed else meta[k] for k in sorted(meta, key=order.index)}
    return json.dumps(shown, indent=2), config.rstrip()


def page() -> str:
    meta, config = examples()
    return f"""# File format

Made by `python tools/file_format_doc.py` from the format's one definition (a test fails when this page is
not up to date): the keys and what each holds in `retrofit/files/header.py` and `retrofit/files/folder.py`,
the bounds in `retrofit/files/bounds.py` and `retrofit/inputs.py`; the examples are a file and a folder the
script saved.

A retrofit file is [safetensors](https://huggingface.co/docs/safetensors): tensors and text metadata, no
code. Retrofit checks every metadata value (its type, an allow-list of keys and values, the bounds below)
before anything is built from it; a file that fails a check is refused with one line naming the problem.
Retrofit writes no file it would refuse.

## What retrofit writes

- `retrofit.save(model, "m.safetensors")` (`add-se -o m.safetensors`): one file, format `{FORMAT}`. Its
  tensors are the model's whole state dict: every key of the original model unchanged, the blocks' keys
  added. Its metadata is the table below.
- `retrofit.save(model, "a.safetensors", adapter=True)` (`--adapter`): format `{ADAPTER_FORMAT}`. Its
  tensors are the blocks', a new head's and any of the base's that differ from the base (a phase-2
  fine-tune); the metadata adds the base's hash: `retrofit.load(path, base=...)` rebuilds the model on
  the base it was made on and refuses another.
- `retrofit.save_pretrained(model, "out/")` (on the command line, an `--output` not ending in
  `.safetensors`): a folder, as the Hugging Face libraries write one. `{CONFIG_FILE}` holds the metadata
  as JSON values (the table of its keys below), `{MODEL_FILE}` (or, for an adapter, `{ADAPTER_FILE}`)
  the tensors with the metadata `{{"format": "pt"}}` of the Hugging Face convention, `{CARD_FILE}` the
  model card. `{CONFIG_FILE}` is written last: a folder without it is incomplete and is said to be.

## A file's metadata

{metadata_table()}

`model_kwargs` may name only {" and ".join(f"`{k}`" for k in MODEL_KWARGS)}: a file cannot ask timm for
a download, a pretrained configuration or another file. A fold's kind in `folds`:

{kinds_table()}

The metadata of a timm `resnet18` (10 classes, random weights) retrofitted with the default recipe at
3x64x64 and saved as a file (the JSON values shown parsed):

```json
{meta}
```

## A folder's `{CONFIG_FILE}`

{config_table()}

The same model saved as a folder:

```json
{config}
```

## Bounds

Every size-like value of a file's metadata is checked against the largest a real model has, before
anything is built or allocated; an architecture is checked against the file's tensors on the meta device
before any real allocation.

{bounds_table()}
"""


def main() -> int:
    PAGE.write_text(page())
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
