"""What every workflow script does around its one library call: logging, threads, clean failures."""

from __future__ import annotations

import logging
import os
import re
import resource
import sys
from pathlib import Path
from typing import Callable

import torch

from .errors import LowrankError

log = logging.getLogger("lowrank_core")


def run_step(step: Callable[[], object], log_file: str | None, threads: int) -> None:
    """Run `step` with logging to `log_file` and stderr and `threads` torch threads (at most the CPUs).

    A `LowrankError` (bad config, data or checkpoint) ends the process with its one-line message and exit code 1;
    anything else is a bug and keeps its traceback.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
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
        sys.exit(1)


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
