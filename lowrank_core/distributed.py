"""Data-parallel launches with accelerate's own launcher: one process per GPU (NCCL), or CPU processes (gloo)."""

from __future__ import annotations

import logging
import socket
from typing import Callable

from accelerate import notebook_launcher
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from . import errors

log = logging.getLogger(__name__)


def launch(function: Callable, *args, processes: int = 1) -> None:
    """Run `function(*args)` in `processes` data-parallel processes, or in this process when `processes` is 1.

    The processes are started by accelerate (torch elastic) and rendezvous on a free local port; inside them
    `Accelerator()` sees the process group, so `train_loop` shards every batch and only the main process writes.
    A `LowrankError` in a process is raised again here, with its message.
    """
    if processes <= 1:
        function(*args)
        return
    log.info("launching %d data-parallel processes", processes)
    try:
        notebook_launcher(function, args, num_processes=processes, use_port=str(_free_port()))
    except ChildFailedError as failed:  # a process's bad-input error comes back as that one-line error
        message = failed.get_first_failure()[1].message
        kind, _, text = (message.get("message", "") if isinstance(message, dict) else str(message)).partition(": ")
        error = getattr(errors, kind, None)
        if isinstance(error, type) and issubclass(error, errors.LowrankError):
            raise error(text) from None
        raise


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
