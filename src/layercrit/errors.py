"""The one exception type for user mistakes: the CLI prints its message as a single line, no traceback; and warnings
as one line too (:func:`show_warning`)."""

import sys


class LayercritError(Exception):
    """A problem with the user's input (spec, data, checkpoint, option) and how to fix it, in one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), to quote in a one-line error."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line, as an error is (``layercrit: warning: ...``): the CLI's and its sweep workers'
    ``warnings.showwarning``."""
    print(f"layercrit: warning: {message}", file=sys.stderr if file is None else file)
