"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): biases on q, k and v but not on o_proj.

Its window applies only with `use_sliding_window` (Qwen2.5 ships it false; transformers then
drops `sliding_window`): layer i slides iff i >= `max_window_layers` (transformers'
Qwen2Config.layer_types), unless config.json lists `layer_types` itself, which wins. Export
writes all four keys, `layer_types` one per layer and `max_window_layers` the number of full
layers before the first sliding one, so that transformers 4.x and 5.x read the same model."""
from longctx.model.families.base import Family, HfKeys, register

FULL, SLIDING = "full_attention", "sliding_attention"


def read_window_keys(keys: HfKeys, fields: dict) -> dict:
  """Qwen2 and Qwen3's window keys as ModelConfig's `sliding_window` and `layer_types`."""
  window = keys.get("sliding_window")  # read either way: transformers drops it when unused
  window = window if keys.get("use_sliding_window") else None
  first = keys.get("max_window_layers")
  kinds = keys.get("layer_types") or [
      SLIDING if window is not None and i >= first else FULL
      for i in range(fields["num_layers"])]
  if SLIDING in kinds and window is None:
    keys.refuse("layer_types", "sliding layers need use_sliding_window=true and a "
                "sliding_window (transformers gives them no window otherwise)", kinds)
  return dict(sliding_window=None if window is None else int(window), layer_types=tuple(kinds))


def write_window_keys(cfg) -> dict:
  kinds = [FULL if w is None else SLIDING for w in cfg.layer_windows]
  full_before = kinds.index(SLIDING) if SLIDING in kinds else cfg.num_layers
  return {"use_sliding_window": cfg.sliding_window is not None,
          "sliding_window": cfg.sliding_window, "max_window_layers": full_before,
          "layer_types": kinds}


def read(keys: HfKeys, fields: dict) -> dict:
  return read_window_keys(keys, fields)


def write(cfg) -> dict:
  return write_window_keys(cfg)


FAMILY = register(Family(
    model_type="qwen2", architecture="Qwen2ForCausalLM",
    defaults=dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, hidden_act="silu"),
    fixed=dict(attention_bias=False, mlp_bias=False, qkv_bias=True, qk_norm=False,
               partial_rotary_factor=1.0),
    read=read, write=write))
