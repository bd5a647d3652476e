"""How many torch threads a ditlab process uses: chosen on purpose, never left to the default.

PyTorch's default takes every core. On a node another job already loads, two such processes oversubscribe the
cores and both crawl (a teacher build measured 2-9 images/s with 2 threads beside other jobs, 60-70 with 1 at the
same load). So ``ditlab fit`` and the tools take, in order: ``--threads N``; ``OMP_NUM_THREADS`` when set (the
user's word, also what Lightning's DDP launcher sets for its processes); otherwise the cores that are free now,
``cores - round(load average over 1 minute)``, at least 1. A process started under DDP on CPU leaves the choice
to Lightning (``cores // processes``), which runs before the first step.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_cores() -> tuple[int, float]:
    """``(cores not busy now, the 1-minute load average)``: at least 1."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, usable_cores() - round(load)), load


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """``(threads, why)`` for this process, without applying it (see the module docstring for the order)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: give a positive number of torch threads")
        return requested, "--threads"
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env), "OMP_NUM_THREADS"
    threads, load = free_cores()
    return threads, f"{usable_cores()} cores, load average {load:.1f}"


def set_threads(requested: int | None = None) -> str:
    """Apply :func:`choose_threads` to torch; returns why that number."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    return why


def machine_record() -> dict:
    """What a run's record says about where it ran: torch threads, usable cores, the 1/5/15-minute load."""
    import torch

    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = None
    return {"torch_threads": torch.get_num_threads(), "cores": usable_cores(), "load_average": load}


def pop_threads_option(argv: list[str]) -> tuple[list[str], int | None]:
    """``argv`` without ``--threads N`` / ``--threads=N``, and N (None when absent); one line for a bad value."""
    rest, requested, index = [], None, 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--threads" or arg.startswith("--threads="):
            value = arg.partition("=")[2] if "=" in arg else (argv[index + 1] if index + 1 < len(argv) else "")
            index += 1 if "=" in arg else 2
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--threads {value or '(missing)'}: give a positive number of torch threads")
            requested = int(value)
            continue
        rest.append(arg)
        index += 1
    return rest, requested
