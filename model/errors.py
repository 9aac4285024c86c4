"""The one exception type that crosses module boundaries for user-facing failures.

A ``MaskrayError`` message is a complete, one-line explanation naming the file, URI,
row or field at fault; the CLI prints it without a traceback (``--verbose`` adds it).
"""


class MaskrayError(Exception):
    """A failure caused by input, configuration or environment, not by a bug."""


MAX_ERROR_CHARS = 500  # error messages are stored per row (results files): keep them bounded


def error_text(exc: BaseException) -> str:
    """One bounded line naming the exception type and its first message line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:MAX_ERROR_CHARS]
