"""The exceptions data_pipelines raises for callers to handle. Imports nothing, so any module can use them."""


class UsageError(Exception):
    """A problem with how a command was called or where it points; the CLI prints it as one line
    `kakehashi: error: MESSAGE` and exits 2."""


class TooManyBadSamples(Exception):
    """The share of bad samples read passed the loader's `bad_sample_limit`. The message is one line."""
