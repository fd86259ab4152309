import math
import re

import pytest
import yaml

from retrofit import Recipe, RecipeError, builtin_recipes
from retrofit.surgery.recipe import resolve_recipe
from support import billion_laughs, special_files


def test_defaults_are_the_papers_choices():
    r = Recipe()
    assert (r.position, r.r, r.squeeze, r.gate, r.stages, r.bias) == ("standard", 16, "avg", "sigmoid", None, True)
    assert r.init == "preserve"


def test_builtin_recipes_one_per_position_plus_timm():
    names = set(builtin_recipes())
    assert names == {"standard", "pre", "post", "identity", "inside", "timm"}
    for name in names - {"timm"}:
        assert Recipe.load(name).position == name
    timm_recipe = Recipe.load("timm")
    assert (timm_recipe.position, timm_recipe.r, timm_recipe.divisor, timm_recipe.min_width, timm_recipe.init) == (
        "standard",
        16,
        8,
        8,
        "paper",
    )


def test_yaml_file_roundtrip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        yaml.safe_dump({"position": "inside", "r": 8, "stages": [3, 4], "bias": False, "gate": "hard_sigmoid"})
    )
    r = Recipe.load(path)
    assert (r.position, r.r, r.stages, r.bias, r.gate) == ("inside", 8, (3, 4), False, "hard_sigmoid")
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.load(str(path)) == r


@pytest.mark.parametrize(
    "data, field",
    [
        ({"position": "middle"}, "position"),
        ({"gate": "softmax"}, "gate"),
        ({"squeeze": "median"}, "squeeze"),
        ({"init": "zeros"}, "init"),
        ({"r": 0}, "r"),
        ({"r": -4}, "r"),
        ({"r": "abc"}, "r"),
        ({"r": True}, "r"),
        ({"r": float("nan")}, "r"),
        ({"divisor": 0}, "divisor"),
        ({"min_width": 1.5}, "min_width"),
        ({"stages": "x"}, "stages"),
        ({"stages": []}, "stages"),
        ({"bias": "maybe"}, "bias"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(RecipeError, match=f"'{field}'"):
        Recipe.from_dict(data)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(RecipeError) as err:
        Recipe(gate="softmax")
    assert "sigmoid, hard_sigmoid, tanh, relu" in str(err.value)


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("position: post\nreduction: 8\n")
    with pytest.raises(RecipeError, match="unknown field 'reduction'.*allowed fields: position, r,"):
        Recipe.load(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        Recipe.load(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="unknown recipe 'nope'.*built-in recipes"):
        Recipe.load("nope")
    bad = tmp_path / "broken.yaml"
    bad.write_text("position: [post\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("post\n")
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.load(scalar)


def test_cli_style_strings_are_coerced():
    r = resolve_recipe(None, r="8", stages="2,3", divisor="8", bias="false", init="paper", gate="SIGMOID")
    assert (r.r, r.stages, r.divisor, r.bias, r.gate) == (8, (2, 3), 8, False, "sigmoid")
    assert resolve_recipe("post", r=None).position == "post"  # unset overrides are ignored
    assert resolve_recipe(None, stages="all").stages is None
    assert resolve_recipe(None, r="2.5").r == 2.5


def test_preserve_without_bias_needs_a_gate_nonzero_at_zero():
    with pytest.raises(RecipeError, match="init 'preserve' without biases"):
        Recipe(bias=False, gate="tanh")
    Recipe(bias=False, gate="sigmoid")  # sigmoid(0) = 0.5: fine
    Recipe(bias=False, gate="relu", init="paper")


def test_reduced_width_rounding():
    # paper: C / r; timm: make_divisible(C / 16, 8) with a minimum of 8 (hand-computed)
    assert [Recipe(r=16).width(c) for c in (64, 100, 256, 2048)] == [4, 6, 16, 128]
    timm_recipe = Recipe.load("timm")
    assert [timm_recipe.width(c) for c in (64, 128, 256, 2048)] == [8, 8, 16, 128]
    assert Recipe(r=1000).width(64) == 1
    assert math.isclose(Recipe(r=2.5).width(10), 4)


@pytest.mark.parametrize("key", ["r", "position", "only", "stages"])
def test_yaml_aliases_are_refused_before_they_expand(tmp_path, key):
    """Issue 22.2: a 300-byte "billion laughs" (anchors nine levels deep) expanded until MemoryError. Four
    levels here (10^4 values: harmless where aliases still expand); nine run in tests/cli under a memory cap."""
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs(key, 4))
    with pytest.raises(RecipeError, match=r"uses an alias \(\*a0\) at line 1; aliases are not allowed") as caught:
        Recipe.load(path)
    assert len(str(caught.value)) <= 300


@pytest.mark.parametrize(
    "levels, words",
    [
        (50_000, "is nested more than 32 levels deep at line 1"),
        (33, "is nested more than 32 levels deep at line 1"),
        (32, "recipe field 'r': the reduction ratio must be a positive number, got [[[[...]]]]"),
    ],
)
def test_a_recipe_nested_deeper_than_the_bound_is_one_line(tmp_path, levels, words):
    """Issue 22.1: `r: [[[...]]]` 50,000 deep ended in RecursionError. The bound: 32 levels, the mapping
    of the file one of them; at the bound the value is read and refused for what it is."""
    path = tmp_path / "deep.yaml"
    path.write_text("r: " + "[" * (levels - 1) + "]" * (levels - 1) + "\n")
    with pytest.raises(RecipeError) as caught:
        Recipe.load(path)
    assert words in str(caught.value) and len(str(caught.value)) <= 300


def test_a_recipe_of_more_values_than_the_bound_is_refused(tmp_path):
    """At most 100,000 values in a document, counted as it is read (the mapping, its key, the list, and
    99,997 items make 100,000)."""
    path = tmp_path / "many.yaml"
    path.write_text("only: [" + ",".join(["a"] * 99_997) + "]\n")
    assert Recipe.load(path).only == ("a",)
    path.write_text("only: [" + ",".join(["a"] * 99_998) + "]\n")
    with pytest.raises(RecipeError, match="holds more than 100,000 values at line 1"):
        Recipe.load(path)


def test_a_recipe_file_over_a_mebibyte_is_not_read(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(RecipeError, match=r"big.yaml is larger than 1,048,576 bytes"):
        Recipe.load(path)
    path.write_text("#" * ((1 << 20) - 1) + "\n")  # exactly the bound: read
    assert Recipe.load(path) == Recipe()


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("r", [1] * 2_000_000, "got [1, 1, 1, 1, 1, 1, ...]"),
        ("position", "x" * 10_000_000, "unknown value 'xxxxx"),
        ("only", [7] * 2_000_000, "got [7, 7, 7, 7, 7, 7, ...]"),
        ("stages", "1," * 1_000_000 + "x", "got '1,1,1,"),
        ("r", {2: [1] * 1_000_000}, "stage 2 maps to [1, 1, 1, 1, 1, 1, ...]"),
        ("gate", "\x1b[2J\n" * 1000, "'\\x1b[2J\\n"),
    ],
)
def test_a_message_quotes_a_short_escaped_excerpt_of_the_value(field, value, shown):
    """Issue 22.3: a 2-million-element r gave a 6 MB error line (the whole value repeated)."""
    with pytest.raises(RecipeError) as caught:
        Recipe(**{field: value})
    text = str(caught.value)
    assert shown in text and len(text) <= 300 and "\n" not in text and "\x1b" not in text, text[:400]


@pytest.mark.parametrize("kind", ["zero", "urandom", "fifo", "dir", "loop"])
def test_a_special_recipe_file_is_named_for_what_it_is(tmp_path, kind):
    """Issue 22.4: a link to /dev/zero, a FIFO, a directory or a symlink loop as --recipe was "not found"."""
    path, what = special_files(tmp_path, ".yaml")[kind]
    with pytest.raises(RecipeError, match=re.escape(f"recipe file {path} {what}")):
        Recipe.load(path)


# -- issue 22's hand mutations of surgery/recipe_fields.py ---------------------------------------------
@pytest.mark.parametrize("value", ["2:8,02:16", "2:8, 2 :16", {2: 8, "2": 16}, {"default": 4, 3: 8, " 3": 16}])
def test_a_stage_given_twice_is_an_error(value):
    """Mutation recipe_fields.py:181 (the duplicate-stage check off): `-r 2:8,02:16` kept the last one."""
    with pytest.raises(RecipeError, match=r"recipe field 'r': stage [23] is given twice"):
        Recipe(r=value)


@pytest.mark.parametrize("key", [0, "0", -1, "x", 2.5, True])
def test_a_stage_key_is_a_whole_number_from_1(key):
    """Mutation recipe_fields.py:209 (stage key 0 accepted). Stage 1 is the smallest: output stride 2."""
    with pytest.raises(RecipeError, match=r"recipe field 'r': .* is not a stage number"):
        Recipe(r={key: 8})
    assert Recipe(r={1: 8, "2": 4}).r.values == ((1, 8), (2, 4))


def test_an_override_must_select_its_sites():
    """Mutation recipe_fields.py:249 (the "selects every site" error off): an override without stages
    or only would set its fields everywhere, which is the base field's job."""
    with pytest.raises(
        RecipeError,
        match=r"recipe field 'overrides', entry 2: selects every site; give stages and/or "
        r"only",
    ):
        Recipe(overrides=[{"stages": [4], "r": 8}, {"r": 32}])
    for entry in (
        {"stages": [4], "r": 8},
        {"only": ["layer4.*"], "r": 8},
        {"stages": [5], "only": ["layer4.2"], "r": 8},
    ):
        assert Recipe(overrides=[entry]).overrides[0].values == (("r", 8),)


def test_kind_module_read_from_a_file_or_the_command_line_is_the_at_sites(tmp_path):
    """The mutation tool's survivor at recipe.py:110 (`k != NAMED` made `k is not NAMED`): a kind read
    from YAML or split from `--kinds` text is a new string, never the constant itself, so the check then
    took `module` for a residual-type kind and refused a valid recipe. In Python source the literal and
    the constant are one interned object, which is why no test noticed."""
    path = tmp_path / "at.yaml"
    path.write_text("position: post\nkinds: [module]\nat: ['features.denseblock*']\n")
    recipe = Recipe.load(path)
    assert (recipe.kinds, recipe.at, recipe.position) == (("module",), ("features.denseblock*",), "post")
    typed = Recipe.from_dict({"kinds": "residual,module", "at": "features.*"})  # as `--kinds residual,module`
    assert typed.kinds == ("residual", "module")
