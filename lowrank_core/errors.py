"""The one exception type the workflow turns into a clean, one-line failure."""


class LowrankError(Exception):
    """Bad input (config, data, checkpoint): the message names the key or the file."""


class ConfigError(LowrankError):
    """A config value is missing, of the wrong type or out of range."""


class DataError(LowrankError):
    """A dataset record, image, mask or annotation file is unusable."""


class CheckpointError(LowrankError):
    """A model checkpoint or a training checkpoint is missing or inconsistent."""
