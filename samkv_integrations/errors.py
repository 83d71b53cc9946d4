"""Errors raised when a stored KV cache cannot be used as asked."""


class CacheError(Exception):
    """Base class for KV cache store errors."""


class CacheMissError(CacheError, KeyError):
    """No cache is stored under the requested key."""

    def __str__(self) -> str:
        # KeyError quotes its message; these messages are sentences.
        return str(self.args[0]) if self.args else ""


class CacheMismatchError(CacheError):
    """A stored cache was written by another model, format version or token sequence."""


class CacheCorruptedError(CacheError):
    """A stored cache failed its checksum or could not be parsed."""
