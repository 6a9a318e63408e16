"""The one exception type users see: it says what was wrong, where, and what to do."""

import re

# scheme://user:password@host/...: the userinfo part of a URL (credentials) is never printed
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with the userinfo of every URL in it replaced by ***: s3://key:secret@host/x -> s3://***@host/x."""
    return _USERINFO.sub(r"\1***@", str(text))


class FusionpipeError(Exception):
    """A problem the user can fix (bad input, missing weights, mismatched cache).

    The CLI prints its message without a traceback and exits with status 1. URLs in the message
    are redacted: credentials in a store URL never reach a terminal or a log.
    """

    def __init__(self, message: str = ""):
        super().__init__(redact(message))
