import math

import pytest
import yaml

from retrofit import Recipe, RecipeError, builtin_recipes
from retrofit.surgery.recipe import resolve_recipe


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
    assert (timm_recipe.position, timm_recipe.r, timm_recipe.divisor, timm_recipe.min_width, timm_recipe.init) == \
        ("standard", 16, 8, 8, "paper")


def test_yaml_file_roundtrip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"position": "inside", "r": 8, "stages": [3, 4], "bias": False,
                                    "gate": "hard_sigmoid"}))
    r = Recipe.load(path)
    assert (r.position, r.r, r.stages, r.bias, r.gate) == ("inside", 8, (3, 4), False, "hard_sigmoid")
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.load(str(path)) == r


@pytest.mark.parametrize("data, field", [
    ({"position": "middle"}, "position"), ({"gate": "softmax"}, "gate"), ({"squeeze": "median"}, "squeeze"),
    ({"init": "zeros"}, "init"), ({"r": 0}, "r"), ({"r": -4}, "r"), ({"r": "abc"}, "r"), ({"r": True}, "r"),
    ({"r": float("nan")}, "r"), ({"divisor": 0}, "divisor"), ({"min_width": 1.5}, "min_width"),
    ({"stages": "x"}, "stages"), ({"stages": []}, "stages"), ({"bias": "maybe"}, "bias"),
])
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
    Recipe(bias=False, gate="sigmoid")          # sigmoid(0) = 0.5: fine
    Recipe(bias=False, gate="relu", init="paper")


def test_reduced_width_rounding():
    # paper: C / r; timm: make_divisible(C / 16, 8) with a minimum of 8 (hand-computed)
    assert [Recipe(r=16).width(c) for c in (64, 100, 256, 2048)] == [4, 6, 16, 128]
    timm_recipe = Recipe.load("timm")
    assert [timm_recipe.width(c) for c in (64, 128, 256, 2048)] == [8, 8, 16, 128]
    assert Recipe(r=1000).width(64) == 1
    assert math.isclose(Recipe(r=2.5).width(10), 4)
