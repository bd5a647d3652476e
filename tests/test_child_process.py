"""Child processes ditlab starts never outlive it (issue 25), shown with light stand-ins for ``ditlab fit``:
a child started by ``run_child`` and a forked DataLoader-style worker die the moment their parent is SIGKILLed,
and a child that ignores the forwarded SIGTERM is ended, with everything it started, after the grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_parent(code: str, out: Path) -> subprocess.Popen:
    """A Python parent running ``code``; it prints the pids it wants the test to watch."""
    handle = open(out, "w")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=handle, stderr=subprocess.STDOUT,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def wait_for_pids(out: Path, count: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(word) for word in out.read_text().split() if word.isdigit()]
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"no pids printed: {out.read_text()[-2000:]}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


SLEEPER = "import os, time; print(os.getpid(), flush=True); time.sleep(120)"


def test_a_child_dies_with_its_parent_even_under_sigkill(tmp_path):
    out = tmp_path / "out.txt"
    parent = start_parent(f"""
        import sys
        from ditlab.child_process import run_child
        run_child([sys.executable, "-c", {SLEEPER!r}])
    """, out)  # fmt: skip
    [child] = wait_for_pids(out, 1)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    assert gone_within([child], 2.0)  # the kernel's SIGTERM, not a watchdog's poll


def test_a_worker_forked_with_exit_with_parent_dies_with_it(tmp_path):
    out = tmp_path / "out.txt"
    parent = start_parent("""
        import os, time
        from ditlab.child_process import exit_with_parent
        if os.fork() == 0:
            exit_with_parent()
            print(os.getpid(), flush=True)
            time.sleep(120)
            os._exit(0)
        time.sleep(120)
    """, out)  # fmt: skip
    [worker] = wait_for_pids(out, 1)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    assert gone_within([worker], 2.0)


def test_a_child_that_ignores_the_forwarded_signal_is_ended_after_the_grace_period(tmp_path):
    out = tmp_path / "out.txt"
    stubborn = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                "print(os.getpid(), grandchild.pid, flush=True); time.sleep(120)")  # fmt: skip
    parent = start_parent(f"""
        import sys
        from ditlab.child_process import run_child
        run_child([sys.executable, "-c", {stubborn!r}], grace=1.0)
    """, out)  # fmt: skip
    pids = wait_for_pids(out, 2)
    parent.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert gone_within(pids, 10.0)  # SIGKILL to the child's whole group once the second of grace is over
    assert time.monotonic() - start >= 0.9
    parent.kill()  # it goes on to raise SIGTERMException (exit 143: tests/test_teacher_process.py shows the main job)
    parent.wait()
