"""retrofit.get_info: what a retrofit did, as a frozen record; the private attribute it lives in is read
by its owner (retrofit/surgery/info.py) alone, never by the package's other modules, the docs or the tests."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import timm
import torch

import retrofit
from support import Net

ROOT = Path(__file__).resolve().parents[2]


def test_get_info_is_a_frozen_record_and_none_for_a_model_retrofit_did_not_touch():
    plain = timm.create_model("resnet18")
    assert retrofit.get_info(plain) is None
    se = retrofit.add_se(plain, r=4, input_size=(3, 64, 64))
    info = retrofit.get_info(se)
    assert isinstance(info, retrofit.RetrofitInfo) and info.architecture == "resnet18"
    assert info.recipe == retrofit.Recipe(r=4) and info.input_size == (3, 64, 64)
    assert [b.path for b in info.blocks] == [f"layer{i}.{j}.se" for i in range(1, 5) for j in range(2)]
    assert info.sites == tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))
    assert all(isinstance(b, retrofit.BlockInfo) and b.site_kind == "residual" for b in info.blocks)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.weights = "random"
    assert retrofit.get_info(plain) is None  # add_se copied: the original is untouched
    assert retrofit.get_info(retrofit.strip(se)) is None


def test_the_record_follows_deep_copies_and_graph_modules():
    net = Net().eval()
    se = retrofit.add_se(net, r=4, input_size=(3, 16, 16))
    assert retrofit.get_info(copy.deepcopy(se)) == retrofit.get_info(se)
    gm = retrofit.add_se(torch.fx.symbolic_trace(net), r=4, input_size=(3, 16, 16))
    assert [b.path for b in retrofit.get_info(copy.deepcopy(gm)).blocks] == ["se"]


def test_a_second_retrofit_adds_its_blocks_and_keeps_the_provenance():
    from retrofit.surgery.info import update_info

    se = retrofit.add_se(timm.create_model("resnet18"), r=4, only=["layer1.*"], input_size=(3, 64, 64))
    update_info(se, weights="checkpoint")
    again = retrofit.add_se(se, position="post", r=8, only=["layer2.*"], input_size=(3, 64, 64))
    info = retrofit.get_info(again)
    assert [b.path for b in info.blocks] == ["layer1.0.se", "layer1.1.se", "layer2.0.se_post", "layer2.1.se_post"]
    assert info.weights == "checkpoint" and info.recipe.position == "post"


def test_only_its_owner_reads_the_private_attribute():
    """No module of the package but retrofit/surgery/info.py, and no test, doc or benchmark names the
    attribute the record lives in: they all go through get_info (issue 23, item 2)."""
    attribute = re.compile(r"""(\._retrofit\b|["']_retrofit["'])""")
    owner = ROOT / "retrofit" / "surgery" / "info.py"
    found = []
    for path in [
        *ROOT.glob("retrofit/**/*.py"),
        *ROOT.glob("tests/**/*.py"),
        *ROOT.glob("benchmarks/*.py"),
        *ROOT.glob("tools/*.py"),
        *ROOT.glob("docs/**/*.md"),
        ROOT / "README.md",
    ]:
        if path in (owner, Path(__file__)):
            continue
        found += [
            f"{path.relative_to(ROOT)}:{i}"
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if attribute.search(line)
        ]
    assert found == []
    assert attribute.search(owner.read_text())  # the pattern does find the owner's own use
