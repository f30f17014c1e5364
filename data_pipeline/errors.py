"""The one error type of the data pipeline."""


class DataError(Exception):
    """Bad or missing data; the message names the shard, key or file."""
