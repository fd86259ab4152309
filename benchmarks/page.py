"""A benchmark's page of the documentation site, written by the benchmark itself (``--page FILE``).

``with page("docs/benchmarks/x.md", "Title", __file__):`` runs the block with its printed output also
kept, then writes a Markdown page: the script, the command as run, the date (UTC) and the machine it ran
on (CPU model, cores, load average at the start, Python, torch and timm versions), and the output verbatim.
A page is never edited by hand: run the command in its header again to renew it.
"""

import contextlib
import datetime
import io
import os
import platform
import shlex
import sys
from pathlib import Path


class _Tee(io.TextIOBase):
    """Write to the terminal and keep a copy (contextlib.redirect_stdout takes one stream only)."""

    def __init__(self, terminal):
        self.terminal, self.kept = terminal, io.StringIO()

    def write(self, text):
        self.terminal.write(text)
        return self.kept.write(text)

    def flush(self):
        self.terminal.flush()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    import timm  # deferred: only a page's header needs the versions
    import torch  # deferred: as above

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({platform.machine()}, {platform.system()}); load average at the "
        f"start {load}; Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )


def header(title: str, script: str, argv: list[str], started: datetime.datetime, where: str) -> str:
    command = shlex.join(["python", f"benchmarks/{Path(script).name}", *argv])
    return (
        f"# {title}\n\n"
        f"- script: `benchmarks/{Path(script).name}`\n- command: `{command}`\n"
        f"- date: {started:%Y-%m-%d %H:%M} UTC\n- machine: {where}\n\n"
        f"Written by the script itself (`--page`); what it printed, verbatim:\n\n"
    )


@contextlib.contextmanager
def page(path: str | None, title: str, script: str):
    """Keep what the block prints and write it as a page at ``path`` (nothing kept when ``path`` is None)."""
    if path is None:
        yield
        return
    started, where = datetime.datetime.now(datetime.timezone.utc), machine()
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    argv = [a for a in sys.argv[1:]]
    text = header(title, script, argv, started, where) + "```text\n" + tee.kept.getvalue().rstrip() + "\n```\n"
    Path(path).write_text(text)
    print(f"page: {path}")
