"""The one exception type the workflow turns into a clean, one-line failure."""

import sys


class LowrankError(Exception):
    """Bad input (config, data, checkpoint): the message names the key or the file."""


class ConfigError(LowrankError):
    """A config value is missing, of the wrong type or out of range."""


class DataError(LowrankError):
    """A dataset record, image, mask or annotation file is unusable."""


class CheckpointError(LowrankError):
    """A model checkpoint or a training checkpoint is missing or inconsistent."""


def exit_on_bad_input(check, *args):
    """`check(*args)`, whose LowrankError ends the process with its one line on stderr and exit code 1 (in a
    Snakefile: before any job runs)."""
    try:
        return check(*args)
    except LowrankError as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
