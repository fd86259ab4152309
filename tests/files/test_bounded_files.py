"""Files that ask for unbounded work are refused in one short line before the work (issue 22, items 1, 3, 4
and 5): metadata nested 100,000 deep, a special file where a weight file should be, a header of a million
tensors, an architecture the file's tensors cannot be the weights of."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import retrofit
from retrofit import RetrofitError
from retrofit.files import tensors as tensors_module
from retrofit.files.models import create_model
from support import CLASSES, SIZE, rewrite_header, safetensors_bytes, special_files

GIANT = "vit_giant_patch14_224"  # 1,012,611,432 parameters: 4 GB in float32
HEADER_BYTES, TENSORS = 16 << 20, 100_000  # the bounds on a safetensors header (retrofit.files.bounds)


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


BASE = []  # pytest's folder of this session's tmp_paths


@pytest.fixture(autouse=True)
def base(tmp_path_factory):
    BASE[:] = [str(tmp_path_factory.getbasetemp())]


def short(err: BaseException) -> str:
    """The message, asserted to be one line of at most 300 characters besides pytest's folder, which the paths
    it names start with: a path is quoted whole up to 120 characters, and pytest's is longer under its workers."""
    text = str(err)
    assert "\n" not in text and len(text.replace(BASE[0], "")) <= 300, text[:600]
    return text


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = retrofit.add_se(timm.create_model("test_resnet", num_classes=CLASSES), r=4, input_size=(3, SIZE, SIZE))
    folder = tmp_path_factory.mktemp("saved")
    full = retrofit.save(model, folder / "se.safetensors")
    plain = folder / "plain.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=CLASSES).state_dict(), str(plain))
    return full, retrofit.save(retrofit.load(full), folder / "adapter.safetensors", adapter=True), plain


@pytest.mark.parametrize("key", ["recipe", "model_kwargs", "input_size"])
def test_metadata_nested_100000_deep_is_one_line(saved, tmp_path, key):
    """Issue 22.1: retrofit.load raised RecursionError (a traceback) on JSON nested 100,000 deep."""
    bad = rewrite_header(
        saved[0], tmp_path / "deep.safetensors", lambda h: h["__metadata__"].update({key: nested(100_000)})
    )
    with pytest.raises(RetrofitError) as caught:
        retrofit.load(bad)
    assert f"metadata '{key}' is nested more than 32 levels deep" in short(caught.value)


def test_the_depth_bound_is_32_levels(saved, tmp_path):
    """At the bound the value is parsed (and refused for what it is), one level over it is not."""
    at = rewrite_header(
        saved[0], tmp_path / "at.safetensors", lambda h: h["__metadata__"].update(input_size=nested(32))
    )
    with pytest.raises(RetrofitError, match="metadata 'input_size' must be three positive whole numbers"):
        retrofit.load(at)
    over = rewrite_header(
        saved[0], tmp_path / "over.safetensors", lambda h: h["__metadata__"].update(input_size=nested(33))
    )
    with pytest.raises(RetrofitError, match="metadata 'input_size' is nested more than 32 levels deep"):
        retrofit.load(over)


def test_a_long_bad_value_is_quoted_as_a_short_excerpt(saved, tmp_path):
    """Issue 22.3: a message quotes at most a short, escaped excerpt of the value it rejects."""
    long = "[" + ", ".join(["7"] * 2_000_000) + "]"
    bad = rewrite_header(saved[0], tmp_path / "long.safetensors", lambda h: h["__metadata__"].update(input_size=long))
    with pytest.raises(RetrofitError, match=r"got \[7, 7, 7, 7, 7, 7, \.\.\.\]") as caught:
        retrofit.load(bad)
    short(caught.value)
    escape = rewrite_header(
        saved[0],
        tmp_path / "escape.safetensors",
        lambda h: h["__metadata__"].update(architecture="\x1b[31mred\nline" * 1000),
    )
    with pytest.raises(RetrofitError) as caught:
        retrofit.load(escape)
    assert "'\\x1b[31mred\\nline" in short(caught.value) and "\x1b" not in str(caught.value)


@pytest.mark.parametrize("kind", ["zero", "urandom", "fifo", "dir", "loop"])
def test_a_special_file_is_named_for_what_it_is(saved, tmp_path, kind):
    """Issue 22.4: a link to /dev/zero, a FIFO, a directory or a symlink loop given as the file to load, a
    checkpoint or an adapter's base was reported as "not found"."""
    path, what = special_files(tmp_path, ".safetensors")[kind]
    for call, role in (
        (lambda: retrofit.load(path), "file"),
        (lambda: create_model("test_resnet", checkpoint=path), "checkpoint"),
        (lambda: retrofit.load(saved[1], base=path), "base"),
    ):
        with pytest.raises(RetrofitError) as caught:
            call()
        if kind == "dir" and role != "checkpoint":  # a folder is what retrofit.save_pretrained writes (issue 23)
            assert short(caught.value).startswith(
                f"{path} has no config.json: not a folder written by retrofit.save_pretrained"
            )
            continue
        loop = " (a link that leads back to itself)" if kind == "loop" else ""
        assert short(caught.value) == f"{role} {path} {what}" + loop


def entries(n: int) -> dict:
    return {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}


@pytest.fixture
def never_parsed(monkeypatch):
    """safetensors' parser of the whole header must not be reached."""
    monkeypatch.setattr(tensors_module, "safe_open", lambda *a, **k: pytest.fail("the whole header was parsed"))


@pytest.mark.parametrize("count", [TENSORS + 1, 1_000_000])
def test_a_header_of_too_many_tensors_is_refused_before_it_is_parsed(tmp_path, never_parsed, count):
    """Issue 22.5: a header declaring a million tensors was refused after 25.6 s and 2.2 GB (parsed whole,
    every tensor's slice listed). Refused now from its byte size (a million entries: 30 MB, over
    HEADER_BYTES), or from its count of entries (TENSORS + 1 in fewer bytes)."""
    path = tmp_path / "many.safetensors"
    path.write_bytes(safetensors_bytes({}, entries(count)))
    size = path.stat().st_size - 8
    assert (size > HEADER_BYTES) == (count == 1_000_000)  # which bound each case meets
    words = f"declares {size:,} bytes" if size > HEADER_BYTES else f"lists {count:,} tensors, more than the {TENSORS:,}"
    with pytest.raises(RetrofitError, match=words) as caught:
        create_model("test_resnet", checkpoint=path)
    assert short(caught.value).startswith(f"cannot read checkpoint {path}: its safetensors header")
    with pytest.raises(RetrofitError, match=words):
        retrofit.load(path)


def test_a_header_at_the_bounds_is_read(tmp_path):
    """Exactly TENSORS entries in exactly HEADER_BYTES bytes: read and parsed (the file, of empty tensors,
    is then refused as holding no weights)."""
    text = safetensors_bytes({"pad": ""}, entries(TENSORS))
    pad = HEADER_BYTES - (len(text) - 8)
    assert pad > 0
    path = tmp_path / "at.safetensors"
    path.write_bytes(safetensors_bytes({"pad": " " * pad}, entries(TENSORS)))
    assert path.stat().st_size - 8 == HEADER_BYTES
    with pytest.raises(RetrofitError, match="holds 0 values, but test_resnet has"):
        create_model("test_resnet", checkpoint=path)


def test_a_header_one_byte_over_the_bound_is_refused_before_it_is_parsed(tmp_path, never_parsed):
    """cosmic-ray's survivors of bounds.py (docs/mutation.md): HEADER_BYTES raised (17 << 20, 16 << 21) went
    unnoticed, as the only header over it was 30 MB; one of HEADER_BYTES + 1 bytes and one tensor now."""
    text = safetensors_bytes({"pad": ""}, entries(1))
    path = tmp_path / "over.safetensors"
    path.write_bytes(safetensors_bytes({"pad": " " * (HEADER_BYTES + 1 - (len(text) - 8))}, entries(1)))
    assert path.stat().st_size - 8 == HEADER_BYTES + 1
    with pytest.raises(RetrofitError, match="declares 16,777,217 bytes, more than the 16,777,216"):
        create_model("test_resnet", checkpoint=path)


@pytest.fixture
def no_real_build(monkeypatch):
    """timm.create_model may run on the meta device only (a real build of GIANT takes 4 GB)."""
    real = timm.create_model

    def create(name, *args, **kwargs):
        if name == GIANT and torch.get_default_device().type != "meta":
            pytest.fail(f"{name} was built for real")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)


def test_an_architecture_is_checked_against_the_file_before_it_is_built(saved, tmp_path, no_real_build):
    """Issue 22.5: a file whose metadata named vit_giant_patch14_224 built it for real (4.3 GB, 23 s)
    before refusing it; now its tensors are compared with the model built on the meta device."""
    bad = rewrite_header(
        saved[0], tmp_path / "giant.safetensors", lambda h: h["__metadata__"].update(architecture=GIANT)
    )
    with torch.device("meta"):
        tensors = len(timm.create_model(GIANT, num_classes=CLASSES).state_dict())  # every one missing
    with pytest.raises(
        RetrofitError,
        match=f"does not hold the weights of {GIANT}: {tensors} missing tensors "
        r"\(e.g. cls_token\)",
    ) as caught:
        retrofit.load(bad)
    short(caught.value)


def test_a_file_with_a_wrong_shape_is_refused_before_the_build(saved, tmp_path, no_real_build):
    """The same check finds a tensor of the wrong shape (the head's weight transposed: the same bytes, so
    safetensors takes it), with the names right."""

    def head(h):
        h["fc.weight"]["shape"] = h["fc.weight"]["shape"][::-1]

    bad = rewrite_header(saved[0], tmp_path / "head.safetensors", head)
    with pytest.raises(
        RetrofitError,
        match=r"does not hold the weights of test_resnet: 1 shape mismatches \(e.g. "
        r"fc.weight: \[\d+, 3\] in the file, \[3, \d+\] in the model\)",
    ):
        retrofit.load(bad)


def test_a_base_far_smaller_than_its_architecture_is_refused_before_the_build(saved, tmp_path, no_real_build):
    """An adapter naming GIANT over a small base file, and --checkpoint: the base must hold at least half
    of the values the model has outside its classifier."""
    adapter = rewrite_header(
        saved[1], tmp_path / "giant.safetensors", lambda h: h["__metadata__"].update(architecture=GIANT)
    )
    have = sum(t.numel() for t in timm.create_model("test_resnet", num_classes=CLASSES).state_dict().values())
    for call in (lambda: retrofit.load(adapter, base=saved[2]), lambda: create_model(GIANT, checkpoint=saved[2])):
        with pytest.raises(RetrofitError, match=f"holds {have:,} values, but {GIANT} has 1,011,") as caught:
            call()
        short(caught.value)


def test_a_checkpoint_of_half_the_values_passes_the_check(tmp_path):
    """The rule's edge: a file of half the values the model has outside its classifier goes on to timm's
    loader (which refuses it for its names); one value fewer is refused before the build."""
    need = sum(v.numel() for k, v in timm.create_model("test_resnet").state_dict().items() if not k.startswith("fc."))
    half = (need + 1) // 2
    save_file({"pad": torch.zeros(half)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(RetrofitError, match="does not fit test_resnet: .* missing keys"):
        create_model("test_resnet", checkpoint=tmp_path / "half.safetensors")
    save_file({"pad": torch.zeros(half - 1)}, str(tmp_path / "less.safetensors"))
    with pytest.raises(
        RetrofitError, match=f"holds {half - 1:,} values, but test_resnet has {need:,} outside its classifier"
    ):
        create_model("test_resnet", checkpoint=tmp_path / "less.safetensors")
