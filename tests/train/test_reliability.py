"""What a kill, a full disk, a second run and a bad output folder do to a fine-tuning run, through the
real command line: a killed run is a process running the installed entry point (``retrofit.cli:main``,
what ``python -m retrofit`` runs) that gets SIGKILL right before a chosen rename; the product has no
fault injection. Then ``--resume`` must give the files and the table of an uninterrupted run."""

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from support import make_folder, se_model

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]

# One process imports torch, timm and retrofit once (5 s), computes nothing, and forks one child per
# command: each child is a fresh process running the CLI's entry point, killed (SIGKILL) right before
# the first rename onto NAME (after one onto AFTER: "NAME@AFTER"). Forking a process that never ran a
# torch op is safe (no thread pool exists yet), and saves the import in each of the eight runs.
LAUNCHER = r"""
import json, os, signal, sys, time, traceback
from retrofit.cli import main

def kill_before(spec, pause):
    name, _, after = spec.partition("@")
    real, done = os.replace, set()

    def replace(src, dst, *args, **kwargs):
        target = os.path.basename(os.fspath(dst))
        if target == name and (not after or after in done):
            if pause:  # say where we are, wait for the test to look, then die
                open(os.path.join(pause, "paused"), "w").write(str(os.getpid()))
                deadline = time.time() + 120
                while not os.path.exists(os.path.join(pause, "go")) and time.time() < deadline:
                    time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        done.add(target)
        return real(src, dst, *args, **kwargs)
    return replace

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        if job["kill"]:
            os.replace = kill_before(job["kill"], job["pause"])
        sys.argv = ["retrofit", *job["args"]]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    died = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    print(json.dumps({"pid": pid, "signal": died, "code": os.WEXITSTATUS(status) if not died else None}), flush=True)
"""


class Launcher:
    """Runs ``retrofit ARGS`` in fresh processes (see LAUNCHER); ``run`` returns (exit code or -signal,
    stdout, stderr)."""

    def __init__(self, folder: Path):
        self.folder, self.n = folder, 0
        script = folder / "launcher.py"
        script.write_text(LAUNCHER)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def start(self, args, kill=None, pause=None):
        self.n += 1
        self.out, self.err = self.folder / f"{self.n}.out", self.folder / f"{self.n}.err"
        self.proc.stdin.write(
            json.dumps(
                {
                    "args": [str(a) for a in args],
                    "kill": kill,
                    "pause": pause and str(pause),
                    "stdout": str(self.out),
                    "stderr": str(self.err),
                }
            )
            + "\n"
        )
        self.proc.stdin.flush()

    def wait(self):
        line = self.proc.stdout.readline()
        assert line, "the launcher died"
        done = json.loads(line)
        return -done["signal"] if done["signal"] else done["code"], self.out.read_text(), self.err.read_text()

    def run(self, args, kill=None):
        self.start(args, kill)
        return self.wait()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(60)


def table(output: str) -> str:
    """The results table as printed (without the lines that name the output folder)."""
    return output.split("Fine-tuning results", 1)[1].split("best:", 1)[0]


def error_line(result) -> str:
    """The one ``error:`` line of a failed command (exit 2, no traceback)."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def test_a_kill_at_any_rename_then_resume_gives_the_uninterrupted_run(tmp_path):
    """Every rename point: step 0 (best, metrics; no state yet: the run starts over) and an epoch's commit
    (state, best, last, metrics), the last one after the final epoch (nothing left to train: the metrics
    row must still come back). 24 images in batches of 10: the last step of each epoch is partial."""
    data = make_folder(tmp_path / "data")
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    # plain cross-entropy at lr 0.03: on this folder epoch 1 then beats step 0, so an epoch commit writes best
    # too (lr 0.05 did with the augmentation drawn per worker; per image (issue 18) its epoch 1 ties step 0)
    args = [
        "finetune",
        ckpt,
        "--data",
        data,
        "--epochs",
        "3",
        "-b",
        "10",
        "--lr",
        "0.03",
        "--train-head",
        "--smoothing",
        "0",
        "-j",
        "0",
        "--device",
        "cpu",
    ]
    ref, out, pause = tmp_path / "ref", tmp_path / "run", tmp_path / "pause"
    pause.mkdir()
    launcher = Launcher(tmp_path)
    try:
        code, reference, _ = launcher.run(args + ["--output-dir", ref])
        assert code == 0, reference
        rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and rows[2]["top1"] > rows[1]["top1"]  # epoch 1 beats step 0: it writes best

        # 1. step 0's best.safetensors; paused there (holding the folder), a second run is refused and
        #    told which process holds it, and leaves that process's temporary file alone
        launcher.start(args + ["--output-dir", out], kill="best.safetensors", pause=pause)
        deadline = time.time() + 120
        while not (pause / "paused").exists() and time.time() < deadline:
            time.sleep(0.05)
        pid = (pause / "paused").read_text()
        second = runner.invoke(app, [str(a) for a in args] + ["--output-dir", str(out), "--resume"])
        assert f"in use by another fine-tuning run (process {pid} on" in error_line(second)
        assert temps(out) == [f".best.safetensors.{pid}.tmp"]
        (pause / "go").write_text("")
        assert launcher.wait()[0] == -signal.SIGKILL

        # 2. to 6.: each run is killed at the next point; the next resumes (or, before any state, starts over)
        for kill in (
            "metrics.jsonl",  # step 0's metrics
            "train_state.pt",  # epoch 1's commit
            "best.safetensors@train_state.pt",  # epoch 1 (the best so far) after its commit
            "last.safetensors@train_state.pt",  # epoch 2 after its commit
            "metrics.jsonl@train_state.pt",
        ):  # epoch 3, the last, after its commit
            code, stdout, stderr = launcher.run(args + ["--output-dir", out, "--resume"], kill=kill)
            assert code == -signal.SIGKILL, (kill, stdout[-2000:], stderr[-2000:])
            assert len(temps(out)) == 1, (kill, temps(out))  # the killed run's own; the earlier ones are gone
        assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 3
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # the last row is not there yet

        code, final, stderr = launcher.run(args + ["--output-dir", out, "--resume"])
        assert code == 0, stderr[-3000:]
    finally:
        launcher.close()
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    assert table(final) == table(reference)
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(ref / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert temps(out) == []


class FullDisk(io.FileIO):
    """A file on a disk that fills up after 10 kB: write raises ENOSPC, as the kernel does."""

    def write(self, data):
        if self.tell() + len(data) > 10_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' words


def test_a_full_disk_keeps_the_previous_files_and_says_what_to_do(tmp_path, monkeypatch):
    """On a full disk (a 64 KiB tmpfs) torch.save raises RuntimeError ('unexpected pos') and safetensors
    SafetensorError (NO_SPACE). Here the training state's file fills up in epoch 2 (torch's own writer
    meets the ENOSPC), then, resumed, safetensors fails on epoch 2's last model: each is one line, keeps
    the file it was replacing, leaves no temporary file, and a --resume then finishes the run."""
    import safetensors.torch
    from safetensors import SafetensorError

    import retrofit.train.state as ts

    data = make_folder(tmp_path / "data")
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    out = tmp_path / "run"
    args = ["finetune", str(ckpt), "--data", str(data), "--epochs", "2", "-b", "8", "-j", "0", "--output-dir", str(out)]

    states = []

    def open_on_a_filling_disk(path, mode="r", *rest, **kwargs):
        states.append(path)
        return FullDisk(path, mode) if len(states) == 2 else open(path, mode, *rest, **kwargs)

    monkeypatch.setattr(ts, "open", open_on_a_filling_disk, raising=False)
    result = runner.invoke(app, args)
    assert error_line(result) == (
        f"error: cannot write {out / 'train_state.pt'}: No space left on device; the "
        f"previous train_state.pt is kept; free space and rerun with --resume"
    )
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 1 and temps(out) == []
    monkeypatch.undo()

    real_serialize, lasts = safetensors.torch.serialize_file, []

    def serialize(tensors, filename, metadata=None):
        lasts.extend([filename] if ".last.safetensors." in filename else [])
        if len(lasts) == 2:  # the resume first rewrites epoch 1's last model, then epoch 2's fails
            raise SafetensorError(NO_SPACE)
        return real_serialize(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize)
    kept = load_file(out / "last.safetensors")  # epoch 1's (safetensors' header order varies: not bytes)
    result = runner.invoke(app, args + ["--resume"])
    assert error_line(result) == (
        f"error: cannot write {out / 'last.safetensors'}: No space left on device; the "
        f"previous last.safetensors is kept; free space and rerun with --resume"
    )
    still = load_file(out / "last.safetensors")
    assert all(torch.equal(still[k], kept[k]) for k in kept) and temps(out) == []
    monkeypatch.undo()

    resumed = runner.invoke(app, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 2" in table(resumed.stdout) and len((out / "metrics.jsonl").read_text().splitlines()) == 4
    final = torch.load(out / "train_state.pt", weights_only=True)["model"]
    last = load_file(out / "last.safetensors")
    assert all(torch.equal(last[k], final[k]) for k in last)  # epoch 2's weights, rewritten from the state

    # add-se --output on a full disk: one line, nothing written
    def full(*args, **kwargs):
        raise SafetensorError(NO_SPACE)

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    target = tmp_path / "se2.safetensors"
    saved = runner.invoke(app, ["add-se", "test_resnet", "--input-size", "3,32,32", "--output", str(target)])
    assert error_line(saved) == (
        f"error: cannot write {target}: No space left on device; nothing was written; free space and try again"
    )
    assert not target.exists() and temps(tmp_path) == []


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", train=2, val=1)
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    out = tmp_path / "readonly" / "run"
    out.parent.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: there, make mkdir fail as a read-only folder does
        out.parent.chmod(0o500)
    else:
        real_mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if self == out:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    try:
        result = runner.invoke(
            app, ["finetune", str(ckpt), "--data", str(data), "-b", "6", "-j", "0", "--output-dir", str(out)]
        )
    finally:
        out.parent.chmod(0o700)
    assert error_line(result) == (
        f"error: cannot create the output folder {out}: Permission denied; choose a folder you can write to"
    )


def test_a_killed_add_se_output_leaves_no_temporary_file_once_written_again(tmp_path):
    """``add-se --output F`` killed right before its rename leaves ``.F.<pid>.tmp`` (no lock to clean it
    under, unlike a run folder); the next write of F removes it, since its writer is dead."""
    out = tmp_path / "models" / "se.safetensors"
    out.parent.mkdir()
    args = ["add-se", "resnet18", "--input-size", "3,32,32", "--output", out]
    launcher = Launcher(tmp_path)
    try:
        code, stdout, stderr = launcher.run(args, kill="se.safetensors")
        assert code == -signal.SIGKILL, (stdout[-2000:], stderr[-2000:])
        left = temps(out.parent)
        assert len(left) == 1 and left[0].startswith(".se.safetensors.") and not out.exists()
        assert (out.parent / left[0] / out.name).stat().st_size > 1_000_000  # the weights were written
        code, stdout, stderr = launcher.run(args)
        assert code == 0, stderr[-2000:]
    finally:
        launcher.close()
    assert out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["se.README.md", "se.safetensors"]


KILLED_IN_SAFETENSORS = r"""
import os, signal, sys, threading, time, torch
from safetensors.torch import save_file
from retrofit.files.atomic import atomic_write

def kill_once_safetensors_writes(folder):
    while True:  # safetensors writes through its own temporary file (.tmpXXXXXX) next to the path
        if any(name.startswith(".tmp") for name in os.listdir(folder)):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.001)

with atomic_write(sys.argv[1]) as tmp:
    threading.Thread(target=kill_once_safetensors_writes, args=(tmp.parent,), daemon=True).start()
    save_file({"w": torch.zeros(50_000_000)}, str(tmp))
"""


def test_a_kill_inside_a_safetensors_write_leaves_only_what_the_next_write_removes(tmp_path):
    """safetensors writes ``.tmpXXXXXX`` and renames it: a kill in the middle must not leave that file
    where nothing knows its name (it would stay forever); it is inside the writer's ``.F.<pid>.tmp``."""
    from retrofit.files.atomic import atomic_write

    target = tmp_path / "models" / "last.safetensors"
    target.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", KILLED_IN_SAFETENSORS, str(target)], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    left = sorted(p.name for p in target.parent.iterdir())
    assert len(left) == 1 and re.fullmatch(r"\.last\.safetensors\.\d+\.tmp", left[0]), left
    assert any(p.name.startswith(".tmp") for p in (target.parent / left[0]).iterdir())
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"next")
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.safetensors"]


def test_a_write_leaves_a_live_writers_temporary_folder_alone(tmp_path):
    """Only a temporary with no lock on it and no process of its pid is removed: a live writer (its lock
    held, whatever its pid says) and a writer that has just made its folder (its pid alive, not locked
    yet) keep theirs."""
    from retrofit.files.atomic import atomic_write

    target = tmp_path / "model.safetensors"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    locked = tmp_path / f".model.safetensors.{dead}0.tmp"
    locked.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(locked)!r}, os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        orphan = tmp_path / f".model.safetensors.{dead}.tmp"  # dead pid, no lock: removed
        starting = tmp_path / f".model.safetensors.{holder.pid}.tmp"  # live pid, no lock yet: kept
        other = tmp_path / f".other.safetensors.{dead}.tmp"  # another target's: not looked at
        old = tmp_path / f".model.safetensors.{dead}1.tmp"  # an earlier version's file: removed
        for p in (orphan, starting, other):
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"partial")
        old.write_bytes(b"partial")
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"done")
        assert target.read_bytes() == b"done"
        assert temps(tmp_path) == sorted([locked.name, starting.name, other.name])
    finally:
        holder.kill()
        holder.wait()


def test_saved_files_get_the_permissions_a_plain_write_would(tmp_path):
    """safetensors >= 0.8 creates every file 0600 whatever the umask (its own temporary file), so a model
    saved for a team was readable by its writer alone. A new file follows the umask, as torch.save's
    would; an existing file keeps its mode when it is written again."""
    import stat

    from retrofit.files.atomic import atomic_write

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    model = se_model()
    old = os.umask(0o022)
    try:
        shared = retrofit.save(model, tmp_path / "shared.safetensors")
        with atomic_write(tmp_path / "state.pt") as tmp:
            torch.save({"a": 1}, tmp)
        assert mode(shared) == mode(tmp_path / "state.pt") == 0o644
        os.chmod(shared, 0o640)
        retrofit.save(model, shared)  # written again: keeps the mode its owner chose
        assert mode(shared) == 0o640
        os.umask(0o077)
        assert mode(retrofit.save(model, tmp_path / "private.safetensors")) == 0o600
    finally:
        os.umask(old)
