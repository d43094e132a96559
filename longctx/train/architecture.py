"""The model's architecture taken from the init checkpoint, with `config.model` as overrides.

A recipe that fine-tunes a checkpoint writes `model_section(from_init=True, ...)`: every field
the checkpoint defines (ARCHITECTURE_FIELDS, RoPE included) is an unset placeholder, so it comes
from `init.path` (an HF directory's config.json or a longctx checkpoint's model_config.json).
Whatever the recipe, a stage or the command line sets is an override. For RoPE:

- nothing set: the checkpoint's RoPE;
- keys without `rope_type` (e.g. `--config.model.rope.theta=1e6`, ABF): the checkpoint's RoPE
  type with those keys replaced;
- a `rope_type` (e.g. yarn, factor 4): that scaling. `theta` and the trained length it needs
  (`original_max_position_embeddings`, ...) default to the checkpoint's.

The override must still fit the checkpoint's shapes: the trainer's load checks that and names
both values. Reads are JSON only (local or remote paths); the weights are loaded later.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from longctx import schema
from longctx.model import rope as rope_lib
from longctx.model.config import ModelConfig

# The ModelConfig fields a checkpoint's config defines; the others are training options.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "rms_norm_eps", "max_position_embeddings", "rope", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "qkv_bias", "qk_norm", "partial_rotary_factor",
    "sliding_window", "layer_types", "hidden_act", "rms_norm_offset", "scale_embeddings",
    "sandwich_norms", "query_pre_attn_scalar", "local_rope_theta", "family", "bos_token_id",
    "eos_token_id", "pad_token_id")
def _rope_fields() -> dict[str, type]:
  """The keys of every RoPE scaling and their placeholder types (lists, e.g. LongRoPE's
  factors, are tuples there)."""
  fields = {"rope_type": str}
  for cls in rope_lib.registered().values():
    fields.update({k: schema.placeholder_type(t) for k, t in schema.hints(cls).items()})
  return fields


def unset_architecture(**fields) -> dict[str, Any]:
  """`fields`, plus an unset placeholder for each architecture field not among them."""
  types = {k: schema.placeholder_type(t) for k, t in schema.hints(ModelConfig).items()}
  out = dict(fields)
  for name in ARCHITECTURE_FIELDS:
    if name == "rope" and name not in fields:
      out["rope"] = ml_collections.ConfigDict(
          {k: config_dict.placeholder(t) for k, t in _rope_fields().items()})
    elif name not in fields:
      out[name] = config_dict.placeholder(types[name])
  return out


def read_architecture(path: str) -> ModelConfig:
  """The ModelConfig of `path`: an HF directory (config.json) or a longctx checkpoint."""
  try:
    return ModelConfig.from_directory(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config init.path: {e}") from None


def unset_fields(section: Mapping[str, Any]) -> list[str]:
  names = [k for k, v in section.items() if v is None and k in ARCHITECTURE_FIELDS]
  rope = section.get("rope")
  if isinstance(rope, Mapping) and all(v is None for v in rope.values()):
    names.append("rope")
  return names


def resolve(section: Mapping[str, Any], base: ModelConfig | None) -> dict[str, Any]:
  """The model section with its unset fields taken from `base` (the init checkpoint's config);
  a ModelConfig.from_dict input."""
  unset = unset_fields(section)
  if base is None:  # nothing to fill from: fields that may be None (a window, a pad id) stay None
    unset = [k for k in unset if _NULLABLE.get(k) is not True]
  if not unset and not _partial_rope(section):
    return dict(section)
  if base is None:
    raise ValueError(f"{unset or ['rope']} unset; they come from the init "
                     "checkpoint, so set init.kind='hf' or 'checkpoint' and init.path (or set "
                     "them in config.model)")
  given = {k: v for k, v in section.items() if v is not None and k != "rope"}
  fields = {**{k: v for k, v in base.to_dict().items() if k in ARCHITECTURE_FIELDS}, **given}
  rope = section.get("rope")
  fields["rope"] = (rope_lib.override(base.rope, base.max_position_embeddings, rope)
                    if isinstance(rope, Mapping) else rope)
  return fields


# Architecture fields whose ModelConfig default is None (or empty: every layer of the window's
# kind): unset without a checkpoint, they take it.
_NULLABLE = {f.name: f.default is None or f.default == () for f in dataclasses.fields(ModelConfig)}


def _partial_rope(section: Mapping[str, Any]) -> bool:
  """Whether the section's RoPE leaves keys to the checkpoint: no rope_type, or a key unset
  whose scaling has a value for it (YaRN's attention_factor, say, may be None)."""
  rope = section.get("rope")
  if not isinstance(rope, Mapping):
    return False
  cls = rope_lib.registered().get(rope.get("rope_type"))
  if cls is None:
    return any(v is None for v in rope.values())
  nullable = {f.name for f in dataclasses.fields(cls) if f.default is None}
  return any(v is None and k not in nullable for k, v in rope.items() if k != "rope_type")


def init_defaults(cd: ml_collections.ConfigDict, stages: list[ml_collections.ConfigDict]
                  ) -> ModelConfig | None:
  """The init checkpoint's architecture where a stage leaves model fields unset (else None);
  fills each stage's empty `data.tokenizer_path` with the init directory's tokenizer file."""
  kind, path = str(cd.init.kind), str(cd.init.path)
  if kind == "random" or not path:
    return None
  from longctx.data.tokenizers import tokenizer_in
  for stage in stages:
    if not stage.data.tokenizer_path:
      stage.data.tokenizer_path = tokenizer_in(path, stage.data.tokenizer)
  needs = any(unset_fields(s.model.to_dict()) or _partial_rope(s.model.to_dict())
              for s in stages)
  return read_architecture(path) if needs else None
