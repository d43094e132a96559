"""The errors a user can act on, which the commands print as one line and exit 2 with (no
traceback; `--debug` keeps it). Everything else is a bug and keeps its traceback. This module
imports nothing, so every layer can raise them."""


class DataError(ValueError):
  """A malformed record. `origin` is "file:line" (or "file:record N", "synthetic:N")."""

  def __init__(self, origin: str, expected: str, found: str):
    self.origin, self.expected, self.found = origin, expected, found
    super().__init__(f"{origin}: expected {expected}, found {found}")


class ConfigError(ValueError):
  """A config key or value longctx cannot use: the message names the key, what was expected and
  what was found."""


# What `user_error` looks for in an exception and the exceptions it was raised from.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError)


def user_error(error: BaseException) -> BaseException | None:
  """The user-facing error `error` is or was raised from (its __cause__ / __context__ chain, as
  grain and XLA wrap errors raised in their workers), or None for a bug."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, USER_ERRORS):
      return error
    error = error.__cause__ or error.__context__
  return None
