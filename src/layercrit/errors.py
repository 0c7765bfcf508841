"""The one exception type for user mistakes: the CLI prints its message as a single line, no traceback."""


class LayercritError(Exception):
    """A problem with the user's input (spec, data, checkpoint, option) and how to fix it, in one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), to quote in a one-line error."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
