"""`retrofit tune` across processes: a kill -9 during a trial and the same command again; two workers on one
journal; a two-process torchrun against one process. Each in real subprocesses, on a tiny ImageFolder."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from safetensors.torch import save_model

from retrofit.sweep.tune.storage import open_storage
from support import SIZE, five_class_model, make_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(tmp, out, *extra):
    return [sys.executable, "-m", "retrofit", "tune", "test_resnet", "--checkpoint", str(tmp / "plain.safetensors"),
            "--num-classes", "5", "--input-size", f"3,{SIZE},{SIZE}", "--data", str(tmp / "data"),
            "-r", "off,4,16", "--per-stage", "--position", "standard,identity", "--epochs", "3", "-b", "8",
            "--lr", "1e-2", "-j", "0", "--pruner", "sha", "--finalists", "2", "--seeds", "1", "-o", str(out), *extra]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("procs")
    make_folder(tmp / "data")
    save_model(five_class_model(), str(tmp / "plain.safetensors"))
    return tmp


def study_of(out):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="tune", storage=open_storage(out / "study.journal"))


def counted(t):
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not t.user_attrs.get("retrofit:uncounted")


def no_leftovers(out):
    """Nothing half-written: no temporary of an atomic write, no lock of a dead worker, every file whole."""
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not list((out / "workers").iterdir())
    for line in (out / "trials.jsonl").read_text().splitlines():
        json.loads(line)
    json.loads((out / "tune.json").read_text())


def test_kill_9_during_a_trial_then_the_same_command_finishes_the_study(folder):
    out = folder / "killed"
    # no pruner: every trial runs its 3 epochs, so one is caught between two (with a pruner, which trials
    # run on past epoch 1 depends on the draws, and a killed run might never be mid-trial)
    kill = ("--pruner", "none")
    proc = subprocess.Popen(command(folder, out, "--trials", "5", *kill), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        if (out / "study.journal").is_file():
            try:
                running = [t for t in study_of(out).trials if t.state == TrialState.RUNNING and t.number >= 2
                           and t.intermediate_values]
            except Exception:  # noqa: BLE001 - the study is not there yet, or being written: look again
                running = []
            if running:  # mid-trial: an epoch reported, more to come
                victim = running[0].number
                os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert victim is not None, "no trial was caught mid-run"
    before = {t.number: (t.state, t.value, t.datetime_complete) for t in study_of(out).trials if t.state.is_finished()}
    again = subprocess.run(command(folder, out, "--trials", "5", *kill), env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = study_of(out).trials
    for number, kept in before.items():  # the finished trials are kept as they were, not re-run
        t = trials[number]
        assert (t.state, t.value, t.datetime_complete) == kept
    assert trials[victim].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retrofit:retry_of") == victim]
    assert len(retry) == 1 and retry[0].params == trials[victim].params and counted(retry[0])
    assert f"[trial {victim}] its process is gone; marked failed, its recipe queued again" in again.stderr
    assert sum(counted(t) for t in trials) == 5
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    numbers = [r["number"] for r in rows]
    assert len(numbers) == len(set(numbers))
    assert again.stdout.strip().splitlines()[-1] == json.loads((out / "tune.json").read_text())["verdict"]
    no_leftovers(out)


def test_two_workers_on_one_journal_share_the_trials_and_end_with_one_table(folder):
    out = folder / "two"
    procs = [subprocess.Popen(command(folder, out, "--trials", "8", "--json", str(folder / f"w{i}.json")), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    trials = [t for t in study_of(out).trials if not t.user_attrs.get("retrofit:surplus")]
    assert sum(counted(t) for t in trials) == 8
    pids = {t.user_attrs["retrofit:worker"]["pid"] for t in trials if counted(t)}
    assert pids == {p.pid for p in procs}  # both did trials
    trained = [t.user_attrs["recipe"] for t in trials if "rows" in t.user_attrs]
    assert len(trained) == len(set(trained))  # no recipe trained twice, by either of them
    # TPE's 2 random start-up trials (8 // 3): one fixed-seed sampler in each process would draw them equal
    assert trials[0].params != trials[1].params
    tables = [json.loads((folder / f"w{i}.json").read_text()) for i in range(2)]
    assert tables[0]["rows"] == tables[1]["rows"] and tables[0]["verdict"] == tables[1]["verdict"]
    assert results[0][0].strip().splitlines()[-1] == results[1][0].strip().splitlines()[-1] == tables[0]["verdict"]
    final = optuna.load_study(study_name="tune:final", storage=open_storage(out / "study.journal"))
    done = [t.params["job"] for t in final.trials if t.state == TrialState.COMPLETE]
    assert len(done) == len(set(done)) == 2 * 1 + 2 * 1  # two controls and two finalists, one seed: each run once
    no_leftovers(out)


RANKS = '''
import json, os, sys
sys.path.insert(0, {tests!r})
import retrofit
from support import five_class_model, SIZE
out, data = sys.argv[1], sys.argv[2]
res = retrofit.tune(five_class_model(), data, {{"r": [4, 16], "position": ["standard", "identity"]}}, trials=3,
                    epochs=2, input_size=(3, SIZE, SIZE), pruner="sha", finalists=1, seeds=2, output_dir=out,
                    train=dict(batch_size=8, lr=1e-2, workers=0, augment=False, device="cpu"))
with open(out + ".rank" + os.environ.get("RANK", "0") + ".json", "w") as f:
    json.dump({{"trained": res.trained, "trials": res.trials, "rows": [r.to_dict() for r in res.rows]}}, f)
'''


def test_torchrun_two_processes_train_the_same_trials_as_one(folder, tmp_path):
    """Rank 0 asks the sampler and decides each prune; both ranks train the same recipes for the same epochs
    with the same all-reduced top-1, and every number equals one process's, except the full control's
    (BatchNorm statistics per process, as the sweep documents)."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS.format(tests=str(Path(__file__).parents[1])))
    data = str(folder / "data")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two"), data], capture_output=True, text=True, timeout=600,
                         env=ENV, cwd=tmp_path)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), data], capture_output=True, text=True,
                         timeout=600, env=ENV, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    r0, r1, single = (json.loads((tmp_path / name).read_text()) for name in ("two.rank0.json", "two.rank1.json",
                                                                              "one.rank0.json"))
    assert r0["trained"] and r0["trained"] == r1["trained"]  # the same runs on both ranks
    assert r0["trials"] == r1["trials"] and r0["rows"] == r1["rows"]  # every rank returns the same result
    def runs(result):  # the full control's top-1 may differ: BatchNorm statistics per process
        return [(t["what"], t["epochs"], t["top1"] if '"arm":"full"' not in t["what"] else None)
                for t in result["trained"]]
    assert runs(r0) == runs(single)
    assert any(t["state"] == "pruned" for t in single["trials"])
    assert [(t["number"], t["state"], t["label"], t["top1"]) for t in r0["trials"]] == [
        (t["number"], t["state"], t["label"], t["top1"]) for t in single["trials"]]
    for a, b in zip(r0["rows"], single["rows"]):
        assert a["arm"] == b["arm"]
        if a["arm"] != "full":
            assert a["top1_per_seed"] == b["top1_per_seed"]
            assert a["val_loss_per_seed"] == pytest.approx(b["val_loss_per_seed"], rel=1e-5)
