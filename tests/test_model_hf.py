"""Logit parity of longctx.load_pretrained with transformers' LlamaForCausalLM (float32, 1e-4)."""
import json

import numpy as np
import pytest

import longctx
from longctx.model import ModelConfig
from longctx.model.rope import DynamicRope, LinearRope, Llama3Rope, YarnRope
from tests.hf_models import CASES, MAX_POS, hf_logits, make_hf_model

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
  model = make_hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path, safe_serialization=True)
  return request.param, model, str(path)


@pytest.mark.matrix
@pytest.mark.parametrize("seq_len", [17, 3 * MAX_POS - 7])  # within and beyond max_position_embeddings
def test_logits_match_transformers(hf_case, seq_len):
  name, hf_model, path = hf_case
  model = longctx.load_pretrained(path, progress=False)
  tokens = np.random.default_rng(seq_len).integers(0, 97, size=(2, seq_len), dtype=np.int32)
  expected = hf_logits(make_hf_model(name), tokens)  # fresh model: HF's dynamic RoPE is stateful
  got = np.asarray(model(tokens))
  assert got.dtype == np.float32 and got.shape == expected.shape
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_config_reads_5x_rope_parameters(hf_case):
  name, hf_model, path = hf_case
  with open(f"{path}/config.json") as f:
    raw = json.load(f)
  cfg = ModelConfig.from_hf(raw)
  expected_type = CASES[name][1]["rope_type"]
  assert cfg.rope.rope_type == expected_type
  assert cfg.rope.theta == CASES[name][1]["rope_theta"]


@pytest.mark.parametrize("rope_scaling,expected", [
    (None, None),
    ({"type": "linear", "factor": 4.0}, LinearRope(500000.0, 4.0)),
    ({"rope_type": "dynamic", "factor": 2.0}, DynamicRope(500000.0, 2.0, 4096)),
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512},
     YarnRope(500000.0, 8.0, 512)),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, Llama3Rope(500000.0, 8.0, 1.0, 4.0, 8192)),
])
def test_config_reads_4x_rope_scaling(rope_scaling, expected):
  raw = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 4096,
         "rope_theta": 500000.0, "rope_scaling": rope_scaling}
  rope = ModelConfig.from_hf(raw).rope
  if expected is None:
    assert rope.rope_type == "default" and rope.theta == 500000.0
  else:
    assert rope == expected


def test_bad_inputs_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither an HF model directory"):
    longctx.load_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="Unsupported rope_type 'ntk_by_parts'"):
    ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                         "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "rope_scaling": {"rope_type": "ntk_by_parts"}})
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*'llama'"):
    ModelConfig.from_hf({"model_type": "gpt2"})
