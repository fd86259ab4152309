"""Files the tool reads are data, never code or orders: tampered files are refused in one line, metadata
cannot reach the network or the disk, and a malicious pickle in any pickle-capable input never runs."""

import copy
import json
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import randomize
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import retrofit
from retrofit import RetrofitError
from retrofit.cli import app
from retrofit.files.bounds import out_of_bounds, whole_number
from retrofit.files.header import metadata, read_header
from retrofit.files.models import create_model
from support import CLASSES, FAST, SIZE, make_folder, one_error_line, rewrite_header, se_model

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A retrofitted test_resnet (random blocks, eval mode) and the file it was saved to."""
    model = randomize(
        retrofit.add_se(
            timm.create_model("test_resnet", num_classes=CLASSES), r=4, init="paper", input_size=(3, SIZE, SIZE)
        )
    )
    return model, retrofit.save(model, tmp_path_factory.mktemp("saved") / "se.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


def relabel_floats(header):
    for key, entry in header.items():
        if key != "__metadata__" and entry["dtype"] == "F32":
            entry["dtype"] = "I32"  # same byte size: safetensors itself accepts the file


def test_relabelled_dtypes_are_refused(saved, tmp_path):
    """Issue 11.4: F32 tensors relabelled I32 loaded without error and gave NaN logits."""
    model, path = saved
    bad = rewrite_header(path, tmp_path / "bad.safetensors", relabel_floats)
    assert load_file(str(bad))["conv1.0.weight"].dtype == torch.int32  # the tampered file is a valid safetensors
    with pytest.raises(
        RetrofitError,
        match=r"do not fit the rebuilt model: \d+ dtype mismatches \(e.g. .*: I32 in "
        r"the file, float32 in the model\)",
    ):
        retrofit.load(bad)
    plain = tmp_path / "plain.safetensors"  # the same through --checkpoint: timm's loader would cast silently
    save_file(randomize(timm.create_model("test_resnet")).state_dict(), str(plain))
    rewrite_header(plain, plain, relabel_floats)
    with pytest.raises(RetrofitError, match="is I32 in the file but F32 in ResNet; the file was edited"):
        create_model("test_resnet", checkpoint=plain)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("recipe", "null", "metadata 'recipe' must be a mapping of recipe fields, got NoneType"),
        ("recipe", '{"r": [1]}', "recipe stored in"),
        ("input_size", '"5"', "metadata 'input_size' must be a list"),
        ("input_size", "[3, 32]", "three positive whole numbers"),
        ("input_size", "[1, 32, 32]", "has 1 channels but the model 3"),
        # cosmic-ray's survivors of header.py (docs/mutation.md): `len(size) != 3` -> `< 3` (four numbers are also
        # refused later, through load, so this case does not kill it: the next test does), and the channel check
        # `!=` -> `>`, each tested from one side only before
        ("input_size", "[3, 32, 32, 32]", "three positive whole numbers"),
        ("input_size", "[4, 32, 32]", "has 4 channels but the model 3"),
        ("model_kwargs", "[1]", "metadata 'model_kwargs' must be a mapping, got list"),
        ("model_kwargs", '{"num_classes": "3"}', "num_classes = '3', not a whole number"),
        ("model_kwargs", '{"num_classes": true}', "not a whole number"),
        ("blocks", "many", "metadata 'blocks' gives blocks = 'many', not a whole number from 1 to 100,000"),
        ("blocks", "3", "says 3 blocks but its recipe gives 4"),
        ("architecture", "hf-hub:timm/resnet18", "is not a timm model name"),
        ("architecture", "../../model", "is not a timm model name"),
        ("comment", "hello", "metadata 'comment' is not one retrofit writes"),
        ("format", None, "not a retrofit file"),
    ],
)
def test_metadata_of_the_wrong_type_is_refused(saved, tmp_path, key, value, message):
    """Issue 11.4: recipe null, input_size "5" or model_kwargs [1] raised TypeError from retrofit.load."""

    def edit(header):
        meta = header["__metadata__"]
        meta.pop(key) if value is None else meta.__setitem__(key, value)

    bad = rewrite_header(saved[1], tmp_path / "bad.safetensors", edit)
    with pytest.raises(RetrofitError, match=message.replace("(", r"\(").replace("[", r"\[")):
        retrofit.load(bad)


def test_the_header_reader_itself_refuses_an_input_size_of_four_numbers(saved, tmp_path):
    """cosmic-ray's survivor at header.py:153 (`len(size) != 3` made `< 3`): through retrofit.load a later
    check refuses [3, 32, 32, 32] with the same words, so only the reader of the header, run alone, tells."""
    bad = rewrite_header(
        saved[1], tmp_path / "bad.safetensors", lambda h: h["__metadata__"].update(input_size="[3, 32, 32, 32]")
    )
    with pytest.raises(RetrofitError, match=r"metadata 'input_size' must be three positive whole numbers \[C, H, W\]"):
        read_header(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pretrained": True},
        {"pretrained_cfg_overlay": {"file": "/etc/passwd"}},
        {"pretrained_cfg_overlay": {"url": "https://example.com/w.pth"}},
        {"checkpoint_path": "/etc/passwd"},
        {"pretrained_cfg": {"hf_hub_id": "x/y"}},
    ],
)
def test_metadata_cannot_reach_the_network_or_the_disk(saved, tmp_path, monkeypatch, kwargs):
    """Issue 11.13: model_kwargs {"pretrained": true} made retrofit.load contact a model hub, and a
    pretrained_cfg_overlay in it was honoured. Refused before any model is built."""
    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(k) or pytest.fail("a model was built"))
    bad = rewrite_header(
        saved[1],
        tmp_path / "bad.safetensors",
        lambda h: h["__metadata__"].update(model_kwargs=json.dumps({"num_classes": 3, **kwargs})),
    )
    with pytest.raises(RetrofitError, match=f"names '{next(iter(kwargs))}': only num_classes, in_chans are allowed"):
        retrofit.load(bad)
    assert not built


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            dict(model_kwargs='{"num_classes": 1000000000}'),
            "num_classes = 1,000,000,000, not a whole number from 0 to 1,000,000",
        ),
        (
            dict(model_kwargs='{"num_classes": 3, "in_chans": 100000000}', input_size="[100000000, 32, 32]"),
            "in_chans = 100,000,000, not a whole number from 1 to 1,024",
        ),
        (dict(input_size="[3, 1000000, 1000000]"), "input side = 1,000,000, not a whole number from 1 to 8,192"),
        (dict(input_size="[3, 32, 10000]"), "input side = 10,000, not a whole number from 1 to 8,192"),
        (dict(model_kwargs='{"num_classes": ' + "9" * 5000 + "}"), "metadata 'model_kwargs' is not valid JSON"),
        (dict(blocks="9" * 5000), "blocks = '99999"),
        (dict(blocks="1000000"), "blocks = '1000000', not a whole number from 1 to 100,000"),
    ],
)
def test_a_file_cannot_ask_for_any_amount_of_memory(saved, tmp_path, monkeypatch, edit, message):
    """Issue 17, item 6: model_kwargs {"num_classes": 10^9} made retrofit.load allocate a 2 TB head, a
    10^6 x 10^6 input size loaded (and a fine-tune would have made images of it), and numbers of
    thousands of digits gave an internal error. Each is refused in one line that names the bound,
    before any model is built."""
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    bad = rewrite_header(saved[1], tmp_path / "bad.safetensors", lambda h: h["__metadata__"].update(edit))
    with pytest.raises(RetrofitError, match=message.replace("(", r"\(").replace("[", r"\[")) as caught:
        retrofit.load(bad)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "classes, side, message",
    [
        (2_000_000, 32, "num_classes = 2,000,000, not a whole number"),
        (10, 10_000, "input side = 10,000, not a whole number"),
    ],
)
def test_retrofit_writes_no_file_it_would_refuse(tmp_path, classes, side, message):
    """The same bounds at save time: on the meta device (no memory) a model of 2 million classes, or
    traced at 10,000 pixels a side, can be retrofitted, but not saved."""
    with torch.device("meta"):
        se = retrofit.add_se(timm.create_model("test_resnet", num_classes=classes), r=4, input_size=(3, side, side))
    with pytest.raises(RetrofitError, match=f"cannot save this model: {message}.*retrofit.load would refuse"):
        retrofit.save(se, tmp_path / "se.safetensors")
    assert list(tmp_path.iterdir()) == []
    result = runner.invoke(
        app, ["add-se", "test_resnet", "--num-classes", "2000000", "--output", str(tmp_path / "cli.safetensors")]
    )
    assert "from 0 to 1,000,000" in one_error_line(result) and list(tmp_path.iterdir()) == []


def test_missing_and_extra_keys_are_refused(saved, tmp_path):
    """A load that ignored missing or unexpected keys (strict=False) would build a half-random model."""
    model, path = saved
    state, meta = load_file(str(path)), metadata(model)
    fewer = {k: v for k, v in state.items() if k != "layer1.0.se.fc2.weight"}
    save_file(fewer, str(tmp_path / "fewer.safetensors"), metadata=meta)
    with pytest.raises(RetrofitError, match=r"1 missing keys \(e.g. layer1.0.se.fc2.weight\)"):
        retrofit.load(tmp_path / "fewer.safetensors")
    more = {**state, "layer1.0.se.extra": torch.zeros(2)}
    save_file(more, str(tmp_path / "more.safetensors"), metadata=meta)
    with pytest.raises(RetrofitError, match=r"1 unexpected keys \(e.g. layer1.0.se.extra\)"):
        retrofit.load(tmp_path / "more.safetensors")


def test_one_channel_model_round_trip(tmp_path):
    """in_chans of a non-RGB model is stored: a 1-channel model saved and loaded back is the same model."""
    se = randomize(
        retrofit.add_se(timm.create_model("test_resnet", in_chans=1), r=4, init="paper", input_size=(1, SIZE, SIZE))
    )
    again = retrofit.load(retrofit.save(se, tmp_path / "gray.safetensors"))
    first_conv = next(m for m in again.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1
    x = torch.randn(2, 1, SIZE, SIZE)
    assert torch.equal(again.eval()(x), se.eval()(x))


# -- train_state.pt ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run2(data, tmp_path_factory):
    """A finished 2-epoch run; its state with epoch set back to 1 is a valid state of a run killed after
    epoch 1 (the resume then restores the optimizer and scheduler)."""
    out = tmp_path_factory.mktemp("run2")
    retrofit.finetune(se_model(), data, epochs=2, output_dir=out / "run", **FAST)
    state = torch.load(out / "run" / "train_state.pt", weights_only=True)
    state.update(epoch=1, rows=state["rows"][:3])
    return state


def _set(path):
    *parents, last = path.split(".")

    def edit(state, value):
        for p in parents:
            state = state[int(p) if p.isdigit() else p]
        state[int(last) if last.isdigit() else last] = value

    return edit


TAMPERED = {
    "no rows": (lambda s: s.pop("rows"), "no 'rows' entry"),
    "no rng": (lambda s: s.pop("rng"), "no 'rng' entry"),
    "no optimizer": (lambda s: s.pop("optimizer"), "no 'optimizer' entry"),
    "epoch as text": (lambda s: _set("epoch")(s, "1"), "'epoch' is a str, not a int"),
    "phase 2 in phase 1": (lambda s: _set("phase")(s, 2), "phase 2 does not match epoch 1"),
    "epoch past the end": (lambda s: _set("epoch")(s, 9), "epoch 9 is not within"),
    "rows without top1": (lambda s: s["rows"][2].pop("top1"), "has no valid 'top1'"),
    "python rng": (lambda s: _set("rng.python")(s, (3, (1, 2), None)), "no valid Python random state"),
    "torch rng": (lambda s: _set("rng.torch")(s, torch.zeros(3, dtype=torch.uint8)), "no valid torch generator"),
    "weights relabelled": (
        lambda s: s["model"].update({"conv1.0.weight": s["model"]["conv1.0.weight"].view(torch.int32)}),
        "1 dtype mismatches \\(e.g. conv1.0.weight: I32 in the file, float32 in the model\\)",
    ),
    "weights missing": (lambda s: s["model"].pop("fc.bias"), "1 missing keys \\(e.g. fc.bias\\)"),
    "adam state shape": (
        lambda s: _set("optimizer.state.0.exp_avg")(s, torch.zeros(3)),
        "optimizer state 'exp_avg' does not have its parameter's shape",
    ),
    "optimizer lr as text": (lambda s: _set("optimizer.param_groups.0.lr")(s, "fast"), "optimizer setting 'lr'"),
    "scheduler field": (lambda s: _set("scheduler.t_initial")(s, "long"), "scheduler field 't_initial'"),
    "scheduler extra field": (lambda s: _set("scheduler.optimizer")(s, {}), "not one of this run's scheduler"),
}


@pytest.mark.parametrize("case", ["untampered", *TAMPERED])
def test_tampered_training_state_is_refused(run2, data, tmp_path, case):
    """Issue 11.4: a weights-only-valid train_state.pt missing a key gave KeyError on --resume. Every entry
    is checked before use; the untampered state resumes (the checks are not what fails)."""
    state = copy.deepcopy(run2)
    out = tmp_path / "run"
    out.mkdir()
    if case != "untampered":
        TAMPERED[case][0](state)
    torch.save(state, out / "train_state.pt")
    resume = lambda: retrofit.finetune(se_model(), data, epochs=2, output_dir=out, resume=True, **FAST)  # noqa: E731
    if case == "untampered":
        assert resume().rows[-1]["name"] == "epoch 2"
        return
    with pytest.raises(RetrofitError, match=TAMPERED[case][1]):
        resume()


def test_tampered_training_state_is_one_error_line(run2, data, tmp_path):
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    state = copy.deepcopy(run2)
    state.pop("best")
    (tmp_path / "run").mkdir()
    torch.save(state, tmp_path / "run" / "train_state.pt")
    line = one_error_line(
        runner.invoke(
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
                "--lr",
                str(FAST["lr"]),
                "-o",
                str(tmp_path / "run"),
                "--resume",
            ],
        )
    )
    assert "train_state.pt is damaged or was edited: no 'best' entry; delete it to start over" in line


# -- malicious pickles (issue 11.15) ----------------------------------------------------------------------
class Plant:
    """Unpickling this creates the file ``marker``: what any code in a pickle could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, around: dict | None = None) -> Path:
    torch.save({**(around or {}), "evil": Plant(marker)}, path)
    return path


def test_the_planted_pickle_does_run_when_unpickled_unsafely(tmp_path):
    """The payload is live: torch.load(weights_only=False) and yaml.unsafe_load create the marker, so the
    tests below, which assert it is absent, would fail if any reader unpickled unsafely."""
    marker = tmp_path / "pwned"
    torch.load(plant(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    yaml.unsafe_load(f"r: !!python/object/apply:builtins.open ['{marker}', 'w']")
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Plant(marker)))
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_planted_pickle_in_a_checkpoint_never_runs(tmp_path, suffix):
    """add-se --checkpoint (timm's pretrained path and retrofit's own reading of the file)."""
    marker = tmp_path / "pwned"
    evil = plant(tmp_path / f"weights{suffix}", marker, timm.create_model("test_resnet").state_dict())
    line = one_error_line(
        runner.invoke(
            app,
            [
                "add-se",
                "test_resnet",
                "--checkpoint",
                str(evil),
                "--input-size",
                "3,32,32",
                "--output",
                str(tmp_path / "se.safetensors"),
            ],
        )
    )
    assert "cannot read checkpoint" in line
    assert not marker.exists()
    assert not (tmp_path / "se.safetensors").exists()


def test_planted_pickle_in_the_training_state_never_runs(data, tmp_path):
    """finetune --resume reads train_state.pt."""
    marker = tmp_path / "pwned"
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    (tmp_path / "run").mkdir()
    plant(tmp_path / "run" / "train_state.pt", marker, {"format": "retrofit-train/1"})
    line = one_error_line(
        runner.invoke(
            app, ["finetune", str(ckpt), "--data", str(data), "-o", str(tmp_path / "run"), "--resume", "-j", "0"]
        )
    )
    assert "not a complete training checkpoint" in line
    assert not marker.exists()


def test_planted_pickle_as_an_adapter_base_or_a_model_never_runs(data, tmp_path, saved):
    """finetune ADAPTER --base FILE reads the base; finetune FILE reads the model (a pickle named .safetensors)."""
    marker = tmp_path / "pwned"
    adapter = retrofit.save(retrofit.load(saved[1]), tmp_path / "adapter.safetensors", adapter=True)
    evil = plant(tmp_path / "base.pth", marker, timm.create_model("test_resnet").state_dict())
    line = one_error_line(runner.invoke(app, ["finetune", str(adapter), "--base", str(evil), "--data", str(data)]))
    assert "cannot read checkpoint" in line and not marker.exists()
    evil_model = plant(tmp_path / "model.safetensors", marker)
    line = one_error_line(runner.invoke(app, ["finetune", str(evil_model), "--data", str(data)]))
    assert "not a complete safetensors file" in line and not marker.exists()


def test_planted_yaml_recipe_never_runs(tmp_path):
    """add-se --recipe FILE reads YAML (yaml.safe_load: no python tags)."""
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"r: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    line = one_error_line(runner.invoke(app, ["add-se", "test_resnet", "--recipe", str(recipe)]))
    assert "not valid YAML" in line and not marker.exists()


# -- issue 22's hand mutations of files/header.py and files/bounds.py: each check at its edge -------------
def adapter_with(saved, tmp_path, **meta):
    adapter = retrofit.save(retrofit.load(saved[1]), tmp_path / "adapter.safetensors", adapter=True)
    return rewrite_header(adapter, tmp_path / "edited.safetensors", lambda h: h["__metadata__"].update(meta))


@pytest.mark.parametrize(
    "digest, ok",
    [
        ("0" * 64, True),
        ("ab" * 32, True),
        ("0" * 63, False),
        ("0" * 65, False),
        ("A" * 64, False),
        ("g" * 64, False),
        ("", False),
    ],
)
def test_an_adapters_base_sha256_is_exactly_64_hexadecimal_digits(saved, tmp_path, digest, ok):
    """Mutation header.py:170 (`{64}` -> `{1,64}`): a hash of any length was accepted."""
    path = adapter_with(saved, tmp_path, base_sha256=digest)
    if ok:
        assert read_header(path).base_sha256 == digest
    else:
        with pytest.raises(RetrofitError, match="metadata 'base_sha256' must be 64 hexadecimal digits"):
            read_header(path)


@pytest.mark.parametrize("length, ok", [(200, True), (201, False), (2000, False)])
def test_an_adapters_base_name_is_at_most_200_characters(saved, tmp_path, length, ok):
    """Mutation header.py:172 (the bound 200 -> 2000)."""
    path = adapter_with(saved, tmp_path, base_name="n" * length)
    if ok:
        assert read_header(path).base_name == "n" * length
    else:
        with pytest.raises(RetrofitError, match="metadata 'base_name' must be one printable line of at most 200"):
            read_header(path)


def test_an_architecture_timm_does_not_have_is_refused_before_anything_is_built(saved, tmp_path, monkeypatch):
    """Mutation header.py:140 (`or not timm.is_model(arch)` dropped): a name of the right characters
    that is no timm model went on to be built."""
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    bad = rewrite_header(
        saved[1], tmp_path / "bad.safetensors", lambda h: h["__metadata__"].update(architecture="resnet_0")
    )
    with pytest.raises(RetrofitError, match="metadata 'architecture' 'resnet_0' is not a timm model name"):
        retrofit.load(bad)


@pytest.mark.parametrize(
    "value, ok",
    [
        ("random", True),
        ("pretrained", True),
        ("checkpoint", True),
        ("fine-tuned", True),
        ("stolen", False),
        ("Random", False),
        ("", False),
    ],
)
def test_the_weights_provenance_is_one_of_four_words(saved, tmp_path, value, ok):
    """Mutation header.py:125 (the `weights` check removed): a file could say anything of where its
    weights came from, and the model card would repeat it."""
    path = rewrite_header(saved[1], tmp_path / "w.safetensors", lambda h: h["__metadata__"].update(weights=value))
    if ok:
        assert read_header(path).weights == value
    else:
        with pytest.raises(
            RetrofitError,
            match=f"metadata 'weights' is '{value}', not one of random, pretrained, checkpoint, fine-tuned",
        ):
            read_header(path)


# the bounds of files/bounds.py, as documented there and in the README (smallest, largest)
BOUNDS = {
    "num_classes": (0, 1_000_000),
    "in_chans": (1, 1024),
    "input side": (1, 8192),
    "blocks": (1, 100_000),
    "base_tensors": (0, 10_000_000),
}


@pytest.mark.parametrize("name", list(BOUNDS))
def test_each_bound_takes_its_smallest_and_largest_value_and_no_other(name):
    """Mutation bounds.py:33 (`<= high` -> `< high`): no test sat at the exact maximum of a bound."""
    low, high = BOUNDS[name]
    for value in (low, high):
        assert out_of_bounds(name, value) is None and whole_number(str(value), name) == value
    for value in (low - 1, high + 1, True, 2.0, str(high)):
        assert (
            out_of_bounds(name, value)
            == (
                f"{name} = {value:,}"
                if isinstance(value, int) and not isinstance(value, bool)
                else f"{name} = {value!r}"
            )
            + f", not a whole number from {low:,} to {high:,} (the bound on {name} in a retrofit file)"
        )
    with pytest.raises(ValueError, match=f"{name} = {high + 1:,}, not a whole number"):
        whole_number(str(high + 1), name)


def test_a_rejected_value_is_shown_with_separators_below_10_to_the_30_and_as_an_excerpt_beyond():
    """cosmic-ray's survivors of bounds.py (docs/mutation.md): the limit 10**30 -> 9**30 and the excerpt's 40
    characters -> 39, `<` -> `<=` or `!=`: neither edge was in a test."""
    tail = ", not a whole number from 0 to 1,000,000 (the bound on num_classes in a retrofit file)"
    assert out_of_bounds("num_classes", 10**30 - 1) == "num_classes = " + ",".join(["999"] * 10) + tail
    assert out_of_bounds("num_classes", -(10**30 - 1)) == "num_classes = -" + ",".join(["999"] * 10) + tail
    assert out_of_bounds("num_classes", 10**30) == "num_classes = 1" + "0" * 30 + tail
    assert out_of_bounds("num_classes", 10**31) == "num_classes = 1" + "0" * 31 + tail
    assert out_of_bounds("num_classes", "7" * 100) == "num_classes = '" + "7" * 20 + "..." + "7" * 17 + "'" + tail


@pytest.mark.parametrize(
    "text, shown",
    [
        ("many", "'many'"),
        ("\u0661\u0662", "'\u0661\u0662'"),
        ("-1", "'-1'"),
        ("+1", "'+1'"),
        (" 1", "' 1'"),
        ("", "''"),
    ],
)
def test_a_count_in_metadata_is_ascii_digits_only(text, shown):
    """cosmic-ray's survivor of bounds.py (docs/mutation.md): `or` -> `and` let a word reach int() (another
    message) and Arabic-Indic digits through, read as 12."""
    with pytest.raises(ValueError) as caught:
        whole_number(text, "blocks")
    assert str(caught.value) == (
        f"blocks = {shown}, not a whole number from 1 to 100,000 (the bound on blocks in a retrofit file)"
    )


def test_metadata_names_only_the_constructor_arguments_that_differ_from_timms_defaults(saved):
    """cosmic-ray's survivor of header.py (docs/mutation.md): the channels read from the input's last side
    (`input_size[0]` -> `[-1]`) wrote `in_chans` for a three-channel model too."""
    assert json.loads(metadata(saved[0])["model_kwargs"]) == {"num_classes": CLASSES}


def test_a_bad_stored_recipe_names_its_file_as_a_bare_path(saved, tmp_path):
    """cosmic-ray's survivor of header.py (docs/mutation.md): the file quoted (`bare=True` -> False); a path is
    shown bare, unquoted, in every message (retrofit.errors.excerpt)."""
    bad = rewrite_header(
        saved[1], tmp_path / "bad.safetensors", lambda h: h["__metadata__"].update(recipe='{"r": [1]}')
    )
    with pytest.raises(RetrofitError, match=f"^recipe stored in {re.escape(str(bad))}: "):
        retrofit.load(bad)


def test_a_file_at_the_bound_of_blocks_is_read(saved, tmp_path):
    """The largest count a file may give is read (and then checked against its recipe)."""
    at = rewrite_header(saved[1], tmp_path / "at.safetensors", lambda h: h["__metadata__"].update(blocks="100000"))
    with pytest.raises(RetrofitError, match="says 100000 blocks but its recipe gives 4"):
        retrofit.load(at)
    over = rewrite_header(saved[1], tmp_path / "over.safetensors", lambda h: h["__metadata__"].update(blocks="100001"))
    with pytest.raises(RetrofitError, match="blocks = 100,001, not a whole number from 1 to 100,000"):
        retrofit.load(over)


@pytest.fixture(scope="module")
def folded_file(tmp_path_factory):
    """A test_resnet whose four gates were folded (identity position: one channel scale, three norms)."""
    model = se_model(position="identity")
    return retrofit.save(retrofit.fold(model).model, tmp_path_factory.mktemp("folded") / "folded.safetensors")


@pytest.mark.parametrize(
    "folds,words",
    [
        ("[[\"layer1.0.se_identity\", \"melt\", \"\"]]", "kind 'melt'"),
        ("[[\"layer1.0.se_identity\", \"scale\"]]", "not [block, kind, neighbour]"),
        ("{\"a\": 1}", "must be a list"),
        (json.dumps([["layer1.0.se_identity", "scale", ""]] * 5), "lists 5 folded blocks"),
        (json.dumps([["layer1.0.se_identity", "scale", ""]] * 2), "bad entry"),
        (json.dumps([["layer1.0.se_identity", "conv_in", "layer1.0.bn1"]]), "not a layer a conv_in fold goes into"),
        (json.dumps([["layer1.0.se_identity", "norm", "layer9.bn"]]), "no module 'layer9.bn'"),
        (json.dumps([["layer1.0.conv1", "scale", ""]]), "not a block of this model"),
    ],
)
def test_tampered_fold_records_are_refused_in_one_line(folded_file, tmp_path, folds, words):
    """The fold records a file keeps (metadata `folds`) are checked before and while the model is rebuilt."""
    bad = rewrite_header(folded_file, tmp_path / "bad.safetensors", lambda h: h["__metadata__"].update(folds=folds))
    with pytest.raises(RetrofitError, match=words.replace("[", r"\[").replace("]", r"\]")):
        retrofit.load(bad)
    result = runner.invoke(app, ["fold", str(bad), "-o", str(tmp_path / "out.safetensors")])
    assert words.split("'")[0].split(" [")[0] in one_error_line(result)


# -- the folder's config.json (issue 23, item 1): the same guarantees as a file's metadata -----------------
@pytest.fixture(scope="module")
def folder(saved, tmp_path_factory):
    """``saved``'s model as a folder of retrofit.save_pretrained."""
    return retrofit.save_pretrained(saved[0], tmp_path_factory.mktemp("folder") / "se")


def edited(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``folder`` whose config.json is ``edit(config)`` (a dict edited in place, or text returned)."""
    import shutil

    copy_ = tmp_path / "edited"
    shutil.copytree(folder, copy_)
    config = json.loads((copy_ / "config.json").read_text())
    text = edit(config)
    if isinstance(text, bytes):
        (copy_ / "config.json").write_bytes(text)
    else:
        (copy_ / "config.json").write_text(text if isinstance(text, str) else json.dumps(config))
    return copy_


# the metadata cases above, as config.json holds them (JSON values, not JSON text)
CONFIG_CASES = [
    ("recipe", None, "metadata 'recipe' must be a mapping of recipe fields, got NoneType"),
    ("recipe", {"r": [1]}, "recipe stored in"),
    ("input_size", "5", "metadata 'input_size' must be a list"),
    ("input_size", [3, 32], "three positive whole numbers"),
    ("input_size", [1, 32, 32], "has 1 channels but the model 3"),
    ("model_kwargs", [1], "metadata 'model_kwargs' must be a mapping, got list"),
    ("model_kwargs", {"num_classes": "3"}, "num_classes = '3', not a whole number"),
    ("model_kwargs", {"num_classes": True}, "not a whole number"),
    ("blocks", "many", "metadata 'blocks' gives blocks = 'many', not a whole number from 1 to 100,000"),
    ("blocks", 3, "says 3 blocks but its recipe gives 4"),
    ("architecture", "hf-hub:timm/resnet18", "is not a timm model name"),
    ("architecture", "../../model", "is not a timm model name"),
    ("comment", "hello", "key 'comment' is not one retrofit writes"),
    ("format", "retrofit/1", "'format' is 'retrofit/1', not 'retrofit-pretrained/1'"),
    ("kind", "pickle", "'kind' is 'pickle', not 'model' or 'adapter'"),
    ("kind", "adapter", "'base' must be given for an adapter, and only for one"),
    ("base_model", "../../etc", "'base_model' is '../../etc', not a base model"),
    ("license", "MIT; rm -rf", "'license' is 'MIT; rm -rf', not a license"),
    ("weights", "stolen", "metadata 'weights' is 'stolen', not one of random, pretrained, checkpoint, fine-tuned"),
]


@pytest.mark.parametrize("key, value, message", CONFIG_CASES)
def test_config_of_the_wrong_type_is_refused(folder, tmp_path, monkeypatch, key, value, message):
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    if key == "blocks" and value == 3:
        monkeypatch.undo()  # the block count is checked against the rebuilt model
    bad = edited(folder, tmp_path, lambda c: c.__setitem__(key, value))
    with pytest.raises(RetrofitError, match=re.escape(message)) as caught:
        retrofit.from_pretrained(bad)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pretrained": True},
        {"pretrained_cfg_overlay": {"file": "/etc/passwd"}},
        {"checkpoint_path": "/etc/passwd"},
        {"pretrained_cfg": {"hf_hub_id": "x/y"}},
    ],
)
def test_config_cannot_reach_the_network_or_the_disk(folder, tmp_path, monkeypatch, kwargs):
    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(k) or pytest.fail("a model was built"))
    bad = edited(folder, tmp_path, lambda c: c.__setitem__("model_kwargs", {"num_classes": 3, **kwargs}))
    with pytest.raises(RetrofitError, match=f"names '{next(iter(kwargs))}': only num_classes, in_chans are allowed"):
        retrofit.from_pretrained(bad)
    assert not built


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            dict(model_kwargs={"num_classes": 1000000000}),
            "num_classes = 1,000,000,000, not a whole number from 0 to 1,000,000",
        ),
        (dict(input_size=[3, 1000000, 1000000]), "input side = 1,000,000, not a whole number from 1 to 8,192"),
        (dict(blocks=1000000), "blocks = '1000000', not a whole number from 1 to 100,000"),
    ],
)
def test_a_config_cannot_ask_for_any_amount_of_memory(folder, tmp_path, monkeypatch, edit, message):
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    bad = edited(folder, tmp_path, lambda c: c.update(edit))
    with pytest.raises(RetrofitError, match=re.escape(message)):
        retrofit.from_pretrained(bad)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"format": "retrofit-pretrained/1", "blocks": NaN}', "not valid JSON (NaN is not a number JSON allows)"),
        ('{"kind": "model", "kind": "adapter"}', "not valid JSON (key 'kind' is given twice)"),
        ("[1, 2]", "must be a JSON object, got list"),
        ("{" * 100000, "nested more than 32 levels deep"),
        ('{"n": ' + "9" * 5000 + "}", "not valid JSON"),
        (b"\xff\xfe", "is not UTF-8 text"),
        (" " * (1 << 20) + "{}", "is larger than 1,048,576 bytes"),
    ],
)
def test_a_config_that_is_not_strict_bounded_json_is_refused(folder, tmp_path, text, message):
    bad = edited(folder, tmp_path, lambda c: text)
    with pytest.raises(RetrofitError, match=re.escape(message)) as caught:
        retrofit.from_pretrained(bad)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_a_config_that_is_no_regular_file_is_refused_without_reading_it(folder, tmp_path):
    import os

    bad = edited(folder, tmp_path, lambda c: None)
    (bad / "config.json").unlink()
    os.symlink("/dev/zero", bad / "config.json")
    with pytest.raises(RetrofitError, match="config.json is not a regular file \\(a character device\\)"):
        retrofit.from_pretrained(bad)


def test_planted_pickle_in_a_folder_never_runs(folder, data, tmp_path):
    """A pickle named model.safetensors in a folder (and one beside it, pytorch_model.bin, which nothing reads)."""
    marker = tmp_path / "pwned"
    bad = edited(folder, tmp_path, lambda c: None)
    plant(bad / "model.safetensors", marker, timm.create_model("test_resnet").state_dict())
    plant(bad / "pytorch_model.bin", marker)
    line = one_error_line(runner.invoke(app, ["finetune", str(bad), "--data", str(data)]))
    assert "not a complete safetensors file" in line and not marker.exists()
    with pytest.raises(RetrofitError, match="not a complete safetensors file"):
        retrofit.from_pretrained(bad)
    assert not marker.exists()


def test_the_folder_weights_are_checked_like_a_file(folder, tmp_path):
    bad = edited(folder, tmp_path, lambda c: None)
    rewrite_header(bad / "model.safetensors", bad / "model.safetensors", relabel_floats)
    with pytest.raises(RetrofitError, match=r"\d+ dtype mismatches \(e.g. .*: I32 in the file, float32 in the model\)"):
        retrofit.from_pretrained(bad)
