"""The family registry, and the config.json keys every family shares.

A `Family` is data: its HF `model_type` and class, transformers' defaults for keys a config.json
may omit, the ModelConfig fields its HF class hard-codes (`fixed`), its fused HF weights, and two
small functions for its own keys. `read_hf` / `write_hf` run the shared keys, then the family's.
ModelConfig objects are passed in, never imported: model.config imports this package.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from longctx.model.rope import RopeScaling

# Keys of an HF config.json that never change the model's function (bookkeeping, generation
# defaults of old configs): read by nobody, reported by nobody.
BOOKKEEPING = frozenset((
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "_name_or_path", "auto_map", "tokenizer_class", "output_attentions",
    "output_hidden_states", "return_dict", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "finetuning_task", "task_specific_params", "chunk_size_feed_forward",
    "prefix", "sep_token_id", "decoder_start_token_id", "tie_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "torchscript", "pruned_heads",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "tf_legacy_loss", "use_bfloat16", "_attn_implementation_autoset", "initializer_range",
    "cache_implementation",
))

# Keys whose non-default values change the computation in ways longctx does not implement.
_ZERO_KEYS = ("attention_dropout", "resid_pdrop", "embd_pdrop", "hidden_dropout")
_NULL_KEYS = ("attn_logit_softcapping", "final_logit_softcapping", "quantization_config")

_MISSING = object()

# ModelConfig fields in which Gemma's decoder differs from the Llama lineage's, with the
# lineage's values: a family's HF class hard-codes these unless the family lists the field in
# `Family.reads` (it reads it from its keys) or sets it in `Family.fixed`.
LINEAGE = dict(rms_norm_offset=0.0, scale_embeddings=False, sandwich_norms=False,
               query_pre_attn_scalar=None, local_rope_theta=None)


class HfKeys:
  """A config.json dict read key by key: absent keys take the family's defaults, and the keys
  never read are known afterwards (`unread`)."""

  def __init__(self, hf: Mapping[str, Any], family: "Family"):
    self.hf, self.family, self.seen = dict(hf), family, set()

  def get(self, key: str, default: Any = _MISSING) -> Any:
    """The value of `key`; when absent, `default` or else the family's default (None if it has
    none). An explicit null stays None, as transformers reads it."""
    self.seen.add(key)
    if key in self.hf:
      return self.hf[key]
    return self.family.defaults.get(key) if default is _MISSING else default

  def require(self, key: str) -> Any:
    value = self.get(key)
    if value is None:
      raise ValueError(f"HF config ({self.family.model_type}) is missing the required key "
                       f"{key!r}")
    return value

  def refuse(self, key: str, why: str, value: Any = _MISSING) -> None:
    value = self.hf.get(key) if value is _MISSING else value
    raise ValueError(f"HF config ({self.family.model_type}) key {key}={value!r}: {why}; "
                     "longctx refuses it rather than compute another model")

  def expect(self, key: str, allowed: tuple, why: str) -> None:
    """Refuses `key` unless its value (absent: the family's default) is among `allowed`."""
    if self.get(key) not in allowed:
      self.refuse(key, why)

  def unread(self) -> list[str]:
    return sorted(set(self.hf) - self.seen - BOOKKEEPING)


@dataclasses.dataclass(frozen=True)
class Family:
  """One HF model family.

  defaults: transformers' values for keys a config.json may omit (its config class defaults).
  fixed: ModelConfig fields this family's HF class hard-codes; a config read must give them and
    an export must have them.
  fused: HF module -> the longctx projections stacked (along the output) in its weight, e.g.
    Phi-3's {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj")}.
  read: (HfKeys, the shared fields) -> the family's fields (it may refuse keys).
  write: ModelConfig -> the family's own config.json keys.
  reads: LINEAGE fields the family reads from its keys instead of hard-coding them.
  activation_key: the config.json key of the MLP's activation (Gemma's `hidden_activation`).
  """
  model_type: str
  architecture: str
  defaults: Mapping[str, Any]
  fixed: Mapping[str, Any]
  read: Callable[[HfKeys, dict], dict]
  write: Callable[[Any], dict]
  fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  reads: tuple[str, ...] = ()
  activation_key: str = "hidden_act"

  def hard_coded(self) -> dict[str, Any]:
    """The ModelConfig fields this family's HF class hard-codes, with their values."""
    return {**{k: v for k, v in LINEAGE.items() if k not in self.reads}, **self.fixed}

  def hf_module(self, module: str) -> str:
    """The HF module holding longctx projection `module` ("self_attn.q_proj", or the fused
    "self_attn.qkv_proj"), relative to a layer."""
    group, _, name = module.rpartition(".")
    for fused, parts in self.fused.items():
      if fused.rpartition(".")[0] == group and name in parts:
        return fused
    return module


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
  if family.model_type in _REGISTRY:
    raise ValueError(f"model family {family.model_type!r} is registered twice")
  _REGISTRY[family.model_type] = family
  return family


def families() -> list[str]:
  return sorted(_REGISTRY)


# model_type -> what to do instead, for families close to a registered one
_HINTS = {"gemma3": "this is Gemma3ForConditionalGeneration (vision and text); longctx reads "
                    "the text decoder alone, model_type 'gemma3_text' (Gemma3ForCausalLM, as "
                    "Gemma 3 1B ships): save its language model as Gemma3ForCausalLM first"}


def get(model_type: str) -> Family:
  if model_type not in _REGISTRY:
    hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
    raise ValueError(f"model_type {model_type!r} is not supported{hint}; longctx reads the "
                     f"families {families()}")
  return _REGISTRY[model_type]


@dataclasses.dataclass(frozen=True)
class HfReading:
  """ModelConfig fields read from a config.json, and notes for the user (which keys were not
  read)."""
  fields: dict
  notes: tuple[str, ...]


def read_hf(hf: Mapping[str, Any]) -> HfReading:
  """ModelConfig fields of an HF config.json dict of any registered family.

  Raises ValueError naming the key and value for what longctx does not implement, and listing
  the supported families for an unknown `model_type`.
  """
  family = get(hf.get("model_type", "llama"))
  keys = HfKeys(hf, family)
  fields = _read_shared(keys)
  fields.update(family.read(keys, fields))
  for name, value in family.hard_coded().items():
    if fields.setdefault(name, value) != value:
      keys.refuse(_HF_KEY.get(name, name), f"transformers' {family.architecture} has "
                  f"{name}={value!r}", fields[name])
  _canonical_layer_types(fields)
  notes = []
  if keys.unread():
    notes.append(f"HF config ({family.model_type}): keys not read by longctx (nor, for "
                 f"{family.architecture}, by transformers as far as longctx knows): "
                 f"{keys.unread()}")
  return HfReading(fields, tuple(notes))


def _canonical_layer_types(fields: dict) -> None:
  """A family's per-layer kinds (`layer_types`, transformers' names) as ModelConfig holds them:
  () when every layer has the default kind (sliding when there is a window, else full)."""
  kinds = tuple(fields.get("layer_types") or ())
  default = "full_attention" if fields.get("sliding_window") is None else "sliding_attention"
  fields["layer_types"] = () if all(k == default for k in kinds) else kinds


def check_uniform_window(cfg: Any) -> None:
  """ValueError unless every layer of `cfg` slides by `sliding_window` (or none does): what an
  HF class with one window for all layers (Mistral, Phi-3) can hold."""
  if set(cfg.layer_windows) != {cfg.sliding_window}:
    family = get(cfg.family)
    raise ValueError(f"model.layer_types={[str(t) for t in cfg.layer_types]} with "
                     f"sliding_window={cfg.sliding_window}: the {family.model_type} family's HF "
                     f"class ({family.architecture}) gives every layer the same window and "
                     "cannot hold layers of different kinds")


# ModelConfig field -> the config.json key a refusal names
_HF_KEY = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads", "rope": "rope_scaling"}


def _read_shared(keys: HfKeys) -> dict:
  """The fields every family reads the same way."""
  heads = int(keys.require("num_attention_heads"))
  hidden = int(keys.require("hidden_size"))
  act = keys.family.activation_key
  keys.expect(act, ("silu", "gelu_pytorch_tanh"), "the MLP gates with SiLU or GELU-tanh only")
  for key in _ZERO_KEYS:
    if keys.get(key, 0.0) or 0.0:
      keys.refuse(key, "longctx trains without dropout")
  for key in _NULL_KEYS:
    if keys.get(key, None) is not None:
      keys.refuse(key, "not implemented")
  eos = keys.get("eos_token_id")
  return dict(
      vocab_size=int(keys.require("vocab_size")), hidden_size=hidden,
      intermediate_size=int(keys.require("intermediate_size")),
      num_layers=int(keys.require("num_hidden_layers")), num_heads=heads,
      num_kv_heads=int(keys.get("num_key_value_heads") or heads),
      head_dim=int(keys.get("head_dim") or hidden // heads),
      rms_norm_eps=float(keys.get("rms_norm_eps")),
      max_position_embeddings=int(keys.get("max_position_embeddings")),
      rope=read_rope(keys), partial_rotary_factor=_partial_rotary_factor(keys),
      tie_word_embeddings=bool(keys.get("tie_word_embeddings")),
      bos_token_id=keys.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
      pad_token_id=keys.get("pad_token_id"),
      initializer_range=float(keys.get("initializer_range", 0.02)),
      hidden_act=keys.get(act), family=keys.family.model_type)


def rope_params(keys: HfKeys) -> dict:
  """The RoPE parameters of a 4.x (`rope_scaling`, `rope_theta`) or 5.x (`rope_parameters`)
  config, with `rope_type` set."""
  params = dict(keys.get("rope_parameters", None) or keys.get("rope_scaling", None) or {})
  if "full_attention" in params:  # one RoPE per layer kind (Gemma 3, 5.x): the full layers'
    params = dict(params["full_attention"])
  theta = keys.get("rope_theta")  # absent: the family's default (Gemma 3: 1e6), else 10k
  params.setdefault("rope_theta", 10_000.0 if theta is None else theta)
  params["rope_type"] = params.get("rope_type", params.get("type", "default"))
  return params


def read_rope(keys: HfKeys, params: dict | None = None) -> RopeScaling:
  params = rope_params(keys) if params is None else params
  return RopeScaling.from_hf({"rope_parameters": params, "max_position_embeddings":
                              int(keys.get("max_position_embeddings"))})


def _partial_rotary_factor(keys: HfKeys) -> float:
  top_level = keys.get("partial_rotary_factor", 1.0)  # 4.x; 5.x moves it into rope_parameters
  return float(rope_params(keys).get("partial_rotary_factor") or top_level)


def write_hf(cfg: Any, torch_dtype: str = "float32") -> dict[str, Any]:
  """The config.json dict of ModelConfig `cfg` in its family's format (transformers 4.x and 5.x
  read it into the same model). ValueError if the family's HF class cannot express a field."""
  family = get(cfg.family)
  for name, value in family.hard_coded().items():
    if getattr(cfg, name) != value:
      raise ValueError(f"model.{name}={getattr(cfg, name)!r}: the {family.model_type} family's "
                       f"HF class ({family.architecture}) has {name}={value!r} and cannot hold "
                       "this model; export it as another family (model.family)")
  return {
      "architectures": [family.architecture], "model_type": family.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, family.activation_key: cfg.hidden_act.value,
      "rms_norm_eps": cfg.rms_norm_eps,
      "initializer_range": cfg.initializer_range, **cfg.rope.to_hf(cfg.max_position_embeddings),
      "tie_word_embeddings": cfg.tie_word_embeddings, "attention_dropout": 0.0,
      **family.write(cfg),
      "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id, "use_cache": True, "torch_dtype": torch_dtype,
  }


__all__ = ["BOOKKEEPING", "LINEAGE", "Family", "HfKeys", "HfReading", "check_uniform_window", "families",
           "get", "read_hf", "read_rope", "register", "rope_params", "write_hf"]
