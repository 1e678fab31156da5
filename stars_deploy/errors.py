"""The one exception family that the CLI turns into a one-line error and exit code 2."""


class StarsDeployError(Exception):
    """A user-facing error: the message names the file, layer or option and what to do."""


class CheckpointError(StarsDeployError):
    """A checkpoint that is missing, unreadable, or does not fit its architecture."""


class ConfigError(StarsDeployError):
    """An option or configuration value that is out of range or unknown."""


class DataError(StarsDeployError):
    """Evaluation data that is missing, malformed, or does not fit the teacher."""
