"""The error whose message is meant for the user as it is."""


class CommandError(Exception):
    """A failure whose message is meant for the user as it is: the command line prints it on one
    line (``memkd: error: <message>``) without naming the exception type."""
