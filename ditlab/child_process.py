"""Child processes that never outlive the ditlab process that started them (the teacher build's ``ditlab fit``).

A child started with :func:`run_child`

- dies with its parent, even when the parent is killed with SIGKILL: on Linux the kernel sends it SIGTERM the
  moment the parent dies (``prctl(PR_SET_PDEATHSIG)``, armed between fork and exec), so a ``ditlab fit`` child
  saves ``interrupted.ckpt`` after its current step and exits;
- runs in its own session, so a terminal's Ctrl-C reaches only the parent, which forwards SIGINT/SIGTERM to the
  child exactly once, waits for it to save and exit, then stops itself the way an interrupted ``fit`` stops
  (``KeyboardInterrupt``: exit code 130; ``SIGTERMException``: 143). A child that has not exited ``grace``
  seconds after the signal, or a second signal, ends its whole process group with SIGKILL.

DataLoader workers get the same guarantee from :func:`exit_with_parent` as their ``worker_init_fn``. Signals
received (directly, or forwarded to a child) are noted in :data:`RECEIVED`, so a command answers a user's Ctrl-C
with one line and exit code 130 while a ``KeyboardInterrupt`` raised by code keeps its traceback.

PDEATHSIG follows the *thread* that started the child, so :func:`run_child` is meant for the main thread (the
one Lightning's ``prepare_data`` runs on); elsewhere it cannot install signal handlers and only arms PDEATHSIG.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RECEIVED: set[int] = set()
"""Stop signals this process received while :func:`noting_sigint` was active, or forwarded to a child."""


@contextmanager
def noting_sigint() -> Iterator[None]:
    """While active (main thread), a SIGINT is noted in :data:`RECEIVED`, then raises ``KeyboardInterrupt`` as usual."""
    RECEIVED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, frame) -> None:
        RECEIVED.add(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the kernel sends the child ``signum`` when this process dies (Linux; None
    elsewhere). If the parent already died before it was armed, the child signals itself."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return arm


def exit_with_parent(worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn``: the kernel SIGKILLs this worker the moment the process that forked it dies
    (Linux), rather than PyTorch's watchdog noticing within 5 s. A worker has nothing of its own to save."""
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # it died while this was being armed
            os._exit(1)


def stop_exception(signum: int) -> BaseException:
    """What an interrupted ``fit`` raises for ``signum``: ``KeyboardInterrupt`` (Ctrl-C) or ``SIGTERMException``."""
    # imported here, so that this module costs a light parent process no Lightning import
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return KeyboardInterrupt() if signum == signal.SIGINT else SIGTERMException(128 + signum)


def kill_group(child: subprocess.Popen) -> None:
    """SIGKILL the child's process group (its own session: the child and what it started, e.g. DDP ranks)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(command: Sequence[str], *, pass_fds: Sequence[int] = (), grace: float = 60.0, **options) -> int:
    """Run ``command`` to its end and return its exit code. A SIGINT or SIGTERM to this process meanwhile is
    forwarded to the child; once the child has exited, :func:`stop_exception` of that signal is raised here.
    ``pass_fds`` stay open in the child (a lock it should hold too); ``options`` go to ``subprocess.Popen``."""
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, frame) -> None:
        if child is not None and child.poll() is None:
            if received:  # asked twice: stop now
                kill_group(child)
            else:
                child.send_signal(signum)
        received.append(signum)
        RECEIVED.add(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    code = None
    try:
        if not received:
            child = subprocess.Popen(list(command), pass_fds=tuple(pass_fds), start_new_session=True,
                                     preexec_fn=die_with_parent(), **options)  # fmt: skip
            if received:  # the signal came while the child was starting
                child.send_signal(received[0])
        deadline = None
        while child is not None and code is None:
            try:
                code = child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if received and deadline is None:
                    deadline = time.monotonic() + grace
                if deadline is not None and time.monotonic() > deadline:
                    kill_group(child)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child is not None and child.poll() is None:  # an error here never leaves the child running
            kill_group(child)
            child.wait()
    if received:
        raise stop_exception(received[0])
    return code
