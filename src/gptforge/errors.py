"""User-facing errors: raised for bad input, caught by the CLI and printed without a traceback."""


class GptforgeError(Exception):
    """A mistake in the user's input or environment, with a message that says what to do."""


class ConfigError(GptforgeError):
    """A configuration key, type or value is wrong; the message names the key and the valid choices."""


class DataError(GptforgeError):
    """Input data or a data directory cannot be used; the message names the file and the problem."""


class CheckpointError(GptforgeError):
    """A checkpoint is missing, incomplete or fails its sha256 check."""
