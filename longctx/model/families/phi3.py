"""Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM): q, k and v fused in one `qkv_proj` weight
and gate and up in one `gate_up_proj` (split into longctx's projections on import, stacked back
on export); no biases; partial rotary embeddings (`partial_rotary_factor`, Phi-4-mini's 0.75);
LongRoPE (`rope_scaling.type` "longrope", or its old names "su" and "yarn", which transformers
maps to it) with the trained length in the top-level `original_max_position_embeddings`
(default 4096), which transformers prefers to the one in rope_scaling. Its `sliding_window`
(Phi-3-mini-4k: 2047; the 128k models: 262144) slides every layer, as in transformers.

transformers' Phi3Config accepts only the default and LongRoPE scalings, so a Phi-3 model
extended with another length-independent scaling (linear, YaRN, llama3, a new theta) is written
as LongRoPE with equal short and long factors (`LongRope.from_static`); dynamic NTK has no such
form and is refused on export.
"""
from longctx.model.families.base import (Family, HfKeys, check_uniform_window, read_rope,
                                         register, rope_params)
from longctx.model.rope import DefaultRope, LongRope

_LONGROPE_NAMES = ("longrope", "su", "yarn")


def read(keys: HfKeys, fields: dict) -> dict:
  params = rope_params(keys)
  if params["rope_type"] in _LONGROPE_NAMES:
    params["rope_type"] = "longrope"
    params["original_max_position_embeddings"] = int(keys.get("original_max_position_embeddings"))
  elif params["rope_type"] != "default":
    keys.refuse("rope_scaling", "transformers' Phi3Config accepts only the default and "
                "longrope scalings", params)
  keys.get("original_max_position_embeddings")
  window = keys.get("sliding_window")
  return dict(rope=read_rope(keys, params),
              sliding_window=None if window is None else int(window))


def write(cfg) -> dict:
  check_uniform_window(cfg)
  rope = cfg.rope
  if not isinstance(rope, (DefaultRope, LongRope)):
    rope = LongRope.from_static(rope, cfg.rotary_dim, cfg.max_position_embeddings)
  original = (rope.original_max_position_embeddings if isinstance(rope, LongRope)
              else cfg.max_position_embeddings)
  return {**rope.to_hf(cfg.max_position_embeddings), "original_max_position_embeddings": original,
          "partial_rotary_factor": cfg.partial_rotary_factor, "sliding_window": cfg.sliding_window,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0}


FAMILY = register(Family(
    model_type="phi3", architecture="Phi3ForCausalLM",
    defaults=dict(max_position_embeddings=4096, original_max_position_embeddings=4096,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=32000, pad_token_id=32000, hidden_act="silu"),
    fixed=dict(attention_bias=False, mlp_bias=False, qkv_bias=False, qk_norm=False),
    fused={"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
           "mlp.gate_up_proj": ("gate_proj", "up_proj")},
    read=read, write=write))
