"""Block fields per stage and per module (issue 9 item 2): maps, overrides and their priority, against
hand-written closed forms, real insertions, saved files, sweeps, the check, and bad input."""

import json

import pytest
import timm
import torch
import yaml
from conftest import max_rel_diff, one_error, randomize
from typer.testing import CliRunner

import retrofit
from retrofit import Recipe, RecipeError, RetrofitError
from retrofit.cli import app
from retrofit.graph.forward import installed
from retrofit.measure.overhead import measure_overhead
from retrofit.sweep.check import check_model
from retrofit.sweep.grid import sweep

runner = CliRunner()
SMALL = (3, 64, 64)
N = (3, 4, 6, 3)  # ResNet-50 bottleneck units in stages 2..5
C_OUT = (256, 512, 1024, 2048)  # their output widths
R_MAP = {2: 8, 3: 8, 4: 16, 5: 32}


def se_params(c, r):
    """2 C w weights + w + C biases, w = C / r (every width here divides exactly)."""
    w = c // r
    return 2 * c * w + w + c


@pytest.fixture(scope="module")
def resnet50():
    return timm.create_model("resnet50")


@pytest.fixture(scope="module")
def resnet18():
    return randomize(timm.create_model("resnet18"))


# -- the acceptance test: per-stage r, stage by stage, on resnet50 ------------------------------------
def test_per_stage_r_adds_the_closed_form_stage_by_stage(resnet50):
    expected = {s: n * se_params(c, R_MAP[s]) for s, n, c in zip((2, 3, 4, 5), N, C_OUT)}
    se = retrofit.add_se(resnet50, r=R_MAP, input_size=SMALL)  # measured on the real model
    stages = {s.stage: s.params for s in measure_overhead(resnet50, se, input_size=SMALL).stages()}
    assert stages == expected
    assert [b.width for b in retrofit.get_info(se).blocks] == [
        c // R_MAP[s] for s, n, c in zip((2, 3, 4, 5), N, C_OUT) for _ in range(n)
    ]
    result = runner.invoke(
        app, ["add-se", "resnet50", "--r", "2:8,3:8,4:16,5:32", "--input-size", "3,64,64", "--json", "-"]
    )  # planned on meta, as the CLI does
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {s["stage"]: s["params"] for s in data["stages"]} == expected
    assert data["recipe"]["r"] == {"default": 16, "2": 8, "3": 8, "4": 16, "5": 32}
    assert {b["width"] for b in data["blocks"]} == {32, 64}


def test_recipe_carries_every_block_field_with_its_default():
    from dataclasses import fields

    from retrofit.blocks.config import BlockConfig

    recipe_fields = {f.name: f.default for f in fields(Recipe)}
    assert all(recipe_fields[f.name] == f.default for f in fields(BlockConfig))
    assert Recipe().block == BlockConfig() and Recipe(r=8, gate="tanh").block == BlockConfig(r=8, gate="tanh")


# -- priority ---------------------------------------------------------------------------------------
def test_priority_base_then_maps_then_overrides_in_order():
    recipe = Recipe(
        r=4,
        gate={5: "hard_sigmoid"},
        overrides=[{"stages": [4, 5], "r": 32}, {"only": ["layer4.1"], "r": 8}, {"only": ["layer4"], "module": "eca"}],
    )
    assert recipe.block_for(2, "layer1.0").r == 4  # base
    assert recipe.block_for(4, "layer3.0").r == 32  # override 1 over the base
    assert recipe.block_for(5, "layer4.0").gate == "hard_sigmoid"  # a map over the base
    last = recipe.block_for(5, "layer4.1")  # override 3 wins; r from lower entries drops
    assert (last.module, last.r, last.gate) == ("eca", 16, "hard_sigmoid")
    assert Recipe(r={"default": 8, 5: 32}).block_for(3).r == 8
    assert Recipe(r=8).replace(r="5:32").block_for(3).r == 8  # a map keeps the recipe's base r
    assert Recipe(r=8).replace(r={5: 32, "default": 2}).block_for(3).r == 2


def test_a_field_set_over_its_module_is_an_error_not_ignored():
    with pytest.raises(RecipeError, match=r"'r' \(override 2\) does not apply to module 'eca' \(override 1\)"):
        Recipe(overrides=[{"stages": [5], "module": "eca"}, {"stages": [5], "r": 8}])
    with pytest.raises(RecipeError, match=r"'r' \(its per-stage map\) does not apply to module 'eca'"):
        Recipe(module={5: "eca"}, r={5: 8})
    # with a glob, only a model can tell which sites combine: checked when planned
    recipe = Recipe(overrides=[{"only": ["layer4.1"], "module": "eca"}, {"only": ["layer4"], "r": 8}])
    with pytest.raises(RecipeError, match="at stage 5 with overrides 1, 2"):
        recipe.block_for(5, "layer4.1")


def test_mixed_modules_keep_the_function_and_fuse_only_se(resnet18):
    se = retrofit.add_se(resnet18, r={2: 4}, module={5: "eca"}, input_size=SMALL).eval()
    kinds = {b.path: type(se.get_submodule(b.path)).__name__ for b in retrofit.get_info(se).blocks}
    assert kinds["layer1.0.se"] == "SqueezeExcite" and kinds["layer4.1.se"] == "EcaModule"
    assert se.layer1[0].se.width == 16 and se.layer2[0].se.width == 8
    se_calls = [(n.target, len(n.args)) for n in installed(se.layer1[0]).graph.nodes if n.op == "call_module"]
    eca_calls = [(n.target, len(n.args)) for n in installed(se.layer4[1]).graph.nodes if n.op == "call_module"]
    assert ("se", 2) in se_calls and ("se", 1) in eca_calls  # SE takes the sum; ECA only scales
    x = torch.randn(2, *SMALL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_rel_diff(se(x), resnet18.eval()(x)) <= 1e-5


# -- saved files, sweeps, the check ----------------------------------------------------------------
def test_save_and_load_rebuild_mixed_widths_and_modules(resnet18, tmp_path):
    recipe = Recipe(
        r={2: 4, 5: 32}, gate={3: "hard_sigmoid"}, init="paper", overrides=[{"only": ["layer4.1"], "module": "cbam"}]
    )
    se = retrofit.add_se(resnet18, recipe, input_size=SMALL).eval()
    path = retrofit.save(se, tmp_path / "mixed.safetensors")
    again = retrofit.load(path).eval()
    assert retrofit.get_info(again).recipe == recipe
    assert [(b.path, b.width, b.config) for b in retrofit.get_info(again).blocks] == [
        (b.path, b.width, b.config) for b in retrofit.get_info(se).blocks
    ]
    assert type(again.layer4[1].se).__name__ == "CbamModule" and again.layer4[0].se.width == 16
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        torch.testing.assert_close(again(x), se(x), rtol=0, atol=0)


def test_recipe_round_trips_through_json_and_yaml():
    recipe = Recipe(
        r={"default": 8, 4: 16, 5: 32},
        bias={2: False},
        gate={2: "sigmoid", 5: "tanh"},
        overrides=[{"stages": 5, "only": "layer4.*", "module": "se", "divisor": 8}],
    )
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False))) == recipe
    assert "r 8 (stage 4: 16, stage 5: 32)" in recipe.describe()
    assert "overrides 1. stages 5 only layer4.*: divisor 8, module se" in recipe.describe()
    assert "overrides" not in Recipe().to_dict()  # a recipe without them writes what it did before


def test_sweep_takes_per_stage_maps_as_r_values(resnet50):
    rows = sweep(resnet50, r=[16, R_MAP], input_size=SMALL)
    assert [row.r_label for row in rows] == ["16", "2:8,3:8,4:16,5:32"]
    assert rows[1].params == sum(n * se_params(c, R_MAP[s]) for s, n, c in zip((2, 3, 4, 5), N, C_OUT))
    result = runner.invoke(
        app,
        ["sweep", "resnet50", "--r", "16;2:8,3:8,4:16,5:32;default:8,5:32", "--input-size", "3,64,64", "--json", "-"],
    )
    assert result.exit_code == 0, result.output
    got = [(row["r_label"], row["params"]) for row in json.loads(result.stdout)["rows"]]
    assert got == [
        ("16", rows[0].params),
        ("2:8,3:8,4:16,5:32", rows[1].params),
        ("default:8,5:32", sum(n * se_params(c, 32 if s == 5 else 8) for s, n, c in zip((2, 3, 4, 5), N, C_OUT))),
    ]


def test_planned_counts_equal_a_real_insertion_with_mixed_modules(resnet18):
    recipe = Recipe(r={2: 4, 4: 32}, module={3: "cbam"}, overrides=[{"only": ["layer4.0"], "module": "gc"}])
    (row,) = sweep(resnet18, r=[recipe.r], recipe=recipe, input_size=SMALL)  # the r axis sets r
    real = measure_overhead(resnet18, retrofit.add_se(resnet18, recipe, input_size=SMALL), input_size=SMALL)
    assert (row.params, row.macs) == (real.added_params, real.added_macs)
    assert [b.module for b in real.blocks] == ["se"] * 2 + ["cbam"] * 2 + ["se"] * 2 + ["gc", "se"]


def test_check_verifies_per_stage_widths_against_the_closed_form():
    result = check_model(timm.create_model("resnet10t"), input_size=(3, 32, 32), inplace=True, r="2:4,5:32")
    assert result.ok, result.reason
    # one BasicBlock per stage, 64..512 channels, stages 2..5; unnamed stages: r 16
    assert result.params_added["standard"] == sum(se_params(c, r) for c, r in zip((64, 128, 256, 512), (4, 16, 16, 32)))


# -- bad input: one line each -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["--r", "2:"], ["recipe field 'r'", "'2:'", "stage:value"]),
        (["--r", "x:8"], ["recipe field 'r'", "'x' is not a stage number"]),
        (["--r", "2:8,2:4"], ["stage 2 is given twice"]),
        (["--r", "2:8,6:4"], ["recipe field 'r': stage 6 does not exist in resnet18", "2,3,4,5"]),
        (["--gate", "5:softmax"], ["recipe field 'gate' (stage 5): unknown value 'softmax'"]),
        (["--module", "5:eca", "--r", "5:8"], ["'r' (its per-stage map) does not apply to module 'eca'"]),
    ],
)
def test_cli_malformed_maps_are_one_error_line(args, words):
    one_error(runner.invoke(app, ["add-se", "resnet18", *args, "--input-size", "3,64,64"]), *words)


@pytest.mark.parametrize(
    "text, words",
    [
        ("r: {two: 8}\n", ["'two' is not a stage number"]),
        ("r: {2: {3: 4}}\n", ["stage 2 maps to {3: 4}, not to one value"]),
        ("r: {2: [8]}\n", ["not to one value"]),
        ("overrides: [{only: [layer9.*], r: 4}]\n", ["entry 1: only glob 'layer9.*' matches no site"]),
        ("overrides: [{stages: [5], only: [layer1], r: 4}]\n", ["only glob 'layer1' matches no site", "in stages 5"]),
        ("overrides: [{stages: [7], r: 4}]\n", ["entry 1: stage 7 does not exist in resnet18"]),
        ("overrides: {stages: [4], r: 4}\n", ["expected a list of entries"]),
        ("overrides: [{stages: [4], ratio: 4}]\n", ["unknown key 'ratio'"]),
        ("overrides: [{stages: [4]}]\n", ["sets no block field"]),
    ],
)
def test_recipe_files_with_bad_maps_are_one_error_line(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    one_error(runner.invoke(app, ["add-se", "resnet18", "--recipe", str(path), "--input-size", "3,64,64"]), *words)


def test_bad_maps_in_sweep_and_check_are_one_error_line():
    one_error(
        runner.invoke(app, ["sweep", "resnet18", "--r", "16;2:8,7:4", "--input-size", "3,64,64"]),
        "--r: stage 7 does not exist in resnet18",
    )
    one_error(runner.invoke(app, ["sweep", "resnet18", "--r", "16;;2:8"]), "--r", "item 2", "empty", "';'")
    one_error(runner.invoke(app, ["check", "resnet18", "--r", "2:x"]), "recipe field 'r' (stage 2)")
    with pytest.raises(RetrofitError, match="stage 9 does not exist"):
        retrofit.add_se(timm.create_model("resnet18"), r={9: 4}, input_size=SMALL)
