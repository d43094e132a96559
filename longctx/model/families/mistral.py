"""Mistral (MistralForCausalLM): Llama without biases; its config.json's `sliding_window`
(4096 in Mistral-7B-v0.1 and when absent, as transformers' default; null from v0.2 on) slides
every layer (`ModelConfig.layer_types` empty)."""
from longctx.model.families.base import Family, HfKeys, check_uniform_window, register


def read(keys: HfKeys, fields: dict) -> dict:
  window = keys.get("sliding_window")
  return dict(sliding_window=None if window is None else int(window))


def write(cfg) -> dict:
  check_uniform_window(cfg)
  return {"sliding_window": cfg.sliding_window}


FAMILY = register(Family(
    model_type="mistral", architecture="MistralForCausalLM",
    defaults=dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu",
                  sliding_window=4096),
    fixed=dict(attention_bias=False, mlp_bias=False, qkv_bias=False, qk_norm=False,
               partial_rotary_factor=1.0),
    read=read, write=write))
