"""The one exception type for user mistakes: the CLI prints its message as a single line, no traceback."""


class LayercritError(Exception):
    """A problem with the user's input (spec, data, checkpoint, option) and how to fix it, in one line."""
