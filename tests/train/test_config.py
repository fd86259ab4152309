"""FinetuneConfig: every option's type, default, bounds and help in one place; the checks it makes, and
retrofit.finetune's keyword arguments as checked overrides of it (issue 23, item 3)."""

import inspect

import pytest

import retrofit
from retrofit import FinetuneConfig, RetrofitError
from retrofit.train.config import DEFAULTS, FIELDS, OPTIONS, bounds_text, markdown_table


def test_the_defaults_and_what_a_run_folder_records():
    config = FinetuneConfig()
    assert (config.epochs, config.lr, config.batch_size, config.smoothing, config.workers) == (1, 1e-3, 32, 0.1, 0)
    assert set(config.decisive()) == set(OPTIONS) - {"workers", "device"}
    assert config.to_dict() == DEFAULTS


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(smoothing=1.5), "smoothing must be in [0, 1), got 1.5"),
        (dict(smoothing=-0.1), "smoothing must be in [0, 1), got -0.1"),
        (dict(mixup=-1), "mixup must be 0 or more, got -1.0"),
        (dict(epochs=-1), "epochs must be 0 or more, got -1"),
        (dict(batch_size=0), "batch_size must be 1 or more, got 0"),
        (dict(ema_decay=1.0), "ema_decay must be in (0, 1), got 1.0"),
        (dict(ema_decay=0), "ema_decay must be in (0, 1), got 0.0"),
        (dict(distill_temperature=0), "distill_temperature must be positive, got 0.0"),
        (dict(lr=0), "lr must be positive, got 0.0"),
        (dict(clip_mode="l2"), "clip_mode must be norm, value or agc, got 'l2'"),
        (dict(epochs=1.5), "epochs must be a whole number, got 1.5"),
        (dict(epochs=True), "epochs must be a whole number, got True"),
        (dict(augment="no"), "augment must be bool, got 'no'"),
        (dict(lr="0.01"), "lr must be float, got '0.01'"),
        (dict(seed=None), "seed must be int, got None"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_option(options, message):
    with pytest.raises(RetrofitError) as err:
        FinetuneConfig(**options)
    assert str(err.value) == message


def test_edges_are_inside_their_bounds_and_ints_become_floats():
    config = FinetuneConfig(smoothing=0, mixup=0, epochs=0, batch_size=1, ema_decay=0.5, lr=1)
    assert config.smoothing == 0.0 and isinstance(config.lr, float) and config.epochs == 0
    with pytest.raises(RetrofitError, match="nothing to train"):
        FinetuneConfig(epochs=0).check_run()


def test_an_unknown_option_names_the_closest_one():
    with pytest.raises(RetrofitError, match=r"unknown option 'smoothig' \(did you mean smoothing\?\)"):
        FinetuneConfig().replace(smoothig=0.2)
    with pytest.raises(RetrofitError, match="unknown option 'lrr'"):
        retrofit.finetune(None, "no-data", lrr=1)  # refused before the model or the data is looked at


def test_finetune_takes_a_config_and_overrides_on_top_of_it():
    config = FinetuneConfig.build(FinetuneConfig(epochs=3, lr=0.1), lr=0.2)
    assert (config.epochs, config.lr) == (3, 0.2)
    assert FinetuneConfig.build({"epochs": 2}).epochs == 2
    with pytest.raises(RetrofitError, match="must be a retrofit.FinetuneConfig"):
        FinetuneConfig.build(3.0)


def test_the_finetune_signature_is_made_from_the_fields():
    params = inspect.signature(retrofit.finetune).parameters
    for name, f in FIELDS.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == f.default, name
    assert list(params)[:3] == ["model", "data", "config"]


def test_bounds_read_as_written():
    assert [bounds_text(FIELDS[n]) for n in ("smoothing", "ema_decay", "mixup", "lr", "batch_size", "opt")] == [
        "0 <= x < 1",
        "0 < x < 1",
        "x >= 0",
        "x > 0",
        "x >= 1",
        "",
    ]


def test_workers_says_where_the_command_line_differs():
    f = FIELDS["workers"]
    assert f.default == 0 and f.metadata["cli_default"] == 2
    assert "Python's default 0" in f.metadata["help"] and "the command line's default is 2" in f.metadata["help"]
    assert "| `workers` | `--workers`, `-j` | `int` | `0 (command line: 2)` |" in markdown_table()
