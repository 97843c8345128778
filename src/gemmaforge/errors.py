"""Errors users can act on. The CLI prints them as one line and exits with code 2."""


class GemmaforgeError(Exception):
    """Base class: a problem with the user's input, reported in one line (no traceback)."""


class ConfigError(GemmaforgeError):
    """A config.json / recipe / preset that cannot be used (names the file and key)."""


class CheckpointError(GemmaforgeError):
    """A checkpoint file that is missing, truncated, or whose tensors do not fit the model."""


class DataError(GemmaforgeError):
    """Training or scoring data that cannot be read (names file:line)."""


class InputError(GemmaforgeError):
    """Bad runtime input: token ids outside the vocabulary, a prompt longer than the context..."""
