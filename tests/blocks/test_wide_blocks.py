"""An absurd r is a memory attack (issue 11 item 5): `--r 1e-6`, or `r: 1e-4` in a file's metadata,
would ask for blocks 10^4-10^6 times wider than their input. The recipe refuses it in one line,
before any model or block is built; r below 1 needs allow_wide, and even then r >= 1/16."""

import json

import pytest
import timm
from conftest import one_error
from safetensors.torch import save_file
from typer.testing import CliRunner

import retrofit
from retrofit import Recipe, RecipeError, RetrofitError
from retrofit.cli import app

runner = CliRunner()


def no_model(*args, **kwargs):
    raise AssertionError("a model was built before the recipe was refused")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--r", "1e-6"], ["recipe field 'r'", "at least 1/16"]),
        (["--r", "0.5"], ["recipe field 'r'", "wider than its input", "--allow-wide"]),
        (["--r", "5:1e-6"], ["recipe field 'r' (stage 5)", "at least 1/16"]),
        (["--min-width", "1000000000"], ["recipe field 'min_width': at most 1024"]),
        (["--divisor", "4096"], ["recipe field 'divisor': at most 1024"]),
        (["--r", "0.01", "--allow-wide"], ["at least 1/16"]),
    ],
)
def test_cli_refuses_absurd_widths_before_building_anything(monkeypatch, args, words):
    monkeypatch.setattr("retrofit.files.create.build_timm", no_model)
    one_error(runner.invoke(app, ["add-se", "resnet18", *args]), *words)


def test_sweep_refuses_an_absurd_r_before_building_anything(monkeypatch):
    monkeypatch.setattr("retrofit.files.create.build_timm", no_model)
    one_error(runner.invoke(app, ["sweep", "resnet18", "--r", "16,1e-6"]), "--r", "at least 1/16")


@pytest.mark.parametrize(
    "recipe",
    [{"r": 1e-4}, {"r": {"default": 16, "5": 1e-4}}, {"overrides": [{"stages": [5], "r": 1e-4}]}, {"min_width": 10**9}],
)
def test_load_refuses_a_file_whose_recipe_asks_for_absurd_blocks(tmp_path, monkeypatch, recipe):
    path = tmp_path / "evil.safetensors"
    meta = {
        "format": "retrofit/1",
        "architecture": "resnet18",
        "model_kwargs": "{}",
        "recipe": json.dumps({"position": "standard", **recipe}),
        "input_size": "[3, 64, 64]",
        "blocks": "8",
    }
    save_file({"w": timm.create_model("resnet18").fc.bias.detach()}, str(path), metadata=meta)
    monkeypatch.setattr("retrofit.files.full.create_model", no_model)
    with pytest.raises(RetrofitError) as err:
        retrofit.load(path)
    assert isinstance(err.value, RecipeError) and "evil.safetensors" in str(err.value)
    assert "\n" not in str(err.value)


def test_wide_blocks_with_the_opt_in():
    recipe = Recipe(r=0.5, allow_wide=True)
    assert recipe.width(64) == 128 and recipe.to_dict()["allow_wide"] is True
    assert Recipe(r={5: 0.5}, allow_wide={5: True}).block_for(5).width(64) == 128
    assert Recipe(r=1 / 16, allow_wide=True).width(4) == 64  # the widest a block can be: 16 C
    with pytest.raises(RecipeError, match="'allow_wide' does not apply to module 'eca'"):
        Recipe(module="eca", allow_wide=True)
    model = retrofit.add_se(timm.create_model("resnet18"), r=0.5, allow_wide=True, stages=[2], input_size=(3, 32, 32))
    assert model.layer1[0].se.fc1.out_channels == 128
