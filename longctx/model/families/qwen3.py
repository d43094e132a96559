"""Qwen3 (Qwen3ForCausalLM): RMSNorm over each head of q and k before RoPE (`q_norm`, `k_norm`,
weights [head_dim]); `attention_bias` on q, k, v and o as Llama's; head_dim defaults to 128,
not hidden / heads. Window keys as Qwen2's (`use_sliding_window`, `max_window_layers`,
`layer_types`)."""
from longctx.model.families.base import Family, HfKeys, register
from longctx.model.families.qwen2 import read_window_keys, write_window_keys


def read(keys: HfKeys, fields: dict) -> dict:
  return dict(read_window_keys(keys, fields), attention_bias=bool(keys.get("attention_bias")))


def write(cfg) -> dict:
  return {"attention_bias": cfg.attention_bias, **write_window_keys(cfg)}


FAMILY = register(Family(
    model_type="qwen3", architecture="Qwen3ForCausalLM",
    defaults=dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, head_dim=128, attention_bias=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  hidden_act="silu"),
    fixed=dict(mlp_bias=False, qkv_bias=False, qk_norm=True, partial_rotary_factor=1.0),
    read=read, write=write))
