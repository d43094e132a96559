"""`Name`: the base of every enum a user spells (config values, command-line choices), and the
one way they are parsed.

A Name is a str enum: a member equals, hashes, formats and reprs as its value, so a config's
string and the typed member are interchangeable at the boundary, and messages (and a spec's
repr) print the plain name. `Cls.parse(text)` accepts any case and "-" for "_", and an old name
recorded with `renamed` (with a note on stderr naming the new one, once per process); anything
else is a ValueError listing the names. `schema.parse_enum` adds the config key to that error.
The renamings are listed in docs/DESIGN.md ("Glossary").
"""
from __future__ import annotations

import enum
import sys
from typing import TypeVar

N = TypeVar("N", bound="Name")

# Name class -> {old value: current value}; filled by `renamed`.
_RENAMED: dict[type, dict[str, str]] = {}
_NOTED: set[tuple[type, str]] = set()


class Name(str, enum.Enum):
  def __str__(self) -> str:
    return self.value

  def __format__(self, spec: str) -> str:
    return format(self.value, spec)

  def __repr__(self) -> str:
    return repr(self.value)

  @classmethod
  def _missing_(cls, value):
    text = str(value).strip().lower().replace("-", "_")
    for member in cls:
      if member.value == text:
        return member
    new = _RENAMED.get(cls, {}).get(text)
    if new is None:
      return None
    if (cls, text) not in _NOTED:
      _NOTED.add((cls, text))
      print(f"note: {cls.__name__} {text!r} is now called {new!r}; the old name still works",
            file=sys.stderr)
    return cls(new)

  @classmethod
  def parse(cls: type[N], value: "N | str", what: str | None = None) -> N:
    """The member named `value`; ValueError naming `what` (default: the class) and the names."""
    try:
      return cls(value)
    except ValueError:
      raise ValueError(f"unknown {what or cls.__name__} {value!r}; expected one of "
                       f"{cls.names()}") from None

  @classmethod
  def names(cls) -> list[str]:
    return [m.value for m in cls]


def renamed(old_to_new: dict[str, str]):
  """Class decorator: old values that still parse (to the member named by the new value)."""
  def register(cls):
    for new in old_to_new.values():
      cls(new)  # a typo in the table fails at import
    _RENAMED[cls] = dict(old_to_new)
    return cls
  return register
