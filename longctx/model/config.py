"""The typed model configuration, read once from a ConfigDict, an HF config.json or a checkpoint."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from longctx.model.rope import DefaultRope, RopeScaling
from longctx.names import Name


class LayerType(Name):
  """The attention of one decoder layer; the values are transformers' `layer_types` names."""
  FULL = "full_attention"        # every earlier key of the document
  SLIDING = "sliding_attention"  # the `sliding_window` keys up to the query (itself included)


class Activation(Name):
  """The gate's activation in the MLP down(act(gate(x)) · up(x)); values are transformers'
  `hidden_act` names."""
  SILU = "silu"                            # SwiGLU (Llama, Mistral, Qwen, Phi-3)
  GELU_TANH = "gelu_pytorch_tanh"          # GeGLU with the tanh approximation (Gemma)

  def fn(self):
    return {Activation.SILU: jax.nn.silu,
            Activation.GELU_TANH: lambda x: jax.nn.gelu(x, approximate=True)}[self]


class RematPolicy(Name):
  """What each decoder layer keeps for the backward pass; the rest is recomputed."""
  NONE = "none"                      # keep everything (no remat)
  FULL = "full"                      # keep only the layer input
  DOTS = "dots"                      # keep matmul outputs
  DOTS_NO_BATCH = "dots_no_batch"    # keep matmuls without batch dims (weights x activations)

  def jax_policy(self):
    return {
        RematPolicy.NONE: None,
        RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
        RematPolicy.DOTS: jax.checkpoint_policies.dots_saveable,
        RematPolicy.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[self]


# The tensors of a decoder layer that remat can keep per name (`remat_save`: on the device;
# `remat_offload`: in pinned host memory, copied back for the backward), beyond what the base
# `remat` policy keeps. Each is tagged with jax.ad_checkpoint.checkpoint_name in model.llama.
CHECKPOINT_NAMES = (
    "layer_input",   # the residual stream entering the layer [B, L, E]
    "qkv",           # queries, keys and values after RoPE
    "attention",     # the attention output before o_proj [B, L, H, D]
    "mlp_input",     # the normed residual entering the MLP [B, L, E]
)


def remat_policy(base: RematPolicy, save: tuple[str, ...], offload: tuple[str, ...]):
  """A jax checkpoint policy: the named tensors saved on the device or offloaded to pinned host
  memory; everything else as the base policy decides."""
  names = jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=list(save), names_which_can_be_offloaded=list(offload),
      offload_src="device", offload_dst="pinned_host")
  base_policy = base.jax_policy()
  recompute = names(None)  # what the names policy answers for anything unnamed

  def policy(prim, *args, **params):
    decision = names(prim, *args, **params)
    return base_policy(prim, *args, **params) if decision is recompute else decision
  return policy


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Projections LoRA may adapt (METHODS.md §2 uses the first four); lm_head is never adapted.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder of the Llama lineage. `dtype` is the compute dtype; parameters are always float32.

  What the model families differ by (longctx.model.families maps each HF `model_type` to these):
  `attention_bias` puts a bias on q/k/v/o (Llama's key), `qkv_bias` on q/k/v only (Qwen2);
  `qk_norm` RMS-normalises each head of q and k before RoPE (Qwen3); `partial_rotary_factor`
  rotates only the first int(head_dim · factor) features (Phi-4-mini's 0.75). `family` names
  the HF family (its config keys and weight names on export) and changes no value.

  Gemma's decoder (the defaults are the Llama lineage's): `rms_norm_offset` 1.0 makes every
  RMSNorm multiply by (1 + w), w stored as HF stores it and initialised to 0; `scale_embeddings`
  multiplies the embedded tokens by √hidden_size (rounded to the compute dtype, as
  transformers does); `sandwich_norms` adds norms on the outputs of attention and of the MLP
  (`post_attention_layernorm` then normalises the attention output, and `pre_feedforward_` /
  `post_feedforward_layernorm` wrap the MLP); `hidden_act` picks the MLP's gate activation;
  `query_pre_attn_scalar` sets the softmax scale to its −½ power (None: head_dim's);
  `local_rope_theta` gives sliding layers their own plain RoPE of that base (Gemma 3's 10k),
  while `rope` stays the full layers' — the one that `model.rope` and `--rope` override, so a
  context extension rescales the global layers only.

  Local / global attention: `layer_types` gives each layer's kind (LayerType); a sliding layer
  lets a query at index i see the keys at indices > i − `sliding_window` (transformers'
  `kv_idx > q_idx - sliding_window`), a full layer every earlier key. The empty tuple means
  every layer is sliding when `sliding_window` is set (Mistral, Phi-3) and full otherwise;
  an explicit tuple has one kind per layer (Qwen2's `max_window_layers` split). `layer_windows`
  is the resulting window of each layer (None: full).

  LoRA (longctx.model.lora): `lora_rank` > 0 adds adapters of that rank to the projections named
  in `lora_targets` (a subset of LORA_TARGETS), scaled by `lora_alpha / lora_rank`. The HF
  config (`to_hf`) describes the base model only.

  Memory (no effect on values): `remat` is the base policy of what a layer keeps for the
  backward; `remat_save` / `remat_offload` name tensors (CHECKPOINT_NAMES) kept on the device or
  offloaded to pinned host memory on top of it (both need remat != none). `mlp_chunk` > 0 runs
  the MLP over chunks of that many tokens per device and row (model.chunking), each recomputed
  in the backward; a length the chunks do not tile (a decoding step) runs unchunked.
  """
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 176
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 2048
  rope: RopeScaling = DefaultRope()
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  partial_rotary_factor: float = 1.0
  sliding_window: int | None = None
  layer_types: tuple[LayerType, ...] = ()
  hidden_act: Activation = Activation.SILU
  rms_norm_offset: float = 0.0
  scale_embeddings: bool = False
  sandwich_norms: bool = False
  query_pre_attn_scalar: int | None = None
  local_rope_theta: float | None = None
  family: str = "llama"
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None
  dtype: str = "float32"
  remat: RematPolicy = RematPolicy.NONE
  initializer_range: float = 0.02
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()
  mlp_chunk: int = 0
  remat_save: tuple[str, ...] = ()
  remat_offload: tuple[str, ...] = ()

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, found {self.head_dim}")
    if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
      raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} with head_dim "
                       f"{self.head_dim}: expected a factor in (0, 1] giving an even rotary "
                       f"dimension, found {self.rotary_dim}")
    from longctx.model import families
    families.get(self.family)  # ValueError listing the registered families
    self._check_layer_types()
    object.__setattr__(self, "hidden_act", Activation.parse(self.hidden_act, "hidden_act"))
    for field in ("query_pre_attn_scalar", "local_rope_theta"):
      value = getattr(self, field)
      if value is not None and not value > 0:
        raise ValueError(f"{field}: expected a positive number or None, found {value!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, found {self.dtype!r}")
    if isinstance(self.lora_targets, str):
      raise ValueError(f"lora_targets must be a tuple of projection names, found the string "
                       f"{self.lora_targets!r}")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON gives a list
    self._check_memory_fields()
    if self.lora_rank < 0:
      raise ValueError(f"lora_rank must be >= 0 (0 = no LoRA), found {self.lora_rank}")
    unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if unknown:
      raise ValueError(f"lora_targets {unknown} are not projections; expected a subset of "
                       f"{list(LORA_TARGETS)}")
    if self.lora_rank and (not self.lora_targets or self.lora_alpha <= 0):
      raise ValueError(f"LoRA (lora_rank={self.lora_rank}) needs lora_targets and lora_alpha > 0; "
                       f"found targets {self.lora_targets}, alpha {self.lora_alpha}")

  def _check_layer_types(self) -> None:
    window = self.sliding_window
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
      raise ValueError(f"sliding_window: expected a positive number of tokens or None, found "
                       f"{window!r}")
    given = self.layer_types or ()  # a config section: a comma-separated string; JSON: a list
    names = [t.strip() for t in given.split(",") if t.strip()] if isinstance(given, str) else given
    kinds = tuple(LayerType.parse(t, "layer_types entry") for t in names)
    object.__setattr__(self, "layer_types", kinds)
    if kinds and len(kinds) != self.num_layers:
      raise ValueError(f"layer_types has {len(kinds)} entries but num_layers is "
                       f"{self.num_layers}: expected one kind per layer (or none: every layer "
                       "sliding when sliding_window is set, else full)")
    if LayerType.SLIDING in kinds and window is None:
      raise ValueError(f"layer_types[{kinds.index(LayerType.SLIDING)}]="
                       f"{LayerType.SLIDING.value!r} needs sliding_window >= 1, found None")

  def _check_memory_fields(self) -> None:
    for field in ("remat_save", "remat_offload"):
      value = getattr(self, field)
      names = tuple(t.strip() for t in value.split(",") if t.strip()) if isinstance(
          value, str) else tuple(value)
      object.__setattr__(self, field, names)
      unknown = [n for n in names if n not in CHECKPOINT_NAMES]
      if unknown:
        raise ValueError(f"{field}: {unknown} are not tensor names; expected a subset of "
                         f"{list(CHECKPOINT_NAMES)}")
    both = set(self.remat_save) & set(self.remat_offload)
    if both:
      raise ValueError(f"remat_save and remat_offload both name {sorted(both)}: a tensor is "
                       "kept on the device or offloaded, not both")
    if (self.remat_save or self.remat_offload) and self.remat is RematPolicy.NONE:
      raise ValueError(f"remat_save={list(self.remat_save)} / remat_offload="
                       f"{list(self.remat_offload)} choose what remat keeps, but remat is "
                       "'none' (everything kept): set remat to 'full', 'dots' or "
                       "'dots_no_batch'")
    if self.mlp_chunk < 0:
      raise ValueError(f"mlp_chunk: expected tokens per chunk >= 0 (0 = unchunked), found "
                       f"{self.mlp_chunk}")

  def jax_remat_policy(self):
    """The checkpoint policy of a decoder layer (None: no remat)."""
    if self.remat is RematPolicy.NONE:
      return None
    if not (self.remat_save or self.remat_offload):
      return self.remat.jax_policy()
    return remat_policy(self.remat, self.remat_save, self.remat_offload)

  @property
  def rotary_dim(self) -> int:
    """The features of each head that RoPE rotates (transformers: int(head_dim · factor))."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def layer_windows(self) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), from `layer_types`."""
    if not self.layer_types:
      return (self.sliding_window,) * self.num_layers
    return tuple(self.sliding_window if t is LayerType.SLIDING else None
                 for t in self.layer_types)

  @property
  def windows(self) -> tuple[int | None, ...]:
    """The distinct windows of the layers (None, full attention, first): one attention
    function per entry, and `layer_windows[i]` is `windows[kind_N[i]]` (model.llama)."""
    present = set(self.layer_windows)
    return ((None,) if None in present else ()) + tuple(sorted(present - {None}))

  def layer_rope(self, window: int | None) -> RopeScaling:
    """The RoPE of a layer with this window (None: full): `rope`, or for a sliding layer the
    plain RoPE of base `local_rope_theta` when that is set."""
    if window is None or self.local_rope_theta is None:
      return self.rope
    return DefaultRope(theta=float(self.local_rope_theta))

  @property
  def has_lora(self) -> bool:
    return self.lora_rank > 0

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count of the base model (embedding and head counted separately unless tied;
    LoRA adapters not counted)."""
    h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
    attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.attention_bias or self.qkv_bias:
      attn += d * (self.num_heads + 2 * self.num_kv_heads)
    if self.attention_bias:
      attn += h
    if self.qk_norm:
      attn += 2 * d
    mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
    per_layer = attn + mlp + (4 if self.sandwich_norms else 2) * h
    head = 0 if self.tie_word_embeddings else self.vocab_size * h
    return self.num_layers * per_layer + self.vocab_size * h + head + h

  # ---- serialisation -------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope"] = self.rope.to_dict()
    d["remat"] = self.remat.value
    d["hidden_act"] = self.hidden_act.value
    d["layer_types"] = [t.value for t in self.layer_types]
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"Unknown model config keys {sorted(unknown)}; expected a subset of "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    if "rope" in d and not isinstance(d["rope"], RopeScaling):
      d["rope"] = RopeScaling.from_dict(d["rope"])
    if "remat" in d and not isinstance(d["remat"], RematPolicy):
      d["remat"] = RematPolicy.parse(d["remat"], "remat")
    return cls(**d)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """From an HF config.json dict (transformers 4.x or 5.x) of any registered family
    (longctx.model.families); keys that change the computation and are not implemented are
    refused by name. Notes on keys not read go to `warnings`."""
    from longctx.model import families
    reading = families.read_hf(hf)
    for note in reading.notes:
      warnings.warn(note, stacklevel=2)
    return cls(**{**reading.fields, **overrides})

  @classmethod
  def from_directory(cls, path: str) -> "ModelConfig":
    """The config of `path`: an HF directory (config.json) or a longctx checkpoint
    (model_config.json); local or remote (gs://) paths."""
    import json

    from etils import epath
    folder = epath.Path(path)
    if (folder / "config.json").exists():
      return cls.from_hf(json.loads((folder / "config.json").read_text()))
    if (folder / "model_config.json").exists():
      return cls.from_dict(json.loads((folder / "model_config.json").read_text()))
    raise FileNotFoundError(f"{path!r}: expected config.json (HF) or model_config.json "
                            "(longctx), found neither")

  def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
    """An HF config.json dict of the model's family that transformers 4.x and 5.x load into the
    same model (ValueError if the family's HF class cannot express a field)."""
    from longctx.model import families
    return families.write_hf(self, torch_dtype)
