"""The documentation site (docs/): built strictly, its references complete, every python block of every page
run as written.

The site is built once per session (about 10 s on the 2-core machine) by ``sphinx-build -W --keep-going -n``,
as a person or CI would build it: a warning, a broken cross-reference, a missing page or an autodoc failure
fails the build.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer

import retrofit
from support import python_blocks, run_python_blocks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import file_format_doc  # noqa: E402  (tools/file_format_doc.py: the file format page made from its definition)
import options_doc  # noqa: E402  (tools/options_doc.py: the options page made from the fields)

DOCS = ROOT / "docs"
STRICT = ["-W", "--keep-going", "-n", "-E", "-q"]


def sphinx_build(source: Path, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", *STRICT, str(source), str(out)], capture_output=True, text=True, cwd=ROOT
    )
    return done, time.perf_counter() - start


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done, seconds = sphinx_build(DOCS, out)
    print(f"\nsphinx-build -W -n: {seconds:.1f} s")
    return done, out


def test_site_builds_strictly(site):
    done, out = site
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr and "ERROR" not in done.stderr, done.stderr
    for page in DOCS.rglob("*.md"):  # every page is in the toctree, so each became a page of the site
        if "_build" not in page.parts:
            assert (out / page.relative_to(DOCS).with_suffix(".html")).is_file(), page


def test_api_reference_has_every_public_name(site):
    """Each name of the facade's list has an entry (an anchor autodoc made) on the API page, with text."""
    _, out = site
    html = (out / "reference" / "api.html").read_text()
    assert len(retrofit.__all__) >= 27
    for name in retrofit.__all__:
        entry = re.search(rf'<dt class="sig[^"]*" id="retrofit\.{name}">(.*?)</dd>', html, flags=re.S)
        assert entry, f"retrofit.{name} has no entry in the API reference"
        assert "<p>" in entry.group(1), f"retrofit.{name} has no description in the API reference"


def test_cli_reference_has_every_command_with_its_help(site):
    from typer.testing import CliRunner

    from retrofit.cli import app

    _, out = site
    html = (out / "reference" / "cli.html").read_text()
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert len(commands) >= 7
    for name in commands:
        assert f'<h2>retrofit {name}<a class="headerlink"' in html, name
        usage = CliRunner().invoke(app, [name, "--help"], prog_name="retrofit", terminal_width=80).output
        first = next(ln for ln in usage.splitlines() if ln.startswith("Usage:"))
        assert first.replace("<", "&lt;").replace(">", "&gt;") in html, first


def test_a_broken_reference_fails_the_build(tmp_path):
    """The strict build is not made lenient by docs/_ext/retrofit_docs.py, which links references to the
    package's objects: one to an object that does not exist still fails, one that exists does not."""
    (tmp_path / "conf.py").write_text(
        f"exec(open({str(DOCS / 'conf.py')!r}).read())\nimport sys; sys.path.insert(0, {str(DOCS / '_ext')!r})\n"
    )
    good = "{py:func}`retrofit.graph.model.own_input_size` and {py:class}`retrofit.surgery.sites.SiteRefs`"
    (tmp_path / "index.md").write_text(f"# Page\n\n{good}\n")
    done, _ = sphinx_build(tmp_path, tmp_path / "good")
    assert done.returncode == 0, done.stderr
    (tmp_path / "index.md").write_text(f"# Page\n\n{good} and {{py:func}}`retrofit.graph.model.no_such_function`\n")
    done, _ = sphinx_build(tmp_path, tmp_path / "bad")
    assert done.returncode != 0
    assert "retrofit.graph.model.no_such_function" in done.stderr and "not found" in done.stderr, done.stderr


def own_networks(namespace):
    """guides/own-networks.md (the tutorial): the names it promises exist and are what it says."""
    assert isinstance(namespace["se_gm"], torch.fx.GraphModule)
    assert type(namespace["plain"]) is namespace["Net"]
    assert [b.path for b in retrofit.get_info(namespace["se_inet"]).blocks] == ["1.se", "2.se"]


def quickstart_files(folder):
    """What quickstart.md's Python section reads: a resnet50 weights file and a 3-class data set."""
    import timm
    from safetensors.torch import save_file

    from support import make_folder

    save_file(timm.create_model("resnet50").state_dict(), folder / "my_resnet50.safetensors")
    make_folder(folder / "data")


def quickstart(namespace):
    """quickstart.md (the README's Python API section until issue 25): what its comments promise."""
    assert namespace["report"].added_params > 0
    assert len(retrofit.get_info(namespace["again"]).blocks) == 2
    assert len(namespace["gates"].blocks) == 8 and namespace["result"].evaluations >= 1


def detection(namespace):
    """guides/detection-segmentation.md: a torchvision detector retrofitted, run and trained."""
    detector = retrofit.get_info(namespace["se_detector"])
    assert len(detector.blocks) == 16 and len(namespace["detections"]) == 2  # no FPN merge
    assert {"loss_classifier", "loss_objectness"} <= set(namespace["losses"])


# the pages whose blocks leave results to check beyond their own asserts; each needs at least this many blocks
CHECKS = {
    "guides/own-networks.md": (own_networks, 8),
    "quickstart.md": (quickstart, 2),
    "guides/detection-segmentation.md": (detection, 1),
}
# the files a page's blocks read, made before they run (in the page's empty folder)
FILES = {"quickstart.md": quickstart_files}
# pages whose blocks a test of their own runs, with the files they read and what they must give
OWN_TEST = {"guides/python-equivalents.md": "tests/test_python_equivalents.py"}
PAGES = sorted(
    p.relative_to(DOCS).as_posix()
    for p in DOCS.rglob("*.md")
    if "_build" not in p.parts and python_blocks(p) and p.relative_to(DOCS).as_posix() not in OWN_TEST
)


def test_the_pages_with_python_blocks_are_found():
    assert set(CHECKS) <= set(PAGES), (CHECKS, PAGES)
    assert all((ROOT / test).is_file() and python_blocks(DOCS / page) for page, test in OWN_TEST.items())


@pytest.mark.parametrize("page", PAGES)
def test_page_python_blocks_run(page, tmp_path, monkeypatch):
    """Every python block of a docs page, as written, in order, in one namespace, in an empty folder
    holding the built-in recipes (as a checkout has them)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    if page in FILES:
        FILES[page](tmp_path)
    namespace = {"__name__": page}
    ran = run_python_blocks(DOCS / page, namespace, ROOT)
    check, least = CHECKS.get(page, (None, 1))
    assert ran >= least, f"{page} lost its examples"
    if check:
        check(namespace)


# -- generated pages: docs/reference/options.md made from the one definition of each option (issue 23, item 3) --
def test_the_options_page_is_up_to_date():
    assert (ROOT / "docs" / "reference" / "options.md").read_text() == options_doc.page(), (
        "docs/reference/options.md is stale: run `python tools/options_doc.py`"
    )


def test_the_file_format_page_is_up_to_date():
    assert (ROOT / "docs" / "reference" / "file-format.md").read_text() == file_format_doc.page(), (
        "docs/reference/file-format.md is stale: run `python tools/file_format_doc.py`"
    )


def test_the_file_format_page_lists_the_keys_a_file_is_read_with(tmp_path):
    """The page against the reader: its example is the metadata of a file that loads; a file lacking a key the
    page says every file has is refused, as is a key the page does not list; each optional key may be absent."""
    from safetensors.torch import save_file

    from retrofit.files.header import read_header

    page = (ROOT / "docs" / "reference" / "file-format.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (every file|adapters|optional) \|", page, re.M)
    listed = {key: where for key, where in rows}
    assert list(listed)[:6] == ["format", "architecture", "model_kwargs", "recipe", "input_size", "blocks"]
    example = json.loads(re.search(r"saved as a file.*?```json\n(.*?)\n```", page, re.S).group(1))
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in example.items()}
    assert set(meta) <= set(listed)

    def write(metadata):
        path = tmp_path / "m.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
        return path

    header = read_header(write(meta))  # the page's example, as it is
    assert (header.architecture, header.blocks, header.input_size) == ("resnet18", 8, (3, 64, 64))
    for key in [k for k, where in listed.items() if where == "every file"]:
        missing = "is not a retrofit file" if key == "format" else f"metadata '{key}' is missing"
        with pytest.raises(retrofit.RetrofitError, match=missing):
            read_header(write({k: v for k, v in meta.items() if k != key}))
    with pytest.raises(retrofit.RetrofitError, match="metadata 'note' is not one retrofit writes"):
        read_header(write({**meta, "note": "x"}))
    assert {k for k, where in listed.items() if where == "optional"} == {"weights", "folds"}
    assert "weights" not in meta and "folds" not in meta  # optional: the example has neither and is read


def test_recipe_help_is_written_once_and_shown_everywhere():
    import dataclasses

    import retrofit
    from retrofit.cli import app

    add_se = {p.name: p for p in typer.main.get_command(app).commands["add-se"].params}
    page = (ROOT / "docs" / "reference" / "options.md").read_text()
    for f in dataclasses.fields(retrofit.Recipe):
        text = f.metadata["help"]
        assert text in page and f"{f.name}: {text[:60]}" in " ".join(retrofit.Recipe.__doc__.split()), f.name
        if f.name != "overrides":  # only in a YAML file
            assert add_se[f.name].help.startswith(text), f.name
    block = {f.name: f.metadata["help"] for f in dataclasses.fields(retrofit.blocks.config.BlockConfig)}
    assert all(retrofit.Recipe.__dataclass_fields__[name].metadata["help"] == text for name, text in block.items())


def test_finetune_guide_inline_call_runs_as_written(tmp_path, monkeypatch):
    """guides/finetune.md's one-line Python fine-tune (prose, not a python block), on a model whose blocks
    learn, in a folder holding only data/: its output_dir's parents did not exist (issue 17, item 7)."""
    from support import make_folder, se_model

    text = (DOCS / "guides" / "finetune.md").read_text()
    (call,) = set(re.findall(r"`(retrofit\.finetune\(model, [^`]*\))`", text))
    assert 'output_dir="runs/se50"' in call
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data")
    namespace = {"retrofit": retrofit, "model": se_model(position="post")}
    result = eval(compile(call, "guides/finetune.md", "eval"), namespace)
    assert (tmp_path / "runs" / "se50" / "best.safetensors").is_file()
    assert [r["name"] for r in result.rows] == ["original", "step 0", "epoch 1", "epoch 2"]


def test_the_shown_add_se_run_is_a_fresh_runs_output():
    """The run of the README's main job shown in quickstart.md (whole) and in the README (trimmed) is what
    `retrofit add-se resnet101 --r 16 --position post` prints today, line for line (on the meta device:
    seconds). The README's one line of its own says what it left out."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("retrofit")), "add-se", "resnet101", "--r", "16", "--position", "post"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    fresh = [line.rstrip() for line in done.stdout.splitlines()]
    words = " ".join(done.stdout.split())  # the same text, whatever the terminal's width wrapped
    shown = re.search(r"## A first run\n.*?```text\n(.*?)\n```", (DOCS / "quickstart.md").read_text(), flags=re.S)
    assert " ".join(shown.group(1).split()) == words
    trimmed = re.search(r"## One run\n.*?```text\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    own = [line for line in trimmed.group(1).splitlines() if line.rstrip() not in fresh and line not in shown.group(1)]
    assert own == ["... (one row per block, folded per stage: layer1.0.se_post ... layer4.2.se_post)"]
    assert len(trimmed.group(1).splitlines()) >= 25
