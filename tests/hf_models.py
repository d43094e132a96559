"""Tiny random HF models of every family for parity tests (built locally, nothing downloaded),
and the fine-tuning config the training tests run on them."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
import transformers

# name -> (LlamaConfig kwargs, rope_parameters)
CASES = {
    "mha_default_abf_untied": (dict(num_attention_heads=4, num_key_value_heads=4),
                               {"rope_type": "default", "rope_theta": 500000.0}),
    "gqa4_linear_tied": (dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                              tie_word_embeddings=True),
                         {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "mqa_dynamic_headdim": (dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24),
                            {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "gqa_yarn_bias": (dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                           mlp_bias=True),
                      {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                       "original_max_position_embeddings": 32}),
    "gqa_llama3_tied": (dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0}),
}

MAX_POS = 32


def make_hf_model(name: str, seed: int = 0) -> transformers.LlamaForCausalLM:
  """A random float32 LlamaForCausalLM; every weight (norms and biases too) is random."""
  kwargs, rope = CASES[name]
  config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
      max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, rope_parameters=dict(rope),
      bos_token_id=1, eos_token_id=2, pad_token_id=None, **kwargs)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():
    for param in model.parameters():
      param.normal_(0.0, 0.2)
  return model


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


# ---- the other families: name -> (config class, model class, config kwargs) --------------------
# Shared by every family case: 8 query heads (Ulysses and the hybrid split them over 4 and 2
# devices), a vocabulary that holds FAMILY_TEXT's BPE tokenizer, 128 positions.
FAMILY_SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=8, max_position_embeddings=128, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
PHI3_ORIGINAL = 32  # Phi-3's original_max_position_embeddings here: LongRoPE's switch length
FAMILIES = {
    # Qwen2.5-style: q/k/v biases (no o_proj bias), tied embedding, ABF-sized theta.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # q/k RMSNorm per head, head_dim 16 != hidden / heads, YaRN as TRL's 1M recipe.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_key_value_heads=4, head_dim=16,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                         "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_key_value_heads=2, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Fused qkv_proj / gate_up_proj, LongRoPE with distinct short and long factors, partial
    # rotary embeddings (Phi-4-mini's 0.75: 6 of 8 features), GQA.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_key_value_heads=4, partial_rotary_factor=0.75,
        original_max_position_embeddings=PHI3_ORIGINAL,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.3, 2.0], "long_factor": [2.5, 7.0, 19.0]})),
    # Gemma 3: a sliding layer (window 12, plain RoPE of base 10k) and a full one (linear
    # scaling of base 1e6), q/k norm, the softmax scale of query_pre_attn_scalar 24 (not
    # head_dim 16), GeGLU, (1 + w) norms around attention and the MLP, the scaled embedding.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=12,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}
# Phi-3-mini's own shape besides: full rotary, MHA, LongRoPE in the 4.x `rope_scaling` style.
FAMILY_VARIANTS = {**FAMILIES, "phi3_mha": ("Phi3Config", "Phi3ForCausalLM", dict(
    num_key_value_heads=8, original_max_position_embeddings=PHI3_ORIGINAL,
    rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.5],
                  "long_factor": [1.5, 3.0, 6.0, 12.0]}))}
FAMILY_TEXT = ("the quick brown fox jumps over the lazy dog; long context models read many "
               "tokens and remember a key hidden among them. ") * 40


def make_family_model(name: str, seed: int = 0, **overrides):
  """A random float32 transformers model of family case `name` (FAMILY_VARIANTS); every weight
  random, norms near 1."""
  config_cls, model_cls, kwargs = FAMILY_VARIANTS[name]
  config = getattr(transformers, config_cls)(**{**FAMILY_SHAPE, **kwargs, **overrides})
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).float().eval()
  with torch.no_grad():
    for pname, param in model.named_parameters():
      param.normal_(1.0 if "norm" in pname else 0.0, 0.2)
  return model


def save_family_dir(name: str, path, **overrides):
  """`make_family_model(name)` saved at `path` with a byte-level BPE tokenizer.json of
  FAMILY_SHAPE's vocabulary (trained here on FAMILY_TEXT) and its special tokens."""
  import json

  from longctx.data.tokenizers import train_bpe_tokenizer
  model = make_family_model(name, **overrides)
  model.save_pretrained(path)
  train_bpe_tokenizer([FAMILY_TEXT], str(path / "tokenizer.json"), FAMILY_SHAPE["vocab_size"])
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT}))
  return model


CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


# ---- fine-tuning an HF directory (configs/finetune_hf.py) at test size ---------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"train.steps": 2, "data.max_len": 128, "data.source.num_examples": 16,
         "data.source.min_tokens": 32, "data.source.max_tokens": 300, "data.window": 16,
         "checkpoint.every_steps": 2, "train.loss_chunk": 16, "model.mlp_chunk": 16}


def finetune_config(init_path, overrides=None):
  """configs/finetune_hf.py on `init_path` with SMALL's sizes and `overrides` (dotted keys)."""
  spec = importlib.util.spec_from_file_location("ft", os.path.join(ROOT, "configs",
                                                                    "finetune_hf.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict({"init.path": str(init_path), **SMALL, **(overrides or {})})
  return config


def lora_trained(base, lcfg, seed):
  """The base after a LoRA+ run: random adapters (B != 0), embedding and norms changed."""
  import jax

  from longctx.model import lora
  from longctx.model.lora_params import add_lora_params
  params = add_lora_params(base, lcfg, jax.random.PRNGKey(seed))
  mask = lora.trainable_mask(params, lora.DEFAULT_TRAINABLE)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x, m: (np.asarray(x) + 0.2 * rng.standard_normal(x.shape)).astype(
      np.float32) if m else np.asarray(x), params, mask)
