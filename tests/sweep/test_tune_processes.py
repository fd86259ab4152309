"""`retrofit tune` across processes, on the journal and on a real PostgreSQL server: a kill -9 during a trial
and the same command again; two workers at once (one of them on "another machine" whose clock is 10 minutes
behind); a two-process torchrun against one process; a server stopped in the middle; a recipe whose process
is killed each time; rank 0's errors and a failing search under torchrun. Each in real subprocesses, on a
tiny ImageFolder."""

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
from support import SIZE, five_class_model, make_folder, start_ranks

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TESTS = str(Path(__file__).parents[1])
# the CLI on "another machine" (another host name and boot id) whose clock is 10 minutes behind this one's
SKEWED = """
import socket, sys, time
real = time.time
time.time = lambda: real() - 600
socket.gethostname = lambda: "skewed-host"
from retrofit.sweep.tune import workers
workers.boot_id = lambda: "skewed-machine"
sys.argv = ["retrofit", *sys.argv[1:]]
from retrofit.cli import main
main()
"""


def command(tmp, out, *extra, skewed=False):
    start = [sys.executable, "-c", SKEWED] if skewed else [sys.executable, "-m", "retrofit"]
    return [
        *start,
        "tune",
        "test_resnet",
        "--checkpoint",
        str(tmp / "plain.safetensors"),
        "--num-classes",
        "5",
        "--input-size",
        f"3,{SIZE},{SIZE}",
        "--data",
        str(tmp / "data"),
        "-r",
        "off,4,16",
        "--per-stage",
        "--position",
        "standard,identity",
        "--epochs",
        "3",
        "-b",
        "8",
        "--lr",
        "1e-2",
        "-j",
        "0",
        "--pruner",
        "sha",
        "--finalists",
        "2",
        "--seeds",
        "1",
        "-o",
        str(out),
        *extra,
    ]


def on(store):
    """The CLI's --storage for ``store`` (None: the journal in the output folder)."""
    return ["--storage", store] if store else []


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("procs")
    make_folder(tmp / "data")
    save_model(five_class_model(), str(tmp / "plain.safetensors"))
    return tmp


def study_of(out, store=None, name="tune"):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=open_storage(store or out / "study.journal"))


def counted(t):
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not t.user_attrs.get("retrofit:uncounted")


def no_leftovers(out, finished=True):
    """Nothing half-written: no temporary of an atomic write, no lock of a dead worker, every file whole."""
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not list((out / "workers").iterdir())
    for line in (out / "trials.jsonl").read_text().splitlines():
        json.loads(line)
    if finished:
        json.loads((out / "tune.json").read_text())
    else:
        assert not (out / "tune.json").exists()


def mid_trial(proc, out, store, first=2):
    """Wait until ``proc`` is in the middle of a trial numbered ``first`` or later (an epoch reported, more to
    come); its number, or None when it ended first."""
    deadline, storage = time.monotonic() + 240, None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while time.monotonic() < deadline and proc.poll() is None:
        if store or (out / "study.journal").is_file():
            try:  # one storage, read again each time (a journal replays only the new lines)
                storage = storage or open_storage(store or out / "study.journal")
                running = [
                    t
                    for t in optuna.load_study(study_name="tune", storage=storage).trials
                    if t.state == TrialState.RUNNING and t.number >= first and t.intermediate_values
                ]
            except Exception:  # noqa: BLE001 - the study is not there yet, or being written: look again
                running = []
            if running:
                return running[0].number
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("store", ["journal", "postgres"], indirect=True)
def test_kill_9_during_a_trial_then_the_same_command_finishes_the_study(folder, tmp_path, store):
    out = tmp_path / "killed"
    # no pruner: every trial runs its 3 epochs, so one is caught between two (with a pruner, which trials
    # run on past epoch 1 depends on the draws, and a killed run might never be mid-trial)
    kill = ("--pruner", "none", *on(store))
    proc = subprocess.Popen(
        command(folder, out, "--trials", "5", *kill), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    victim = mid_trial(proc, out, store)
    if victim is not None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert victim is not None, "no trial was caught mid-run"
    before = {
        t.number: (t.state, t.value, t.datetime_complete) for t in study_of(out, store).trials if t.state.is_finished()
    }
    again = subprocess.run(
        command(folder, out, "--trials", "5", *kill), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    trials = study_of(out, store).trials
    for number, kept in before.items():  # the finished trials are kept as they were, not re-run
        t = trials[number]
        assert (t.state, t.value, t.datetime_complete) == kept
    assert trials[victim].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert len(retry) == 1 and retry[0].params == trials[victim].params and counted(retry[0])
    assert f"[trial {victim}] its process is gone; marked failed, its recipe queued again" in again.stderr
    assert sum(counted(t) for t in trials) == 5
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    numbers = [r["number"] for r in rows]
    assert len(numbers) == len(set(numbers))
    assert again.stdout.strip().splitlines()[-1] == json.loads((out / "tune.json").read_text())["verdict"]
    no_leftovers(out)


@pytest.mark.parametrize("store", ["journal", "postgres"], indirect=True)
def test_two_workers_share_the_trials_and_end_with_one_table_whatever_their_clocks(folder, tmp_path, store):
    """Two workers started at once, the second on "another machine" whose clock is 10 minutes behind: a
    heartbeat judged by comparing two machines' clocks would fail its live trials (and crash it). On the
    journal they share one output folder (a shared file system), on PostgreSQL each has its own."""
    outs = [tmp_path / "two"] * 2 if store is None else [tmp_path / "w0", tmp_path / "w1"]
    procs = [
        subprocess.Popen(
            command(
                folder, outs[i], "--trials", "8", "--json", str(tmp_path / f"w{i}.json"), *on(store), skewed=i == 1
            ),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
        assert "its process is gone" not in stderr  # no live trial was failed
    trials = [t for t in study_of(outs[0], store).trials if not t.user_attrs.get("retrofit:surplus")]
    assert sum(counted(t) for t in trials) == 8 and not [t for t in trials if t.state == TrialState.FAIL]
    pids = {t.user_attrs["retrofit:worker"]["pid"] for t in trials if counted(t)}
    assert pids == {p.pid for p in procs}  # both did trials
    assert {t.user_attrs["retrofit:worker"]["host"] for t in trials if counted(t)} >= {"skewed-host"}
    trained = [t.user_attrs["recipe"] for t in trials if "rows" in t.user_attrs]
    assert len(trained) == len(set(trained))  # no recipe trained twice, by either of them
    # TPE's 2 random start-up trials (8 // 3): one fixed-seed sampler in each process would draw them equal
    assert trials[0].params != trials[1].params
    tables = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    assert tables[0]["rows"] == tables[1]["rows"] and tables[0]["verdict"] == tables[1]["verdict"]
    assert results[0][0].strip().splitlines()[-1] == results[1][0].strip().splitlines()[-1] == tables[0]["verdict"]
    final = study_of(outs[0], store, "tune:final")
    done = [t.params["job"] for t in final.trials if t.state == TrialState.COMPLETE]
    assert len(done) == len(set(done)) == 2 * 1 + 2 * 1  # two controls and two finalists, one seed: each run once
    for out in set(outs):
        no_leftovers(out)


RANKS = '''
import json, os, sys
sys.path.insert(0, {tests!r})
import retrofit
from support import five_class_model, SIZE
out, data = sys.argv[1], sys.argv[2]
res = retrofit.tune(five_class_model(), data, {{"r": [4, 16], "position": ["standard", "identity"]}}, trials=3,
                    epochs=2, input_size=(3, SIZE, SIZE), pruner="sha", finalists=1, seeds=2, output_dir=out,
                    batch_size=8, lr=1e-2, workers=0, augment=False, device="cpu")
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
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two"),
            data,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), data],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    r0, r1, single = (
        json.loads((tmp_path / name).read_text()) for name in ("two.rank0.json", "two.rank1.json", "one.rank0.json")
    )
    assert r0["trained"] and r0["trained"] == r1["trained"]  # the same runs on both ranks
    assert r0["trials"] == r1["trials"] and r0["rows"] == r1["rows"]  # every rank returns the same result

    def runs(result):  # the full control's top-1 may differ: BatchNorm statistics per process
        return [
            (t["what"], t["epochs"], t["top1"] if '"arm":"full"' not in t["what"] else None) for t in result["trained"]
        ]

    assert runs(r0) == runs(single)
    assert any(t["state"] == "pruned" for t in single["trials"])
    assert [(t["number"], t["state"], t["label"], t["top1"]) for t in r0["trials"]] == [
        (t["number"], t["state"], t["label"], t["top1"]) for t in single["trials"]
    ]
    for a, b in zip(r0["rows"], single["rows"]):
        assert a["arm"] == b["arm"]
        if a["arm"] != "full":
            assert a["top1_per_seed"] == b["top1_per_seed"]
            assert a["val_loss_per_seed"] == pytest.approx(b["val_loss_per_seed"], rel=1e-5)


def test_torchrun_two_processes_against_a_postgresql_server(folder, tmp_path, pg_url):
    """Rank 0 alone opens the server's study; both ranks train the same trials and return the same result."""
    script = tmp_path / "ranks.py"
    script.write_text(
        RANKS.format(tests=TESTS)
        .replace("output_dir=out,", "output_dir=out, storage=sys.argv[3],")
        .replace("trials=3,", "trials=2,")
        .replace("seeds=2,", "seeds=1,")
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two"),
            str(folder / "data"),
            pg_url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in (0, 1))
    assert r0["trained"] and r0["trained"] == r1["trained"]
    assert r0["trials"] == r1["trials"] and r0["rows"] == r1["rows"]
    assert sum(counted(t) for t in study_of(None, pg_url).trials) == 2
    assert not (tmp_path / "two" / "study.journal").exists()  # the study is on the server


def test_the_server_stopped_mid_search_is_one_error_line_and_the_same_command_continues(folder, tmp_path, postgres):
    url = postgres.database()
    out = tmp_path / "out"
    args = command(folder, out, "--trials", "5", "--pruner", "none", "--finalists", "1", "--storage", url)
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = mid_trial(proc, out, url, first=1)
        assert victim is not None, "no trial was caught mid-run"
        postgres.stop()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        postgres.start()  # back for the rest of the suite too
    assert proc.returncode == 2, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("[trial ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: lost the study's store --storage {url} ("), stderr
    assert (
        lines[0].endswith("the study keeps every finished trial: the same command continues it once the server is back")
        and "Traceback" not in stderr + stdout
    )
    no_leftovers(out, finished=False)
    again = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = study_of(out, url).trials
    assert trials[victim].state == TrialState.FAIL and sum(counted(t) for t in trials) == 5
    assert [t for t in trials if t.system_attrs.get("failed_trial") == victim]  # its recipe ran again
    no_leftovers(out)


KILLER = '''
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import retrofit
from retrofit.sweep import ablation
from support import SIZE, five_class_model
real = ablation.finetune
def finetune(model, *args, **kwargs):  # the out-of-memory killer, each time the recipe with r 16 trains
    if retrofit.get_info(model) is not None and retrofit.get_info(model).recipe.r == 16:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, *args, **kwargs)
ablation.finetune = finetune
res = retrofit.tune(five_class_model(), sys.argv[2], {{"r": [4, 16]}}, trials=2, epochs=1, input_size=(3, SIZE, SIZE),
                    finalists=0, output_dir=sys.argv[1], batch_size=8, lr=1e-2, workers=0)
print(json.dumps(res.trials))
'''


def test_a_recipe_whose_process_is_killed_every_time_is_failed_for_good_after_two_retries(folder, tmp_path):
    """Without a cap the same command would retry it for ever and never reach --trials."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(tests=TESTS))
    runs = []
    for _ in range(5):
        runs.append(
            subprocess.run(
                [sys.executable, str(script), str(tmp_path / "out"), str(folder / "data")],
                capture_output=True,
                text=True,
                timeout=300,
                env=ENV,
            )
        )
        if runs[-1].returncode != -signal.SIGKILL:
            break
    assert [r.returncode for r in runs] == [-signal.SIGKILL] * 3 + [0], runs[-1].stderr[-3000:]
    rows = {r["label"]: r for r in json.loads(runs[-1].stdout)}
    killed = [r for r in json.loads(runs[-1].stdout) if r["state"] == "failed"]
    assert len(killed) == 3 and {r["recipe"]["r"] for r in killed} == {16}
    numbers = [r["number"] for r in killed]
    assert killed[-1]["reason"] == (
        f"its process died 3 times (trials {', '.join(map(str, numbers))}); not retried again"
    )
    assert [r["retry_of"] for r in killed] == [None, numbers[0], numbers[0]]
    assert [r["state"] for r in rows.values() if r["recipe"]["r"] == 4] == ["complete"]


def test_under_torchrun_an_error_of_rank_0_ends_every_rank_alike(folder, tmp_path):
    """Rank 0 alone holds the study: a journal it cannot read, and a search whose every trial fails (the
    others ranks fail with it, and must go on as rank 0 does), end both ranks with exit code 2, one `error:`
    line (rank 0's; the others print nothing), no traceback, no rank waiting for ever."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "study.journal").write_text(
        '{"op_code":0,"worker_id":"w","study_name":"tune","directions":[2]}\n{"op_code": 999, "worker_id": "x"}\n'
    )
    base = [
        sys.executable,
        "-m",
        "retrofit",
        "tune",
        "test_resnet",
        "--num-classes",
        "3",
        "--input-size",
        f"3,{SIZE},{SIZE}",
        "--data",
        str(folder / "data"),
        "-b",
        "8",
        "-j",
        "0",
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--finalists",
        "1",
        "--seeds",
        "1",
    ]
    cases = {
        "cannot read --storage": [*base, "--trials", "2", "-o", str(damaged)],
        "the search stopped: the 2 trials this process trained all failed": [
            *base,
            "-r",
            "off,4,16",
            "--per-stage",
            "--trials",
            "2",
            "-o",
            str(tmp_path / "fails"),
        ],
    }
    for words, cmd in cases.items():
        ranks = start_ranks(cmd)
        done = [r.communicate(timeout=300) for r in ranks]
        assert [r.returncode for r in ranks] == [2, 2], done[0][1][-3000:] + done[1][1][-3000:]
        errors = [ln for ln in done[0][1].splitlines() if "error" in ln]
        assert len(errors) == 1 and errors[0].startswith(f"error: {words}"), done[0][1]
        assert not done[1][1].strip() and not done[1][0].strip()  # rank 1 prints nothing
        assert "Traceback" not in done[0][1] + done[1][1]


@pytest.mark.parametrize("budget", [["--trials", "6"], ["--budget", "4"]])
def test_a_search_whose_every_trial_fails_ends_with_its_reason_and_a_small_store(folder, tmp_path, budget):
    """The issue's command: random weights (timm's zero_init_last) and the default position, so no block
    gets a gradient. It ran 2,155 failing trials in 3.6 minutes, and --budget 4 (epochs) could not stop
    it: a failed trial spends no epoch."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "retrofit",
            "tune",
            "test_resnet",
            "--num-classes",
            "3",
            "--input-size",
            f"3,{SIZE},{SIZE}",
            "--data",
            str(folder / "data"),
            "-r",
            "off,4,16",
            "--per-stage",
            "--epochs",
            "2",
            *budget,
            "--finalists",
            "1",
            "--seeds",
            "1",
            "-b",
            "8",
            "--lr",
            "1e-2",
            "-j",
            "0",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("[trial ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: the search stopped: the 5 trials this process trained "
        "all failed and no trial of the study completed; the first "
        "failure, trial "
    ), proc.stderr
    for words in (
        "nothing trainable got a gradient",
        "trained weights (--checkpoint or --pretrained)",
        "--position post or identity",
        "--train-norms",
        "never trained again",
    ):
        assert words in errors[0]
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert sum(r["state"] == "failed" for r in rows) == 5 and len(rows) < 30
    failed = [json.dumps(r["recipe"], sort_keys=True) for r in rows if r["state"] == "failed"]
    assert len(failed) == len(set(failed))  # a recipe that failed is never trained again
    assert (out / "study.journal").stat().st_size < 200_000
