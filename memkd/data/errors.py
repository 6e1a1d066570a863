"""The one error type of memkd.data."""


class DatasetError(ValueError):
    """A dataset on disk does not match its layout; the message names the offending path."""
