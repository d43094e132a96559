"""Tiny random HF Llama models for parity tests (built locally, nothing downloaded)."""
from __future__ import annotations

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
