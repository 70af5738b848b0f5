"""One exception type for bad input, so the command line can print it as one clear line."""


class LLMLabError(Exception):
    """A user-facing error: the message names the file, field or option and what was expected."""
