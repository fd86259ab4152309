"""`retrofit tune` (issue 16) on a tiny ImageFolder: a complete trial is `retrofit finetune` of its recipe and
seed (bitwise), a pruned one ran fewer epochs, one over --max-params never trained, the finish is the sweep's
arms, best_recipe.yaml rebuilds the finalist through add-se; bad input is one error line before training."""

import importlib
import json
import re
import statistics
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import one_error
from safetensors.torch import save_model
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from retrofit.sweep.tune.space import load_space
from support import SIZE, billion_laughs, five_class_model, make_folder, special_files

runner = CliRunner()
ablation_module = importlib.import_module("retrofit.sweep.ablation")  # run_arm's finetune
SEED, EPOCHS, LIMIT = 100, 2, 10.0  # the search seed (the default), epochs per trial, --max-params %
SPACE = ["-r", "2,4,16", "--position", "standard,identity", "--stages", "all,4+5"]
TRAIN = ["-b", "8", "--lr", "1e-2", "-j", "0", "--epochs", str(EPOCHS)]
FAST = dict(batch_size=8, lr=1e-2, workers=0)


def model_args(tmp):
    return [
        "test_resnet",
        "--checkpoint",
        str(tmp / "plain.safetensors"),
        "--num-classes",
        "5",
        "--input-size",
        f"3,{SIZE},{SIZE}",
    ]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One 6-trial tune (successive halving: one rung, at epoch 1), every fine-tune it ran recorded."""
    tmp = tmp_path_factory.mktemp("tune")
    data = make_folder(tmp / "data")
    save_model(five_class_model(), str(tmp / "plain.safetensors"))
    calls = []
    real = ablation_module.finetune

    def recording(model, *args, **kwargs):
        info = retrofit.get_info(model)
        calls.append((info.recipe if info is not None else None, kwargs["seed"], kwargs.get("epochs")))
        return real(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ablation_module, "finetune", recording)
        result = runner.invoke(
            app,
            [
                "tune",
                *model_args(tmp),
                "--data",
                str(data),
                *SPACE,
                *TRAIN,
                "--trials",
                "6",
                "--pruner",
                "sha",
                "--max-params",
                f"{LIMIT:g}%",
                "--finalists",
                "2",
                "--seeds",
                "2",
                "-o",
                str(tmp / "out"),
                "--json",
                str(tmp / "t.json"),
                "--plot",
                str(tmp / "tune.png"),
            ],
        )
    assert result.exit_code == 0, result.output
    return dict(
        tmp=tmp,
        data=data,
        out=tmp / "out",
        output=result.output,
        calls=calls,
        json=json.loads((tmp / "t.json").read_text()),
    )


def recipe_of(row):
    return retrofit.Recipe.from_dict(row["recipe"])


def hand_run(tmp, data, recipe, seed, epochs=EPOCHS):
    """The reference: `torch.manual_seed(seed); add_se(model, recipe)` fine-tuned with `seed`."""
    plain = five_class_model()  # before the seed: building it draws random numbers
    torch.manual_seed(seed)
    se = retrofit.add_se(plain, recipe, input_size=(3, SIZE, SIZE))
    return retrofit.finetune(se, data, epochs=epochs, seed=seed, restore_best=False, **FAST)


def test_complete_trials_are_finetune_runs_pruned_ones_stopped_and_none_over_the_limit_trained(tuned):
    trials = tuned["json"]["trials"]
    states = [t["state"] for t in trials]
    assert states.count("complete") + states.count("pruned") == 6  # --trials counts these two
    complete = [t for t in trials if t["state"] == "complete"]
    pruned = [t for t in trials if t["state"] == "pruned"]
    skipped = [t for t in trials if t["state"] == "skipped"]
    assert complete and pruned and skipped, states
    for t in complete:
        ref = hand_run(tuned["tmp"], tuned["data"], recipe_of(t), SEED)
        assert t["rows"] == ref.rows and t["epochs"] == EPOCHS and t["top1"] == ref.rows[-1]["top1"]
    for t in pruned:  # stopped after the rung at epoch 1: the first rows of the full run
        assert t["epochs"] == 1 < EPOCHS
        assert t["rows"] == hand_run(tuned["tmp"], tuned["data"], recipe_of(t), SEED).rows[:3]
    base = sum(p.numel() for p in five_class_model().parameters())
    trained = [recipe for recipe, *_ in tuned["calls"]]
    for t in skipped:
        assert t["epochs"] == 0 and t["reason"].startswith(f"over --max-params {LIMIT:g}%")
        se = retrofit.add_se(five_class_model(), recipe_of(t), input_size=(3, SIZE, SIZE))
        added = retrofit.measure_overhead(five_class_model(), se, (3, SIZE, SIZE)).added_params
        assert added == t["added_params"] and added > base * LIMIT / 100  # an independent count
        assert recipe_of(t) not in trained  # never fine-tuned, in the search or the finish
    numbers = [t["number"] for t in trials]
    assert numbers == sorted(set(numbers))


def test_one_line_per_trial_the_summary_and_the_verdict_last(tuned):
    trials, lines = tuned["json"]["trials"], tuned["output"].strip().splitlines()
    for t in trials:
        assert sum(ln.startswith(f"[trial {t['number']}] ") for ln in lines) == 1
    spent = sum(t["epochs"] for t in trials)
    trained = [t for t in trials if t["state"] in ("complete", "pruned", "failed")]
    assert f"{spent} training epochs, against {EPOCHS * len(trained)} for {len(trained)} full trials" in tuned["output"]
    assert lines[-1] == tuned["json"]["verdict"]
    rows = tuned["json"]["rows"]
    best_control = max((r for r in rows if r["arm"] != "se"), key=lambda r: r["top1"])
    beat = [r for r in rows if r["arm"] == "se" and r["delta_top1_ci"][0] > 0]
    assert lines[-1].startswith("no recipe beat" if not beat else "") and f"'{best_control['arm']}'" in lines[-1]


def test_the_finish_reruns_finalists_and_controls_on_the_sweeps_seeds(tuned):
    """Finalists: the two best distinct recipes, each re-run on seeds 0 and 1 (not the search seed); the
    controls are the sweep's arms on the same seeds; Δ to the best control with its 95% interval."""
    trials, rows = tuned["json"]["trials"], tuned["json"]["rows"]
    assert [r["arm"] for r in rows] == ["original", "head+norms", "full", "se", "se"]
    done = sorted(
        (t for t in trials if t["state"] == "complete"), key=lambda t: (-t["top1"], t["added_params"], t["number"])
    )
    distinct = []
    for t in done:
        if t["recipe"] not in [d["recipe"] for d in distinct]:
            distinct.append(t)
    assert [r["trial"] for r in rows[3:]] == [t["number"] for t in distinct[:2]]
    first = rows[3]
    for i, seed in enumerate((0, 1)):
        ref = hand_run(tuned["tmp"], tuned["data"], retrofit.Recipe.from_dict(first["recipe"]), seed)
        assert first["top1_per_seed"][i] == ref.rows[-1]["top1"]
        assert first["val_loss_per_seed"][i] == ref.rows[-1]["val_loss"]
    full = retrofit.finetune(
        five_class_model(), tuned["data"], epochs=0, phase2_epochs=EPOCHS, seed=1, restore_best=False, **FAST
    )
    assert rows[2]["top1_per_seed"][1] == full.rows[-1]["top1"]
    best = max(rows[:3], key=lambda r: r["top1"])
    diffs = [a - b for a, b in zip(first["top1_per_seed"], best["top1_per_seed"])]
    half = 12.706 * statistics.stdev(diffs) / 2**0.5  # t(0.975) with one degree of freedom
    assert first["control"] == best["arm"] and first["delta_top1_ci"] == pytest.approx(
        [statistics.fmean(diffs) - half, statistics.fmean(diffs) + half]
    )
    assert {seed for _, seed, _ in tuned["calls"]} == {SEED, 0, 1}


def test_best_recipe_yaml_rebuilds_the_winner_through_add_se(tuned):
    out, rows = tuned["out"], tuned["json"]["rows"]
    win = max((r for r in rows if r["arm"] == "se"), key=lambda r: (r["top1"], -r["params"]))
    text = (out / "best_recipe.yaml").read_text()
    assert retrofit.Recipe.from_dict(yaml.safe_load(text)) == retrofit.Recipe.from_dict(win["recipe"])
    result = runner.invoke(
        app, ["add-se", *model_args(tuned["tmp"]), "--recipe", str(out / "best_recipe.yaml"), "--json", "-"]
    )
    assert result.exit_code == 0, result.output
    built = json.loads(result.stdout)
    trial = next(t for t in tuned["json"]["trials"] if t["number"] == win["trial"])
    assert built["added"]["params"] == win["params"] == trial["added_params"]
    assert built["added"]["macs"] == win["macs"] == trial["added_macs"]
    assert built["added"]["blocks"] == win["blocks"] == trial["blocks"]
    stages = yaml.safe_load(text)["stages"]
    if stages != "all":
        assert [s["stage"] for s in built["stages"]] == stages
    saved = retrofit.load(out / "best.safetensors")  # the winner's seed-0 model, loadable
    assert retrofit.get_info(saved).recipe == retrofit.Recipe.from_dict(win["recipe"])
    assert not (out / "finalists").exists() and not list(out.rglob("*.tmp"))
    assert (tuned["tmp"] / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # --plot drew every trial


def test_the_python_api_gives_the_same_rows_and_summary(tuned, monkeypatch):
    """The same study resumed through retrofit.tune: every trial is done, nothing trains again."""
    monkeypatch.setattr(ablation_module, "finetune", lambda *a, **k: pytest.fail("nothing should train"))
    plain = five_class_model()
    from safetensors.torch import load_model

    load_model(plain, str(tuned["tmp"] / "plain.safetensors"))
    result = retrofit.tune(
        plain,
        tuned["data"],
        {"r": [2, 4, 16], "position": ["standard", "identity"], "stages": ["all", "4+5"]},
        trials=6,
        epochs=EPOCHS,
        input_size=(3, SIZE, SIZE),
        pruner="sha",
        max_params="10%",
        finalists=2,
        seeds=2,
        output_dir=tuned["out"],
        **FAST,
    )
    assert result.trials == tuned["json"]["trials"]
    assert json.loads(json.dumps([r.to_dict() for r in result.rows])) == tuned["json"]["rows"]
    assert result.summary == tuned["json"]["summary"] and result.verdict == tuned["json"]["verdict"]


@pytest.fixture()
def no_training(monkeypatch):
    monkeypatch.setattr(ablation_module, "finetune", lambda *a, **k: pytest.fail("bad input must stop before training"))


@pytest.mark.parametrize(
    "args, words",
    [
        (["--module", "se,se2"], ["--module: bad item 'se2'", "allowed: se, ese, eca"]),
        (["--stages", "all,7"], ["--stages: stage 7 does not exist in test_resnet"]),
        (["-r", "4", "--per-stage", "--stages", "7"], ["stage 7 does not exist"]),
        (["-r", "off", "--per-stage"], ["the space has no recipe with a block"]),
        (["-r", "off,4"], ["--r: 'off' (no block in a stage) needs --per-stage"]),
        (
            ["-r", "4,16", "--stages", "all,5", "--max-params", "1000"],
            [
                # one SE block on stage 5's 96 channels at width 96 / 16 = 6: 2 x 96 x 6 + 6 + 96 = 1,254 parameters
                "no recipe of the space meets --max-params 1,000: the cheapest, standard se r 16 stages 5, adds 1,254"
            ],
        ),
        (
            ["-r", "off,4,16", "--per-stage", "--max-params", "0.01%"],
            ["no recipe of the space meets --max-params 0.01%"],
        ),
        (
            ["--storage", "sqlite:////nonexistent/dir/x.db"],
            ["cannot open --storage sqlite:////nonexistent/dir/x.db", "unable to open database file"],
        ),
        (["--storage", "postgresq://x/y"], ["cannot open --storage postgresq://x/y"]),
        (["--storage", "/nonexistent/dir/study.journal"], ["folder /nonexistent/dir does not exist"]),
        (["--lr", "1e-1:1e-4"], ["--lr: give a positive rate", "low < high"]),
        (["--budget", "1"], ["--budget 1: training epochs are a whole number, at least one trial's 2"]),
        (["--budget", "2 hours"], ["--budget: give training epochs (60) or wall time"]),
        (["--pruner", "median"], ["--pruner: unknown value 'median'"]),
        (["--max-latency", "fast"], ["--max-latency: give a ratio"]),
    ],
)
def test_bad_input_is_one_error_line_before_training(tuned, tmp_path, no_training, args, words):
    trials = [] if "--budget" in args else ["--trials", "3"]
    result = runner.invoke(
        app,
        [
            "tune",
            *model_args(tuned["tmp"]),
            "--data",
            str(tuned["data"]),
            *TRAIN,
            *trials,
            "-o",
            str(tmp_path / "out"),
            *(SPACE if "-r" not in args and "--stages" not in args else []),
            *args,
        ],
    )
    one_error(result, *words)


def test_bad_files_and_a_missing_budget_are_one_error_line(tuned, tmp_path, no_training):
    def tune(*args):
        return runner.invoke(
            app,
            [
                "tune",
                *model_args(tuned["tmp"]),
                "--data",
                str(tuned["data"]),
                *TRAIN,
                "-o",
                str(tmp_path / "out"),
                *args,
            ],
        )

    one_error(tune(*SPACE), "give --trials N or --budget")
    (tmp_path / "space.yaml").write_text("position: [standard]\nratio: [4, 16]\n")
    one_error(
        tune("--trials", "2", "--space", str(tmp_path / "space.yaml")),
        "space.yaml: unknown key 'ratio'",
        "the keys are position, r, stages",
    )
    (tmp_path / "space.yaml").write_text("r: {2: [off, 4], 9: [off, 8]}\n")
    one_error(tune("--trials", "2", "--space", str(tmp_path / "space.yaml")), "--r: stage 9 does not exist")
    (tmp_path / "space.yaml").write_text("r: [4, 16]\n")
    one_error(
        tune("--trials", "2", "--space", str(tmp_path / "space.yaml"), "--position", "pre"),
        "give the space as flags or as --space FILE, not both (--position with --space)",
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    one_error(
        tune("--trials", "2", *SPACE, "--storage", str(notes)), f"cannot open --storage {notes}: not an Optuna journal"
    )
    assert notes.read_text() == "my notes\n"  # someone else's file is never written into


@pytest.mark.parametrize(
    "change, part", [(["-r", "2,4"], "space"), (["--smoothing", "0"], "settings"), ("data", "data"), ("model", "model")]
)
def test_a_resumed_study_must_be_the_same_search(tuned, tmp_path, no_training, change, part):
    args = [
        "tune",
        *model_args(tuned["tmp"]),
        "--data",
        str(tuned["data"]),
        *SPACE,
        *TRAIN,
        "--trials",
        "6",
        "--pruner",
        "sha",
        "--max-params",
        f"{LIMIT:g}%",
        "-o",
        str(tuned["out"]),
    ]
    if change == "data":
        args[args.index("--data") + 1] = str(make_folder(tmp_path / "other", train=9))
    elif change == "model":
        import timm
        from conftest import randomize

        save_model(randomize(timm.create_model("test_resnet", num_classes=5), seed=1), str(tmp_path / "m.safetensors"))
        args[args.index("--checkpoint") + 1] = str(tmp_path / "m.safetensors")
    else:
        args += change
    journal = (tuned["out"] / "study.journal").read_bytes()
    result = runner.invoke(app, args)
    one_error(
        result,
        f"study 'tune' in {tuned['out'] / 'study.journal'} was started with another {part} (",
        "use another --output-dir or --study",
    )
    assert {"data": "train.images: 24, now 27", "settings": "smoothing: 0.1, now 0.0"}.get(part, "") in result.output
    assert (tuned["out"] / "study.journal").read_bytes() == journal


def test_without_optuna_the_command_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['optuna'] = None; sys.argv = ['retrofit', 'tune', 'test_resnet', '--data', "
        f"{str(tmp_path)!r}, '--trials', '1']; from retrofit.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: retrofit tune needs Optuna, which is not installed; install "
        "the extra: pip install -e '.[tune]' (from a checkout; or pip install "
        "-c constraints.txt 'retrofit[tune]')"
    ]


@pytest.mark.parametrize(
    "text, words",
    [
        ("r: " + "[" * 50_000 + "]" * 50_000 + "\n", "is nested more than 32 levels deep at line 1"),
        (billion_laughs("r", 4), "uses an alias (*a0) at line 1"),
    ],
)
def test_a_hostile_space_file_is_one_short_line(tmp_path, text, words):
    """Issue 22.1-2: a --space nested 50,000 deep ended in RecursionError, aliases expanded unbounded."""
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(retrofit.RetrofitError) as caught:
        load_space(path, retrofit.Recipe())
    assert str(caught.value).startswith(f"--space {path}: {words}") and len(str(caught.value)) <= 300


@pytest.mark.parametrize("kind", ["zero", "urandom", "fifo", "dir", "loop"])
def test_a_special_space_file_is_named_and_never_read(tmp_path, kind):
    """Issue 22.4: a FIFO as --space waited for a writer forever, /dev/zero ran out of memory."""
    path, what = special_files(tmp_path, ".yaml")[kind]
    with pytest.raises(retrofit.RetrofitError, match=re.escape(f"--space {path} {what}")):
        load_space(path, retrofit.Recipe())


FIRST = '{"op_code":0,"worker_id":"w","study_name":"tune","directions":[2]}\n'
DAMAGED = {
    "unknown op_code": '{"op_code": 999, "worker_id": "x"}',
    "a list": "[1, 2]",
    "no study_id": '{"op_code": 4, "worker_id": "w"}',
}


@pytest.mark.parametrize("given", [False, True], ids=["default store", "--storage FILE"])
@pytest.mark.parametrize("line", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_journal_line_that_is_json_but_no_entry_is_one_error_line(tuned, tmp_path, no_training, line, given):
    """Optuna's replay raised AssertionError ("Should not reach"), TypeError or KeyError: an internal error."""
    out = tmp_path / "out"
    out.mkdir()
    journal = tmp_path / "shared.journal" if given else out / "study.journal"
    journal.write_text(FIRST + line + "\n")
    result = runner.invoke(
        app,
        [
            "tune",
            *model_args(tuned["tmp"]),
            "--data",
            str(tuned["data"]),
            *SPACE,
            *TRAIN,
            "--trials",
            "2",
            "-o",
            str(out),
            *(["--storage", str(journal)] if given else []),
        ],
    )
    one_error(
        result,
        f"cannot read --storage {journal}: line 2 is not an Optuna journal entry (",
        "restore the file from a copy, or use another --output-dir or --storage",
    )
    assert journal.read_text() == FIRST + line + "\n"  # never written into


def weightless(tmp, data, *extra):
    """`retrofit tune` of a model named without weights (random ones), on data with 3 classes."""
    return [
        "tune",
        "test_resnet",
        "--num-classes",
        "3",
        "--input-size",
        f"3,{SIZE},{SIZE}",
        "--data",
        str(data),
        "--epochs",
        "1",
        "-b",
        "8",
        "--lr",
        "1e-2",
        "-j",
        "0",
        "--finalists",
        "0",
        "-o",
        str(tmp / "out"),
        *extra,
    ]


def test_a_model_named_without_weights_gets_them_from_the_search_seed_so_the_same_command_resumes(tuned, tmp_path):
    """Each process drew other random weights: a rerun (or a second machine) was refused for another model."""
    args = weightless(tmp_path, tuned["data"], "-r", "4,8,16", "--position", "identity")
    first = runner.invoke(app, [*args, "--trials", "1"])
    assert first.exit_code == 0, first.output
    first_rows = json.loads((tmp_path / "out" / "trials.jsonl").read_text().splitlines()[0])
    torch.manual_seed(12345)  # whatever the process's generator holds, the model is the seed's
    again = runner.invoke(app, [*args, "--trials", "2"])
    assert again.exit_code == 0, again.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text().splitlines()]
    assert rows[0] == first_rows and first_rows["state"] == "complete"  # resumed: trial 0 kept as it was
    assert [r["state"] for r in rows if r["state"] != "duplicate"] == ["complete", "complete"]  # and one more
    import optuna
    import timm

    from retrofit.sweep.tune.storage import open_storage
    from retrofit.sweep.tune.study import IDENTITY, model_identity

    torch.manual_seed(100)  # --search-seed's default
    reference = timm.create_model("test_resnet", num_classes=3)
    stored = optuna.load_study(study_name="tune", storage=open_storage(tmp_path / "out" / "study.journal"))
    assert (
        stored.user_attrs[IDENTITY]["model"]["value"]["weights"]
        == model_identity(reference, (3, SIZE, SIZE))["weights"]
    )


def test_a_recipe_that_fails_teaches_the_sampler_and_is_never_trained_again(tuned, tmp_path):
    """Random weights (timm's zero_init_last): at the standard position no block gets a gradient, so those
    recipes fail; identity and post sit off the zeroed branch. A failed trial is stored as the sampler can
    learn from it (PRUNED with a violated constraint: Optuna's samplers skip FAIL trials), it does not count,
    and its recipe is never fine-tuned again."""
    calls = []
    real = ablation_module.finetune

    def recording(model, *args, **kwargs):
        calls.append(json.dumps(retrofit.get_info(model).recipe.to_dict(), sort_keys=True))
        return real(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ablation_module, "finetune", recording)
        result = runner.invoke(
            app,
            weightless(
                tmp_path,
                tuned["data"],
                "--position",
                "standard,identity,post",
                "-r",
                "4,16",
                "--stages",
                "all,4+5",
                "--trials",
                "4",
                "--json",
                str(tmp_path / "t.json"),
            ),
        )
    assert result.exit_code == 0, result.output
    trials = json.loads((tmp_path / "t.json").read_text())["trials"]
    failed = [t for t in trials if t["state"] == "failed"]
    assert failed and {t["recipe"]["position"] for t in failed} == {"standard"}, [t["state"] for t in trials]
    assert all(t["reason"].startswith("nothing trainable got a gradient") for t in failed)
    assert sum(t["state"] in ("complete", "pruned") for t in trials) == 4
    assert len(calls) == len(set(calls))  # no recipe fine-tuned twice, failed ones included
    import optuna
    from optuna.trial import TrialState

    from retrofit.sweep.tune.storage import open_storage

    study = optuna.load_study(study_name="tune", storage=open_storage(tmp_path / "out" / "study.journal"))
    for t in failed:
        frozen = study.trials[t["number"]]
        assert frozen.state == TrialState.PRUNED and frozen.constraints == {"failed": 1.0}


@pytest.fixture(scope="module")
def on_postgres(tuned, postgres):
    """A short tune whose study is on the PostgreSQL server."""
    url = postgres.database()
    args = [
        "tune",
        *model_args(tuned["tmp"]),
        "--data",
        str(tuned["data"]),
        "-r",
        "4,16",
        *TRAIN[:-2],
        "--epochs",
        "1",
        "--trials",
        "1",
        "--finalists",
        "0",
        "--storage",
        url,
        "-o",
        str(tuned["tmp"] / "pg"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return url, args


@pytest.mark.parametrize("part", ["space", "data", "model"])
def test_a_resumed_study_on_postgresql_must_be_the_same_search(tuned, tmp_path, on_postgres, no_training, part):
    url, args = on_postgres
    args = list(args)
    if part == "space":
        args[args.index("-r") + 1] = "2,4"
    elif part == "data":
        args[args.index("--data") + 1] = str(make_folder(tmp_path / "other", train=9))
    else:
        import timm
        from conftest import randomize

        save_model(randomize(timm.create_model("test_resnet", num_classes=5), seed=1), str(tmp_path / "m.safetensors"))
        args[args.index("--checkpoint") + 1] = str(tmp_path / "m.safetensors")
    one_error(
        runner.invoke(app, args),
        f"study 'tune' in {url} was started with another {part} (",
        "use another --output-dir or --study",
    )
