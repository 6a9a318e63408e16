"""The one exception type users see: it says what was wrong, where, and what to do."""


class FusionpipeError(Exception):
    """A problem the user can fix (bad input, missing weights, mismatched cache).

    The CLI prints its message without a traceback and exits with status 1.
    """
