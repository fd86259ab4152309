"""Every ``>>>`` example in the package's docstrings runs, and prints what it shows (doctest).

The examples are written for a reader: they use ``model`` (a timm resnet50; a small network where the
example trains), ``se_model`` (the resnet50 retrofitted with r=16), ``x`` (an input batch), a data folder
``data/`` and a recipe file ``my_recipe.yaml`` without making them. This test makes them, in an empty
folder, and runs each docstring's examples in order with the module's own names in scope, as
``python -m doctest`` would.
"""

import doctest
import importlib
import pkgutil
import shutil

import pytest
import timm
import torch

import retrofit
from support import make_folder, plain_model

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def modules():
    names = ["retrofit"] + [m.name for m in pkgutil.walk_packages(retrofit.__path__, "retrofit.")]
    return [importlib.import_module(name) for name in names if name != "retrofit.__main__"]


def examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = {}
    for module in modules():
        for test in finder.find(module):
            if test.examples and test.name.startswith(module.__name__):  # each docstring once, where defined
                found[test.name] = test
    return [found[name] for name in sorted(found)]


EXAMPLES = examples()
# the examples that train: there ``model`` is a small timm network (test_resnet, 3 classes), as data/ is small
TRAINS = {"retrofit.sweep.tune.api", "retrofit.train.finetune.finetune"}


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = timm.create_model("resnet50").eval()
    return model, retrofit.add_se(model, r=16)


def test_every_docstring_example_is_collected():
    names = {t.name for t in EXAMPLES}
    assert (
        len(EXAMPLES) >= 17
        and {"retrofit", "retrofit.surgery.insert.add_se", "retrofit.train.finetune.finetune"} <= names
    )


@pytest.mark.parametrize("test", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_docstring_examples_run(test, resnet50, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data")
    shutil.copy(ROOT / "recipes" / "timm.yaml", tmp_path / "my_recipe.yaml")
    model, se = resnet50
    assumed = {
        "retrofit": retrofit,
        "timm": timm,
        "torch": torch,
        "model": model,
        "plain": model,
        "se_model": se,
        "x": torch.randn(2, 3, 224, 224),
    }
    test.globs = {**test.globs, **assumed}
    if test.name in TRAINS:  # a small network for the 3 classes of data/, its weights not fresh
        assumed["model"] = plain_model()
    test.globs = {**test.globs, **assumed}
    report: list[str] = []
    result = doctest.DocTestRunner(optionflags=FLAGS).run(test, out=report.append)
    assert result.failed == 0, "".join(report)
