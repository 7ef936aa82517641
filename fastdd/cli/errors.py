"""User-facing errors of the command line: one line on stderr, exit code 2."""


class UsageError(Exception):
    """Bad input named in one line; the CLI prints it and exits with code 2."""
