"""HF conversion: bit-exact round trips, sharding, dtypes, and exports that transformers loads."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import longctx
from longctx import convert
from longctx.checkpoint import hf
from longctx.checkpoint.params import save_params
from longctx.model import (DefaultRope, DynamicRope, FixedNtkRope, Llama3Rope, LinearRope,
                           ModelConfig, YarnRope, init_params)
from tests.hf_models import hf_logits, make_hf_model

TOL = 1e-4


def _tensors(path):
  out = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(path, name), framework="numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["gqa_yarn_bias", "gqa4_linear_tied"])
def test_from_hf_to_hf_is_bit_exact(tmp_path, case, dtype):
  src, ckpt, dst = tmp_path / "src", tmp_path / "ckpt", tmp_path / "dst"
  make_hf_model(case).to(dtype).save_pretrained(src, safe_serialization=True, max_shard_size="20KB")
  assert os.path.isfile(src / hf.INDEX_FILE)  # the source is sharded
  assert convert.main(["from-hf", str(src), str(ckpt), "--no_progress"]) == 0
  assert convert.main(["to-hf", str(ckpt), str(dst), "--max_shard_size", "30KB", "--no_progress"]) == 0
  before, after = _tensors(src), _tensors(dst)
  assert sorted(before) == sorted(after)
  for name in before:
    assert before[name].dtype == after[name].dtype, name
    assert before[name].shape == after[name].shape, name
    assert before[name].tobytes() == after[name].tobytes(), name
  index = json.loads((dst / hf.INDEX_FILE).read_text())
  assert len(set(index["weight_map"].values())) > 1
  reloaded = transformers.LlamaForCausalLM.from_pretrained(dst).float().eval()
  tokens = np.arange(40, dtype=np.int32).reshape(2, 20) % 97
  original = transformers.LlamaForCausalLM.from_pretrained(src).float().eval()
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(original, tokens))


def test_bf16_stays_bf16(tmp_path):
  make_hf_model("mha_default_abf_untied").to(torch.bfloat16).save_pretrained(tmp_path / "src")
  convert.from_hf(str(tmp_path / "src"), str(tmp_path / "ckpt"), progress=False)
  cfg, params = longctx.checkpoint.params.load_params(str(tmp_path / "ckpt"))
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
  convert.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "dst"), progress=False)
  assert json.loads((tmp_path / "dst" / "config.json").read_text())["torch_dtype"] == "bfloat16"


ROPES = {
    "default_abf": DefaultRope(500000.0),
    "linear": LinearRope(10000.0, 2.0),
    "dynamic": DynamicRope(10000.0, 2.0, 32),
    "yarn": YarnRope(10000.0, 4.0, 32),
    "llama3": Llama3Rope(10000.0, 8.0, 1.0, 4.0, 16),
}


@pytest.mark.slow
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_longctx_model_exports_to_transformers(tmp_path, rope):
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=12, max_position_embeddings=32, rope=ROPES[rope],
                    tie_word_embeddings=rope == "linear", attention_bias=rope == "yarn")
  params = init_params(cfg, jax.random.PRNGKey(1))
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), params)
  save_params(str(tmp_path / "ckpt"), params, cfg)
  convert.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
  tokens = np.random.default_rng(0).integers(0, 97, size=(2, 70), dtype=np.int32)
  ours = np.asarray(longctx.load_pretrained(str(tmp_path / "ckpt"))(tokens))
  theirs = hf_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval(),
                     tokens)
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  # The exported config reads back to the same longctx RoPE.
  assert ModelConfig.from_hf(json.loads((tmp_path / "hf" / "config.json").read_text())).rope == cfg.rope
  # A checkpoint without HF assets still exports its generation defaults (BOS / EOS).
  generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
  assert (generation.bos_token_id, generation.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id)


@pytest.mark.slow
def test_xverse_fixed_ntk_exports_as_hf_dynamic(tmp_path):
  """XVERSE's NTK at target length L equals HF dynamic (factor 2) evaluated at L (METHODS.md §3)."""
  rope = FixedNtkRope(500000.0, trained_length=32, target_length=64)
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                    num_kv_heads=1, head_dim=8, max_position_embeddings=64, rope=rope)
  params = init_params(cfg, jax.random.PRNGKey(3))
  save_params(str(tmp_path / "ckpt"), params, cfg)
  convert.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
  exported = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert exported["rope_scaling"] == {"rope_type": "dynamic", "factor": 2.0}
  assert exported["max_position_embeddings"] == 32 and exported["rope_theta"] == 500000.0
  tokens = np.random.default_rng(1).integers(0, 97, size=(1, 64), dtype=np.int32)
  ours = np.asarray(longctx.load_pretrained(str(tmp_path / "ckpt"))(tokens))
  theirs = hf_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval(),
                     tokens)
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_tensor_shape_mismatch_is_reported(tmp_path):
  make_hf_model("mha_default_abf_untied").save_pretrained(tmp_path / "src")
  cfg_path = tmp_path / "src" / "config.json"
  raw = json.loads(cfg_path.read_text())
  raw["num_hidden_layers"] = 3
  cfg_path.write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=r"missing \['model.layers.2"):
    convert.from_hf(str(tmp_path / "src"), str(tmp_path / "ckpt"), progress=False)


@pytest.mark.slow
def test_params_saved_on_8_devices_load_on_1(tmp_path):
  """final/ of a run on a mesh loads on a machine with fewer devices (host arrays, no shardings)."""
  import subprocess
  import sys
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from longctx.checkpoint.manager import save_final_params
  cfg = longctx.model.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  params = longctx.model.init_params(cfg, jax.random.key(0))
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
  sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
      mesh, P("x") if a.shape[0] % 8 == 0 else P())), params)
  assert any(len(a.sharding.device_set) == 8 for a in jax.tree.leaves(sharded))
  save_final_params(str(tmp_path / "final"), sharded, cfg)
  code = ("import jax, numpy as np, sys; from longctx.checkpoint.params import load_params; "
          "cfg, p = load_params(sys.argv[1]); assert len(jax.devices()) == 1; "
          "print(sum(float(np.abs(np.asarray(x, np.float64)).sum()) for x in jax.tree.leaves(p)))")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "final")], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  expected = sum(float(np.abs(np.asarray(x, np.float64)).sum()) for x in jax.tree.leaves(params))
  assert float(out.stdout.split()[-1]) == pytest.approx(expected, rel=1e-12)
