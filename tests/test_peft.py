"""PEFT export of a LoRA checkpoint: the adapter that `peft.PeftModel.from_pretrained` loads onto
the HF base gives longctx's logits; the merged HF export too; the tensor names are PEFT's own."""
import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import longctx
from longctx import convert
from longctx.checkpoint import peft as peft_export
from longctx.checkpoint.params import save_params
from longctx.model import ModelConfig, init_params, lora
from longctx.model.lora_params import add_lora_params
from tests.hf_models import hf_logits, lora_trained as trained

TOL = 1e-4
CASES = {
    # LongLoRA's setting: q, k, v, o adapted; embedding and norms trained.
    "attn_gqa": (ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64),
                 ("q_proj", "k_proj", "v_proj", "o_proj")),
    # Every projection, a tied embedding (PEFT must keep its trained copy tied to the head), biases.
    "all_tied_bias": (ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                                  num_heads=4, num_kv_heads=1, head_dim=12,
                                  max_position_embeddings=64, tie_word_embeddings=True,
                                  attention_bias=True),
                      lora.LORA_TARGETS),
}


def random_params(cfg, seed):
  """Random float32 parameters (norm scales near 1), made in numpy."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: ((1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
                       + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def _torch_logits(model, tokens):
  return hf_logits(model.float().eval(), tokens)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_and_merged_export_match_longctx(tmp_path, case):
  cfg, targets = CASES[case]
  lcfg = lora.with_lora(cfg, 4, 8.0, targets)
  base = random_params(cfg, 0)
  params = trained(base, lcfg, 1)
  save_params(str(tmp_path / "base_ckpt"), base, cfg)
  save_params(str(tmp_path / "ckpt"), params, lcfg)
  assert convert.main(["to-hf", str(tmp_path / "base_ckpt"), str(tmp_path / "original"),
                       "--no_progress"]) == 0
  assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "frozen"), "--base_only",
                       "--no_progress"]) == 0
  assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "merged"),
                       "--no_progress"]) == 0
  assert convert.main(["to-peft", str(tmp_path / "ckpt"), str(tmp_path / "adapter"),
                       "--base_model", str(tmp_path / "original"), "--no_progress"]) == 0

  tokens = np.random.default_rng(2).integers(0, 97, size=(2, 24), dtype=np.int32)
  ours = np.asarray(longctx.load_pretrained(str(tmp_path / "ckpt"))(tokens))
  errors = {}
  for base_dir in ("original", "frozen"):  # the adapter restores the trained model on either
    hf_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / base_dir)
    model = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter"))
    errors[base_dir] = float(np.abs(_torch_logits(model, tokens) - ours).max())
  merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
  errors["merged"] = float(np.abs(_torch_logits(merged, tokens) - ours).max())
  assert all(e < TOL for e in errors.values()), errors
  # The untrained base is far from the trained model: the comparison above has teeth.
  original = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "original")
  assert float(np.abs(_torch_logits(original, tokens) - ours).max()) > 1e-2


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_tensors_are_the_ones_peft_saves(tmp_path, case):
  """Same names and shapes as `get_peft_model_state_dict` of a PEFT model built from our
  adapter_config.json; and the config carries LongLoRA's settings."""
  cfg, targets = CASES[case]
  lcfg = lora.with_lora(cfg, 4, 8.0, targets)
  params = trained(random_params(cfg, 0), lcfg, 1)
  peft_export.write_peft(params, lcfg, str(tmp_path / "adapter"), base_model_name_or_path="base")
  config = json.loads((tmp_path / "adapter" / peft_export.ADAPTER_CONFIG).read_text())
  assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
  assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"]) == (
      4, 8.0, 0.0, "none")
  assert sorted(config["target_modules"]) == sorted(targets)
  assert config["modules_to_save"] == ["embed_tokens", "input_layernorm", "norm",
                                       "post_attention_layernorm"]
  with safe_open(str(tmp_path / "adapter" / peft_export.ADAPTER_WEIGHTS), framework="numpy") as f:
    ours = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}

  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
      k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")}))
  peft_model = peft.get_peft_model(hf_model, peft.LoraConfig.from_pretrained(
      str(tmp_path / "adapter")))
  theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(peft_model).items()}
  assert ours == theirs
  assert ours["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"] == (
      4, cfg.num_heads * cfg.head_dim)
  assert ours["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] == (
      cfg.num_kv_heads * cfg.head_dim, 4)


def test_export_errors(tmp_path):
  cfg, targets = CASES["attn_gqa"]
  base = random_params(cfg, 0)
  with pytest.raises(ValueError, match="no LoRA"):
    peft_export.write_peft(base, cfg, str(tmp_path / "a"))
  lcfg = lora.with_lora(cfg, 4, 8.0, targets)
  params = add_lora_params(base, lcfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="LoRA adapts"):
    peft_export.write_peft(params, lcfg, str(tmp_path / "a"), modules_to_save=("self_attn",))
  with pytest.raises(ValueError, match="matches no parameter"):
    peft_export.write_peft(params, lcfg, str(tmp_path / "a"), modules_to_save=("bogus",))
