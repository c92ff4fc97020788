"""User-facing errors: raised for bad input, caught by the CLI and printed without a traceback."""


class GptforgeError(Exception):
    """A mistake in the user's input or environment, with a message that says what to do."""


class ConfigError(GptforgeError):
    """A configuration key, type or value is wrong; the message names the key and the valid choices.

    One error may hold several problems (a file with three mistakes reports all three at once); `problems`
    lists them, each naming its key."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            super().__init__(f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(GptforgeError):
    """Input data or a data directory cannot be used; the message names the file and the problem."""


class CheckpointError(GptforgeError):
    """A checkpoint is missing, incomplete or fails its sha256 check."""


class UnloadableCheckpoint(CheckpointError):
    """A checkpoint that passed every check and still could not be loaded: passed over like a damaged one."""

    def __init__(self, path, reason: str):
        self.path = path
        super().__init__(f"checkpoint {path.name} could not be loaded: {reason}")
