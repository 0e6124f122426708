"""The machinery of tests/test_mutations.py: plant a one-line bug in a copy of src/ and run the
tests that claim to cover it against that copy.

Each planted bug runs in a process of its own, forked from a server that imported torch,
Lightning, Hydra and pytest once (about 5 s a process on 2 cores otherwise). The server
never imports moelab: the forked child puts the mutated copy first on `sys.path` (and in
PYTHONPATH, for any subprocess a test starts), checks that `moelab` resolves to the copy,
and runs `pytest -x` on the named tests from the repository root, its output in a log
file. Run as `python -m tests.mutations` it is that server: one JSON request a line on
stdin ({"src", "tests", "log", "basetemp", "timeout"}), one JSON answer a line on stdout
({"rc"}; rc -9 when the child ran past its timeout and was killed).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Imported once by the server, before any fork; never moelab itself.
PRELOAD = ("torch", "numpy", "lightning", "lightning.pytorch", "hydra", "omegaconf", "torchmetrics", "timm",
           "pytest", "sklearn.datasets", "tensorboard.backend.event_processing.event_accumulator",
           "torch.utils.tensorboard", "matplotlib.figure", "matplotlib.backends.backend_agg", "anyio.pytest_plugin")
WRONG_MODULE = 3  # the child's exit status when `moelab` did not resolve to the mutated copy


@dataclass(frozen=True)
class Mutation:
    """A planted bug: `old` (which must occur exactly once in src/`file`) replaced by `new`,
    and the fast tests (node ids) of which at least one must fail with it; `why` says what
    the bug breaks."""

    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str

    @property
    def id(self) -> str:
        return self.why.split(":")[0]


class StaleMutation(Exception):
    """The text a mutation replaces is no longer in the code (or is there more than once)."""


def planted_copy(mutation: Mutation | None, into: Path) -> Path:
    """A copy of src/ under `into` with `mutation` applied (none: unchanged); returns the
    copy's src folder. conf/ is linked beside it, where code that finds it from its own file
    looks."""
    src = into / "src"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("*.egg-info"), symlinks=True)
    (into / "conf").symlink_to(ROOT / "conf")
    if mutation is not None:
        path = src / mutation.file
        if not path.is_file():
            raise StaleMutation(f"src/{mutation.file} does not exist")
        text = path.read_text()
        found = text.count(mutation.old)
        if found != 1:
            raise StaleMutation(f"src/{mutation.file} holds the text to replace {found} times, not once: "
                                f"{mutation.old!r}")
        path.write_text(text.replace(mutation.old, mutation.new))
    return src


class Server:
    """The forking server, as seen from the test process."""

    def __init__(self, log: Path) -> None:
        self.log = log
        with open(log, "w") as errors:
            self.process = subprocess.Popen([sys.executable, "-m", "tests.mutations"], cwd=ROOT, text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
        ready = self.process.stdout.readline()
        if json.loads(ready or "{}").get("ready") is not True:
            raise RuntimeError(f"the mutation server did not start (exit status {self.process.poll()}): {self._tail()}")

    def _tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def run(self, src: Path, tests: tuple[str, ...], log: Path, basetemp: Path, timeout: float) -> int:
        request = {"src": str(src), "tests": list(tests), "log": str(log), "basetemp": str(basetemp), "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the mutation server stopped (exit status {self.process.poll()}): {self._tail()}")
        return int(json.loads(answer)["rc"])

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _child(request: dict, answers_fd: int) -> None:
    """In the forked child: output to the log, the copy first on the path, pytest -x. Never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group, so a timeout ends any process it started too
        os.close(answers_fd)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        sys.stdin = open(os.devnull)
        src = request["src"]
        sys.path.insert(0, src)
        os.environ["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
        importlib.invalidate_caches()
        import moelab

        if not str(Path(moelab.__file__).resolve()).startswith(str(Path(src).resolve())):
            print(f"moelab resolved to {moelab.__file__}, not to the mutated copy in {src}", flush=True)
            code = WRONG_MODULE
        else:
            import pytest

            # no:unraisableexception: its gc.collect() at exit costs ~0.7 s with torch loaded.
            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                                    f"--basetemp={request['basetemp']}", *request["tests"]]))
    except BaseException as exc:  # noqa: BLE001 - whatever happens, the child must not return into the server
        print(f"mutation child failed: {type(exc).__name__}: {exc}", flush=True)
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert not any(m == "moelab" or m.startswith("moelab.") for m in sys.modules), "the server must not import moelab"
    # Answers on a descriptor of their own; anything else printed goes to stderr.
    sys.stdout.flush()
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, answers.fileno())
        deadline = time.monotonic() + float(request["timeout"])
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                rc = -9
                break
            time.sleep(0.02)
        answers.write(json.dumps({"rc": rc}) + "\n")
        answers.flush()
    os._exit(0)  # stdin closed: done (skips tearing down torch, ~2 s)


if __name__ == "__main__":
    serve()
