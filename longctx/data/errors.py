"""The one error type for bad data: says what was expected, what was found and where (defined in
longctx/errors.py beside the other errors a user acts on)."""
from longctx.errors import DataError

__all__ = ["DataError"]
