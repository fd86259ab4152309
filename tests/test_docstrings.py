"""Every ``>>>`` example in the package's docstrings runs, and prints what it shows (doctest).

The examples are written for a reader: they use ``model`` (a timm resnet50; a small network where the
example trains), ``se_model`` (the resnet50 retrofitted with r=16), ``x`` (an input batch), a data folder
``data/`` and a recipe file ``my_recipe.yaml`` without making them. This test makes them, in an empty
folder, and runs each docstring's examples in order with the module's own names in scope, as
``python -m doctest`` would.
"""

import copy
import doctest
import importlib
import pkgutil
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

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
TRAINS = {"retrofit.sweep.tune.api", "retrofit.train.finetune.finetune", "retrofit.events", "retrofit.sweep.grid.sweep"}
# the examples that read a fine-tuned model's gates: there ``model`` is test_resnet retrofitted and fine-tuned on
# data/ (a copy: fold and inspect must not change the fixture)
TUNED = {"retrofit.measure.excitation_plot", "retrofit.sweep.fold.fold", "retrofit.train.inspect.inspect"}
# the examples that load the weights file of ``model`` by name
WEIGHTS = {"retrofit.files.create", "retrofit.files.create.create_model", "retrofit.files.pretrained.from_pretrained"}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """test_resnet retrofitted (r 4) and fine-tuned one epoch on a 3-class data/ like the test's."""
    data = make_folder(tmp_path_factory.mktemp("tuned") / "data")
    se = retrofit.add_se(plain_model(), r=4, input_size=(3, 32, 32))
    retrofit.finetune(se, data, epochs=1, batch_size=8, lr=1e-2)
    return se


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
def test_docstring_examples_run(test, resnet50, tuned, tmp_path, monkeypatch):
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
    if test.name in TUNED:
        assumed["model"] = copy.deepcopy(tuned)
    if test.name in WEIGHTS:
        save_file(model.state_dict(), tmp_path / "my_resnet50.safetensors")
    test.globs = {**test.globs, **assumed}
    report: list[str] = []
    result = doctest.DocTestRunner(optionflags=FLAGS).run(test, out=report.append)
    assert result.failed == 0, "".join(report)
