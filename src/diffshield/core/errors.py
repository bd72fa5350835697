"""The one exception type users see: a one-line message that says what is wrong and how to fix it."""


class DiffshieldError(Exception):
    """A user-facing error. The CLI prints ``diffshield: error: <message>`` and exits with status 2."""
