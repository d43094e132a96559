"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): biases on q, k and v but not on o_proj. Its sliding
window applies only with `use_sliding_window` (Qwen2.5 ships it false), which is refused until
sliding-window attention is implemented; with it false transformers ignores `sliding_window`
and `max_window_layers`, and so does longctx."""
from longctx.model.families.base import Family, HfKeys, register


def read_window_keys(keys: HfKeys) -> None:
  """Qwen2 and Qwen3's window keys: `use_sliding_window` must be false, every layer full."""
  keys.expect("use_sliding_window", (False, None), "sliding-window attention is not implemented")
  keys.get("sliding_window")  # null by transformers when use_sliding_window is false
  keys.get("max_window_layers")
  layer_types = keys.get("layer_types") or []
  if any(kind != "full_attention" for kind in layer_types):
    keys.refuse("layer_types", "only full_attention layers are implemented")


def read(keys: HfKeys, fields: dict) -> dict:
  read_window_keys(keys)
  return {}


def write(cfg) -> dict:
  return {"use_sliding_window": False, "sliding_window": None,
          "max_window_layers": cfg.num_layers}


FAMILY = register(Family(
    model_type="qwen2", architecture="Qwen2ForCausalLM",
    defaults=dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, use_sliding_window=False,
                  hidden_act="silu"),
    fixed=dict(attention_bias=False, mlp_bias=False, qkv_bias=True, qk_norm=False,
               partial_rotary_factor=1.0, sliding_window=None),
    read=read, write=write))
