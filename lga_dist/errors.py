"""The base of every error whose message tells the user what to do.

Jobs catch ``UserError`` at the top, print its one-line message and exit non-zero
without a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, configuration or environment, explained in one line."""
