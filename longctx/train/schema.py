"""One schema for a config section: its dataclass. The ConfigDict defaults and the reader are
derived from the dataclass fields, so the three cannot drift apart.

Field types and their ConfigDict form:
  int, float, bool, str       as is
  an enum.Enum                its value (a string), read back by `parse_enum`
  tuple[str, ...] / [int, …]  a comma-separated string ("" = empty)
  int | None                  an int, 0 = None (tile sizes: "the default")
Field metadata `check`: a predicate on the read value; `expect`: what it means, for the error.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, Callable

import ml_collections

from longctx.data.config import parse_enum
from longctx.errors import ConfigError

POSITIVE = dict(check=lambda v: v > 0, expect="> 0")
NON_NEGATIVE = dict(check=lambda v: v >= 0, expect=">= 0")


def field(default: Any, check: Callable[[Any], bool] | None = None, expect: str = "") -> Any:
  """A dataclass field with a default and an optional check (see the module docstring)."""
  return dataclasses.field(default=default, metadata=dict(check=check, expect=expect))


@functools.lru_cache(maxsize=None)
def _types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _optional_int(tp) -> bool:
  return (isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union) and \
      set(typing.get_args(tp)) == {int, type(None)}


def to_config_value(tp, value):
  """A field value in its ConfigDict form."""
  if isinstance(value, enum.Enum):
    return value.value
  if typing.get_origin(tp) is tuple:
    return ",".join(str(x) for x in value)
  if _optional_int(tp):
    return value or 0
  return value


def defaults(cls) -> ml_collections.ConfigDict:
  """The ConfigDict section of dataclass `cls`: every field at its default."""
  hints = _types(cls)
  return ml_collections.ConfigDict({f.name: to_config_value(hints[f.name], f.default)
                                    for f in dataclasses.fields(cls)})


def _read_value(tp, raw, where: str):
  if isinstance(tp, type) and issubclass(tp, enum.Enum):
    return parse_enum(tp, raw, where)
  if typing.get_origin(tp) is tuple:
    (item, _) = typing.get_args(tp)
    parts = [t.strip() for t in str(raw).split(",") if t.strip()]
    try:
      return tuple(item(t) for t in parts)
    except ValueError:
      raise ConfigError(f"config {where}: expected comma-separated {item.__name__} values, "
                        f"found {raw!r}") from None
  if _optional_int(tp):
    value = int(raw or 0)
    if value < 0:
      raise ConfigError(f"config {where}: expected > 0, or 0 for the default; found {value}")
    return value or None
  if tp is bool:
    if not isinstance(raw, (bool, int)):
      raise ConfigError(f"config {where}: expected true or false, found {raw!r}")
    return bool(raw)
  try:
    return tp(raw)
  except (TypeError, ValueError):
    raise ConfigError(f"config {where}: expected {tp.__name__}, found {raw!r}") from None


def read(cls, cd: ml_collections.ConfigDict | None, section: str, **values):
  """Dataclass `cls` from ConfigDict section `cd` (missing keys: the defaults; None: all
  defaults). ValueError names `section.key`, what was expected and what was found. `values`:
  fields set by the caller (after their own checks), not read from `cd`."""
  hints = _types(cls)
  for f in dataclasses.fields(cls):
    if f.name in values:
      continue
    where = f"{section}.{f.name}"
    raw = cd.get(f.name, None) if cd is not None else None
    value = f.default if raw is None else _read_value(hints[f.name], raw, where)
    check = f.metadata.get("check")
    if check is not None and not check(value):
      raise ConfigError(f"config {where}: expected {f.metadata['expect']}, found {value}")
    values[f.name] = value
  return cls(**values)
