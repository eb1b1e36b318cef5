"""User-facing errors: the CLI prints these as one line, without a traceback, and exits 1."""


class UserError(Exception):
    """Bad input from the user (paths, flags, data, configs), as opposed to a bug."""
