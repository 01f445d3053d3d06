"""How many torch CPU threads a job uses, so that jobs sharing a machine share its cores.

PyTorch's default is one intra-op thread per physical core for *every* process. Two jobs side by
side then run twice as many busy threads as there are cores, and their spin-waiting threads make
each step several times slower than the cores alone explain (issue 16 measured 1.9x with one
neighbour, about 10x under heavier sharing). The rule, in order:

1. an explicit ``--threads N`` (or ``threads`` in an NNI trial spec);
2. ``MPNAS_THREADS``;
3. ``OMP_NUM_THREADS`` (the variable schedulers and users already set for this);
4. usable cores // concurrent jobs, at least 1. Concurrent jobs: NNI's ``trialConcurrency`` for
   its trials, ``MPNAS_JOBS`` elsewhere (default 1, i.e. torch's own default on one job).

"Usable cores" are the CPUs this process may run on (``sched_getaffinity``, which honours
``taskset`` and container CPU sets), capped at torch's own default (its count of physical cores,
taken when this module is imported), so that one job alone keeps torch's default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from nas.core.errors import UsageError

log = logging.getLogger(__name__)

ENV_THREADS = "MPNAS_THREADS"
ENV_JOBS = "MPNAS_JOBS"
# torch's default intra-op threads (physical cores), read before any --threads takes effect
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one), at most torch's default."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        allowed = os.cpu_count() or 1
    return max(1, min(allowed, _TORCH_DEFAULT_THREADS))


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """``cores // jobs``, at least 1: the share of the cores one of ``jobs`` concurrent jobs gets."""
    if jobs < 1:
        raise UsageError(f"concurrent jobs must be >= 1, got {jobs}")
    return max(1, (usable_cores() if cores is None else cores) // jobs)


def _positive_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"{name}={value!r}: expected a positive integer (threads or jobs)")
    return number


def resolve_threads(requested: int | None = None, *, jobs: int | None = None,
                    env: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """The thread count by the module's rule: ``requested``, else the environment, else cores // jobs.

    ``jobs`` is the number of concurrent jobs this one shares the machine with (itself included);
    None reads ``MPNAS_JOBS`` (default 1).
    """
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads {requested}: expected a positive integer")
        return requested
    for name in (ENV_THREADS, "OMP_NUM_THREADS"):
        if env.get(name, "").strip():
            return _positive_int(name, env[name].strip())
    if jobs is None:
        jobs = _positive_int(ENV_JOBS, env[ENV_JOBS].strip()) if env.get(ENV_JOBS, "").strip() else 1
    return threads_per_job(jobs, cores)


def apply_threads(requested: int | None = None, *, jobs: int | None = None) -> int:
    """Set torch's intra-op threads by :func:`resolve_threads` and return the count."""
    threads = resolve_threads(requested, jobs=jobs)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.debug("torch CPU threads: %d (%d usable cores)", threads, usable_cores())
    return threads
