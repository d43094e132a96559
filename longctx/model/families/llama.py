"""Llama (LlamaForCausalLM): the reference family. `attention_bias` puts a bias on q, k, v and
o; `mlp_bias` on the three MLP projections; `head_dim` may differ from hidden / heads."""
from longctx.model.families.base import Family, HfKeys, register


def read(keys: HfKeys, fields: dict) -> dict:
  keys.expect("pretraining_tp", (1, None), "only pretraining_tp=1 (unsplit projections) is "
              "implemented")
  return dict(attention_bias=bool(keys.get("attention_bias")),
              mlp_bias=bool(keys.get("mlp_bias")))


def write(cfg) -> dict:
  return {"attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias, "pretraining_tp": 1}


FAMILY = register(Family(
    model_type="llama", architecture="LlamaForCausalLM",
    defaults=dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pretraining_tp=1, attention_bias=False,
                  mlp_bias=False, hidden_act="silu"),
    fixed=dict(qkv_bias=False, qk_norm=False, partial_rotary_factor=1.0, sliding_window=None),
    read=read, write=write))
