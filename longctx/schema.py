"""The one config mechanism: a config section is its dataclass. The ConfigDict defaults
(`defaults`), the reader (`read`) and the checks are derived from the dataclass fields, so they
cannot drift apart. Every section (init, mesh, attention, lora, train, checkpoint, eval, data
with its source) is read here; `model` is the one exception in form, not in principle: its
dataclass (`model.config.ModelConfig`) is also the schema of checkpoints' model_config.json,
so `train.config.model_section` derives the section from its fields and `ModelConfig.from_dict`
reads it (its enum through `Name.parse`, its tuples from comma-separated strings).

Field types and their ConfigDict form:
  int, float, bool, str       as is
  an enum.Enum                its value (a string), read back by `parse_enum` (longctx.names)
  tuple[str, ...] / [int, …]  a comma-separated string ("" = empty)
  int | None                  an int, 0 = None (tile sizes: "the default")
  a dataclass                 a nested section (data.source)
Field metadata `check`: a predicate on the read value; `expect`: what it means, for the error.
A dataclass's own `__post_init__` checks what involves several fields (raising ConfigError).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, Callable

import ml_collections

from longctx.errors import ConfigError

E = typing.TypeVar("E", bound=enum.Enum)

POSITIVE = dict(check=lambda v: v > 0, expect="> 0")
NON_NEGATIVE = dict(check=lambda v: v >= 0, expect=">= 0")


def field(default: Any, check: Callable[[Any], bool] | None = None, expect: str = "") -> Any:
  """A dataclass field with a default and an optional check (see the module docstring)."""
  return dataclasses.field(default=default, metadata=dict(check=check, expect=expect))


def parse_enum(enum_cls: type[E], value, where: str) -> E:
  """`enum_cls(value)` (a `Name` also takes any case, "-" for "_" and its old names), or
  ConfigError naming the config key and the allowed values."""
  try:
    return enum_cls(value) if not isinstance(value, enum_cls) else value
  except ValueError:
    allowed = ", ".join(repr(m.value) for m in enum_cls)
    raise ConfigError(f"config {where}: expected one of {allowed}, found {value!r}") from None


@functools.lru_cache(maxsize=None)
def _types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _optional_int(tp) -> bool:
  return (isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union) and \
      set(typing.get_args(tp)) == {int, type(None)}


def placeholder_type(tp) -> type:
  """The type of an unset ConfigDict field (`config_dict.placeholder`) of field type `tp`: what
  a recipe or the command line may set it to (int | None: int; tuple[...]: tuple; an enum:
  str)."""
  args = [a for a in typing.get_args(tp) if a is not type(None)]
  if (isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union) and len(args) == 1:
    tp = args[0]
  if typing.get_origin(tp) is tuple:
    return tuple
  if isinstance(tp, type) and issubclass(tp, enum.Enum):
    return str
  return tp


def hints(cls) -> dict[str, Any]:
  """The field types of dataclass `cls`, resolved (annotations are strings under
  `from __future__ import annotations`; class variables left out)."""
  return {f.name: _types(cls)[f.name] for f in dataclasses.fields(cls)}


def field_type(cls, path: str):
  """The type of the field at dotted `path` in dataclass `cls` (nested sections followed), or
  None when there is none."""
  head, _, rest = path.partition(".")
  tp = hints(cls).get(head) if dataclasses.is_dataclass(cls) else None
  if tp is None or not rest:
    return tp
  return field_type(tp, rest) if dataclasses.is_dataclass(tp) else None


def same_value(cls, path: str, a, b) -> bool:
  """Whether config values `a` and `b` at `path` of section `cls` mean the same: equal, or the
  same member of the field's enum (an old name and its new one)."""
  if a == b:
    return True
  tp = field_type(cls, path)
  if not (isinstance(tp, type) and issubclass(tp, enum.Enum)):
    return False
  try:
    return tp(a) is tp(b)
  except ValueError:
    return False


def to_config_value(tp, value):
  """A field value in its ConfigDict form."""
  if dataclasses.is_dataclass(tp):
    return _section(value)
  if isinstance(value, enum.Enum):
    return value.value
  if typing.get_origin(tp) is tuple:
    return ",".join(str(x) for x in value)
  if _optional_int(tp):
    return value or 0
  return value


def _default(f: dataclasses.Field):
  return f.default_factory() if f.default is dataclasses.MISSING else f.default


def defaults(cls) -> ml_collections.ConfigDict:
  """The ConfigDict section of dataclass `cls`: every field at its default."""
  return _section(cls())


def _section(obj) -> ml_collections.ConfigDict:
  """The ConfigDict section of dataclass instance `obj` (what `read` reads back to `obj`)."""
  hints = _types(type(obj))
  return ml_collections.ConfigDict({f.name: to_config_value(hints[f.name], getattr(obj, f.name))
                                    for f in dataclasses.fields(obj)})


def read_value(tp, raw, where: str):
  """A ConfigDict value (or a JSON one) of field type `tp`, typed; ConfigError names `where`."""
  if dataclasses.is_dataclass(tp):
    return read(tp, raw, where)
  if isinstance(tp, type) and issubclass(tp, enum.Enum):
    return parse_enum(tp, raw, where)
  if typing.get_origin(tp) is tuple:
    (item, _) = typing.get_args(tp)
    parts = ([str(t) for t in raw] if isinstance(raw, (list, tuple)) else
             [t.strip() for t in str(raw).split(",") if t.strip()])
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
    value = _default(f) if raw is None else read_value(hints[f.name], raw, where)
    check = f.metadata.get("check")
    if check is not None and not check(value):
      raise ConfigError(f"config {where}: expected {f.metadata['expect']}, found {value}")
    values[f.name] = value
  return cls(**values)
