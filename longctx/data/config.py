"""Typed data configuration, read once from an ml_collections ConfigDict (DESIGN.md contract 4).

Library code takes `DataConfig`, never the ConfigDict. Every string option becomes an Enum here,
so a mistyped value fails at the boundary with the allowed values listed.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import TypeVar

import ml_collections

from longctx.data.objective import ObjectiveMode
from longctx.errors import ConfigError

E = TypeVar("E", bound=enum.Enum)


class SourceKind(enum.Enum):
  """Where examples come from."""
  SYNTHETIC = "synthetic"       # LongAlign-like conversations, passkey or needle documents
  JSONL = "jsonl"
  PARQUET = "parquet"
  ARRAY_RECORD = "array_record"  # each record: UTF-8 JSON of one example


class SyntheticKind(enum.Enum):
  LONGALIGN = "longalign"
  PASSKEY = "passkey"
  PASSKEY_TEXT = "passkey_text"  # the same document as plain text: every token a target
  NEEDLE = "needle"


class TokenizerKind(enum.Enum):
  BYTE = "byte"
  HF = "hf"                      # local tokenizer.json
  SENTENCEPIECE = "sentencepiece"  # local .model


class TemplateKind(enum.Enum):
  PLAIN = "plain"    # plain LM: every token is a target
  LLAMA2 = "llama2"  # [INST] … [/INST] answer </s>
  CHATML = "chatml"  # <|im_start|>role\n … <|im_end|>
  MODEL = "model"    # the tokenizer directory's own jinja chat template (data/chat_template.py)


class OverLengthPolicy(enum.Enum):
  """What to do with an example longer than max_len (never silent: counted in stats)."""
  ERROR = "error"
  DROP = "drop"
  TRUNCATE_RIGHT = "truncate_right"
  TRUNCATE_MIDDLE = "truncate_middle"  # keep head and tail halves, as LongBench does


class BadExamplePolicy(enum.Enum):
  """Malformed records: raise with file:line, or skip them and count them."""
  ERROR = "error"
  SKIP = "skip"


class BatchingKind(enum.Enum):
  PACKED = "packed"  # rows of max_len holding several documents (LongAlign packing)
  SORTED = "sorted"  # one document per row, batches of similar length (LongAlign sorted batching)


def parse_enum(enum_cls: type[E], value: str, where: str) -> E:
  """`enum_cls(value)`, or ValueError naming the allowed values and the config key."""
  try:
    return enum_cls(value)
  except ValueError:
    allowed = ", ".join(repr(m.value) for m in enum_cls)
    raise ConfigError(f"config {where}: expected one of {allowed}, found {value!r}") from None


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  kind: SourceKind
  paths: tuple[str, ...]       # globs; one entry per mixed source
  weights: tuple[float, ...]   # empty: sources concatenated; else mixed with these weights
  synthetic_kind: SyntheticKind
  num_examples: int            # synthetic only
  min_tokens: int              # synthetic only: length range (byte tokens)
  max_tokens: int


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the data pipeline needs; see `default_config()` for the meaning of each key."""
  source: SourceConfig
  tokenizer: TokenizerKind
  tokenizer_path: str
  template: TemplateKind
  max_len: int
  over_length: OverLengthPolicy
  bad_example: BadExamplePolicy
  batching: BatchingKind
  batch_size: int       # rows per process per step
  window: int           # examples packed / sorted together
  pad_multiple: int     # sorted batching: seq_len rounded up to this (mesh × layout needs)
  objective: ObjectiveMode
  seed: int
  num_epochs: int       # 0 = repeat forever
  num_workers: int      # tokenization worker processes (0 = in process)

  @classmethod
  def from_config_dict(cls, cd: ml_collections.ConfigDict) -> "DataConfig":
    """Build from the `data` section of a config; raises ValueError on bad values."""
    s = cd.source
    paths = tuple(p.strip() for p in s.paths.split(",") if p.strip())
    weights = tuple(float(w) for w in s.weights.split(",") if w.strip())
    if weights and len(weights) != len(paths):
      raise ConfigError(f"config data.source.weights: expected {len(paths)} weights (one per "
                        f"path), found {len(weights)}: {s.weights!r}")
    cfg = cls(
        source=SourceConfig(
            kind=parse_enum(SourceKind, s.kind, "data.source.kind"), paths=paths, weights=weights,
            synthetic_kind=parse_enum(SyntheticKind, s.synthetic_kind, "data.source.synthetic_kind"),
            num_examples=int(s.num_examples), min_tokens=int(s.min_tokens),
            max_tokens=int(s.max_tokens)),
        tokenizer=parse_enum(TokenizerKind, cd.tokenizer, "data.tokenizer"),
        tokenizer_path=cd.tokenizer_path,
        template=parse_enum(TemplateKind, cd.template, "data.template"),
        max_len=int(cd.max_len),
        over_length=parse_enum(OverLengthPolicy, cd.over_length, "data.over_length"),
        bad_example=parse_enum(BadExamplePolicy, cd.bad_example, "data.bad_example"),
        batching=parse_enum(BatchingKind, cd.batching, "data.batching"),
        batch_size=int(cd.batch_size), window=int(cd.window), pad_multiple=int(cd.pad_multiple),
        objective=parse_enum(ObjectiveMode, cd.objective, "data.objective"),
        seed=int(cd.seed), num_epochs=int(cd.num_epochs), num_workers=int(cd.num_workers))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    """Raise ValueError on inconsistent values (expected / found)."""
    for name in ("max_len", "batch_size", "window", "pad_multiple"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"config data.{name}: expected > 0, found {getattr(self, name)}")
    if self.max_len % self.pad_multiple:
      raise ConfigError(f"config data.max_len: expected a multiple of pad_multiple="
                        f"{self.pad_multiple}, found {self.max_len}")
    if self.batching is BatchingKind.SORTED and self.window % self.batch_size:
      raise ConfigError(f"config data.window: sorted batching needs a multiple of batch_size="
                        f"{self.batch_size}, found {self.window}")
    if self.source.kind is not SourceKind.SYNTHETIC and not self.source.paths:
      raise ConfigError(f"config data.source.paths: expected at least one path for source kind "
                        f"{self.source.kind.value!r}, found none")
    if self.tokenizer is not TokenizerKind.BYTE and not self.tokenizer_path:
      raise ConfigError(f"config data.tokenizer_path: expected a local file for tokenizer "
                        f"{self.tokenizer.value!r}, found ''")
    if self.num_epochs < 0 or self.num_workers < 0:
      raise ConfigError("config data.num_epochs / num_workers: expected >= 0, found "
                        f"{self.num_epochs} / {self.num_workers}")


def default_config() -> ml_collections.ConfigDict:
  """The `data` section with the embedded default: synthetic LongAlign-like SFT, byte tokens."""
  cd = ml_collections.ConfigDict()
  cd.source = ml_collections.ConfigDict(dict(
      kind="synthetic", paths="", weights="", synthetic_kind="longalign",
      num_examples=256, min_tokens=1024, max_tokens=65536))
  cd.tokenizer = "byte"
  cd.tokenizer_path = ""
  cd.template = "llama2"
  cd.max_len = 65536
  cd.over_length = "truncate_middle"
  cd.bad_example = "error"
  cd.batching = "packed"
  cd.batch_size = 1        # rows per logical shard per step
  cd.num_shards = 1        # logical data shards (trainer): global rows = num_shards x batch_size,
                           # independent of the number of hosts, so runs are exact across layouts
  cd.window = 512
  cd.pad_multiple = 128
  cd.objective = "sequence"
  cd.seed = 0
  cd.num_epochs = 1
  cd.num_workers = 0
  return cd


def jsonl_section(paths: str, tokenizer_path: str, *, max_len: int, template: str = "plain",
                  objective: str = "token", num_shards: int = 1, tokenizer: str = "sentencepiece",
                  over_length: str = "truncate_right", num_workers: int = 8
                  ) -> ml_collections.ConfigDict:
  """A recipe's `data` section: packed rows of `max_len` tokens from local jsonl files.

  The source repeats (`num_epochs=0`), so `train.steps` ends each stage; one row per logical
  shard per micro-batch (`batch_size=1`). Every other key keeps `default_config()`'s value.
  """
  cd = default_config()
  cd.source.kind, cd.source.paths = "jsonl", paths
  cd.tokenizer, cd.tokenizer_path, cd.template = tokenizer, tokenizer_path, template
  cd.max_len, cd.over_length, cd.objective = max_len, over_length, objective
  cd.batching, cd.num_shards, cd.batch_size = "packed", num_shards, 1
  cd.num_epochs, cd.num_workers = 0, num_workers
  return cd
