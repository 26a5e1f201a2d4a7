"""What every workflow script does around its one library call: logging, threads, clean failures."""

from __future__ import annotations

import logging
import os
import re
import resource
import sys
from pathlib import Path
from typing import Callable, TextIO

import torch

from .errors import LowrankError

log = logging.getLogger("lowrank_core")


def run_step(step: Callable[[], object], log_file: str | None, threads: int) -> None:
    """Run `step` with `threads` torch threads (at most the CPUs), everything it prints going to `log_file`.

    With a `log_file`, the job's output (log records, progress bars, warnings, a traceback) goes there, not to the
    terminal that Snakemake shares with the other jobs. A `LowrankError` (bad config, data or checkpoint) ends the
    process with exit code 1 and its one-line message in the log and on the terminal; anything else is a bug and
    keeps its traceback (in the log).
    """
    terminal = _output_to(log_file) if log_file else sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)], force=True)
    logging.captureWarnings(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = max(1, min(int(threads), len(os.sched_getaffinity(0))))  # never more threads than CPUs
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for processes it starts (Snakemake set the scaled claim)
    log.info("%d torch threads", torch.get_num_threads())
    try:
        step()
    except LowrankError as err:
        log.error("%s", err)
        if terminal is not sys.stderr:
            print(f"{type(err).__name__}: {err}", file=terminal)
        sys.exit(1)


def _output_to(log_file: str) -> TextIO:
    """Point this process's stdout and stderr (and those of the processes it starts) at `log_file`; returns a
    stream to the terminal stderr was."""
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    os.close(log_fd)
    return terminal


def peak_rss_mb() -> float:
    """Peak resident memory of this process image in MiB (VmHWM).

    Unlike `ru_maxrss`, which Linux carries over from the forking parent across exec, VmHWM starts afresh with
    the process image; `ru_maxrss` is the fallback where /proc is missing.
    """
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
