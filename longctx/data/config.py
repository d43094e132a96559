"""Typed data configuration, read once from an ml_collections ConfigDict (DESIGN.md contract 4).

Library code takes `DataConfig`, never the ConfigDict. The dataclasses below are the schema: the
`data` section's defaults, reader and checks come from them (`longctx.schema`). Every string
option becomes a `Name` enum here, so a mistyped value fails at the boundary with the allowed
values listed.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from longctx import schema
from longctx.data.objective import ObjectiveMode
from longctx.errors import ConfigError
from longctx.names import Name


class SourceKind(Name):
  """Where examples come from."""
  SYNTHETIC = "synthetic"       # LongAlign-like conversations, passkey or needle documents
  JSONL = "jsonl"
  PARQUET = "parquet"
  ARRAY_RECORD = "array_record"  # each record: UTF-8 JSON of one example


class SyntheticKind(Name):
  LONGALIGN = "longalign"
  PASSKEY = "passkey"
  PASSKEY_TEXT = "passkey_text"  # the same document as plain text: every token a target
  NEEDLE = "needle"


class TokenizerKind(Name):
  BYTE = "byte"
  HF = "hf"                      # local tokenizer.json
  SENTENCEPIECE = "sentencepiece"  # local .model


class TemplateKind(Name):
  PLAIN = "plain"    # plain LM: every token is a target
  LLAMA2 = "llama2"  # [INST] … [/INST] answer </s>
  CHATML = "chatml"  # <|im_start|>role\n … <|im_end|>
  MODEL = "model"    # the tokenizer directory's own jinja chat template (data/chat_template.py)


class OverLengthPolicy(Name):
  """What to do with an example longer than max_len (never silent: counted in stats)."""
  ERROR = "error"
  DROP = "drop"
  TRUNCATE_RIGHT = "truncate_right"
  TRUNCATE_MIDDLE = "truncate_middle"  # keep head and tail halves, as LongBench does


class BadExamplePolicy(Name):
  """Malformed records: raise with file:line, or skip them and count them."""
  ERROR = "error"
  SKIP = "skip"


class BatchingKind(Name):
  PACKED = "packed"  # rows of max_len holding several documents (LongAlign packing)
  SORTED = "sorted"  # one document per row, batches of similar length (LongAlign sorted batching)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """Where examples come from (`data.source`)."""
  kind: SourceKind = SourceKind.SYNTHETIC
  paths: tuple[str, ...] = ()      # globs; one entry per mixed source
  weights: tuple[float, ...] = ()  # empty: sources concatenated; else mixed with these weights
  synthetic_kind: SyntheticKind = SyntheticKind.LONGALIGN
  num_examples: int = schema.field(256, **schema.POSITIVE)     # synthetic only
  min_tokens: int = schema.field(1024, **schema.POSITIVE)      # synthetic only: length range
  max_tokens: int = schema.field(65536, **schema.POSITIVE)     # (byte tokens)

  def __post_init__(self):
    if self.weights and len(self.weights) != len(self.paths):
      raise ConfigError(f"config data.source.weights: expected {len(self.paths)} weights (one "
                        f"per path), found {len(self.weights)}: {list(self.weights)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the data pipeline needs: the `data` section of a config, whose defaults
  (`default_config()`) are the embedded default, synthetic LongAlign-like SFT in byte tokens."""
  source: SourceConfig = SourceConfig()
  tokenizer: TokenizerKind = TokenizerKind.BYTE
  tokenizer_path: str = ""
  template: TemplateKind = TemplateKind.LLAMA2
  max_len: int = schema.field(65536, **schema.POSITIVE)
  over_length: OverLengthPolicy = OverLengthPolicy.TRUNCATE_MIDDLE
  bad_example: BadExamplePolicy = BadExamplePolicy.ERROR
  batching: BatchingKind = BatchingKind.PACKED
  batch_size: int = schema.field(1, **schema.POSITIVE)  # rows per logical shard per step
  # logical data shards (trainer): global rows = num_shards x batch_size, independent of the
  # number of hosts, so runs are exact across layouts
  num_shards: int = schema.field(1, **schema.POSITIVE)
  window: int = schema.field(512, **schema.POSITIVE)        # examples packed / sorted together
  # sorted batching: seq_len rounded up to this (mesh × layout needs)
  pad_multiple: int = schema.field(128, **schema.POSITIVE)
  objective: ObjectiveMode = ObjectiveMode.SEQUENCE
  seed: int = 0
  num_epochs: int = schema.field(1, **schema.NON_NEGATIVE)   # 0 = repeat forever
  num_workers: int = schema.field(0, **schema.NON_NEGATIVE)  # tokenization processes (0: inline)

  def __post_init__(self):
    """What involves several keys (each key's own range is checked by `schema.read`)."""
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

  @classmethod
  def from_config_dict(cls, cd: ml_collections.ConfigDict) -> "DataConfig":
    """The `data` section of a config, typed and checked (`schema.read`)."""
    return schema.read(cls, cd, "data")


def default_config() -> ml_collections.ConfigDict:
  """The `data` section with the embedded default (the `DataConfig` field defaults)."""
  return schema.defaults(DataConfig)


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
