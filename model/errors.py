"""The one exception type that crosses module boundaries for user-facing failures.

A ``MaskrayError`` message is a complete, one-line explanation naming the file, URI,
row or field at fault; the CLI prints it without a traceback (``--verbose`` adds it).
"""


class MaskrayError(Exception):
    """A failure caused by input, configuration or environment, not by a bug."""
