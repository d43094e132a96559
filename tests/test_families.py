"""Every model family against transformers (PyTorch CPU, float32), on tiny random models built
here: logits, greedy generation, the HF round trip, LoRA -> PEFT, context parallelism, and the
config.json keys longctx refuses. Training through the launcher: tests/test_families_train.py."""
import json
import warnings

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import longctx
from longctx import convert
from longctx.checkpoint.params import load_params, save_params
from longctx.model import ModelConfig, families, lora
from longctx.model.rope import LongRope
from tests.hf_models import (FAMILIES, FAMILY_SHAPE, FAMILY_VARIANTS, PHI3_ORIGINAL,
                             lora_trained, make_family_model, save_family_dir)

TOL = 1e-4        # logits, float32 (the bar)
PEFT_TOL = 5e-4   # LoRA -> PEFT logits
VOCAB = FAMILY_SHAPE["vocab_size"]


@pytest.fixture(scope="module", params=sorted(FAMILY_VARIANTS))
def variant(request, tmp_path_factory):
  """(name, the transformers model, its HF directory)."""
  path = tmp_path_factory.mktemp(request.param)
  return request.param, save_family_dir(request.param, path), path


def _torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def _tokens(length, seed=0, batch=2):
  return np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length), dtype=np.int32)


# 17: within every trained length; 96: past Phi-3's original 32 (LongRoPE's long factors) and
# past YaRN's original 32.
@pytest.mark.matrix
@pytest.mark.parametrize("length", [17, 96])
def test_logits_match_transformers(variant, length):
  name, hf_model, path = variant
  model = longctx.load_pretrained(str(path), progress=False)
  assert model.config.family == hf_model.config.model_type
  assert model.config.num_params() == sum(p.numel() for p in hf_model.parameters())
  tokens = _tokens(length, seed=length)
  want = _torch_logits(hf_model, tokens)
  got = np.asarray(model(tokens))
  assert np.abs(want).max() > 1.0  # a random model's logits, not zeros
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_longrope_switches_sets_by_the_batch_length():
  """Short factors up to original_max_position_embeddings, long ones past it, for the whole
  pass: a 32-token row is the short set at every position, a 33-token row the long set."""
  rope = LongRope(10000.0, (1.0, 2.0), (4.0, 8.0), original_max_position_embeddings=32,
                  factor=4.0)
  short, long = rope._inv_freq(rope.short_factor, 4), rope._inv_freq(rope.long_factor, 4)
  assert not np.allclose(short, long)
  np.testing.assert_array_equal(rope.inv_freq(4, np.arange(32)[None]), short)
  np.testing.assert_array_equal(rope.inv_freq(4, np.arange(33)[None]), long)
  assert rope.attention_scaling() == pytest.approx(np.sqrt(1 + np.log(4.0) / np.log(32)))
  with pytest.raises(ValueError, match="2 rescale factors for a rotary dimension of 8"):
    rope.inv_freq(8)


@pytest.mark.matrix
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_generation_is_token_for_token_equal(name, tmp_path):
  """Phi-3: one prompt shorter than original_max_position_embeddings, whose generation crosses
  it (transformers then prefills again with the long factors), and one longer."""
  hf_model = save_family_dir(name, tmp_path)
  model = longctx.load_pretrained(str(tmp_path), progress=False)
  lengths = (PHI3_ORIGINAL - 20, PHI3_ORIGINAL + 8) if name == "phi3" else (12,)
  for n in lengths:
    prompt = _tokens(n, seed=n, batch=1)[0].tolist()
    with torch.no_grad():
      out = hf_model.generate(torch.as_tensor([prompt]), max_new_tokens=30, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    want = out[0, n:].tolist()
    assert model.generate([prompt], max_new_tokens=30) == [want], (name, n)


def test_the_round_trip_is_bit_exact_and_transformers_loads_the_export(variant, tmp_path):
  name, hf_model, path = variant
  assert convert.main(["from-hf", str(path), str(tmp_path / "ckpt"), "--no_progress"]) == 0
  assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--no_progress"]) == 0
  source, exported = (load_file(str(d / "model.safetensors")) for d in (path, tmp_path / "hf"))
  assert sorted(source) == sorted(exported)
  for key, value in source.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
  assert type(reloaded) is type(hf_model)
  tokens = _tokens(96)
  np.testing.assert_array_equal(_torch_logits(reloaded, tokens), _torch_logits(hf_model, tokens))
  assert ModelConfig.from_directory(str(tmp_path / "hf")) == ModelConfig.from_directory(str(path))


# Phi-3 twice: all projections (q/k/v -> qkv_proj at rank 3r, gate/up -> gate_up_proj at 2r),
# and q, v only (qkv_proj at rank 2r with zero rows for k).
PEFT_CASES = {"qwen2": lora.LORA_TARGETS, "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
              "mistral": ("q_proj", "v_proj", "down_proj"), "phi3": lora.LORA_TARGETS,
              "gemma3": ("q_proj", "v_proj", "gate_proj"),
              "phi3_qv": ("q_proj", "v_proj")}


@pytest.mark.matrix
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_lora_exports_to_peft_and_merged_hf(case, tmp_path):
  name = case.split("_")[0]
  hf_model = save_family_dir(name, tmp_path / "hf")
  assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "base"), "--no_progress"]) == 0
  cfg, base = load_params(str(tmp_path / "base"))
  lcfg = lora.with_lora(cfg, 4, 8.0, PEFT_CASES[case])
  save_params(str(tmp_path / "ckpt"), lora_trained(base, lcfg, 1), lcfg)
  assert convert.main(["to-peft", str(tmp_path / "ckpt"), str(tmp_path / "adapter"),
                       "--no_progress"]) == 0
  assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "merged"),
                       "--no_progress"]) == 0
  tokens = _tokens(40, seed=2)
  ours = np.asarray(longctx.load_pretrained(str(tmp_path / "ckpt"), progress=False)(tokens))
  adapted = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
  for model in (adapted, merged):
    assert np.abs(_torch_logits(model, tokens) - ours).max() < PEFT_TOL
  assert np.abs(_torch_logits(make_family_model(name), tokens) - ours).max() > 1e-2
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  if case == "phi3":
    assert config["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert config["rank_pattern"] == {"gate_up_proj": 8, "qkv_proj": 12}
    assert config["alpha_pattern"] == {"gate_up_proj": 16.0, "qkv_proj": 24.0}
  if name == "qwen3":  # LoRA+ trains every norm, Qwen3's q/k norms too
    assert {"q_norm", "k_norm"} <= set(config["modules_to_save"])


@pytest.mark.slow
def test_the_global_length_picks_longropes_factors_under_context_parallelism(tmp_path):
  """A 96-token row over 4 devices is 24 tokens each, under Phi-3's original 32: every strategy
  still uses the long factors, as the whole row does on one device."""
  from longctx.attention import AttentionSpec
  hf_model = save_family_dir("phi3", tmp_path)
  tokens = _tokens(96, seed=5)
  want = _torch_logits(hf_model, tokens)
  mesh = jax.make_mesh((4,), ("seq",))
  for strategy in ("ring", "all_gather", "ulysses"):
    fn = AttentionSpec(impl="context_parallel", strategy=strategy, layout="zigzag").function(mesh)
    model = longctx.load_pretrained(str(tmp_path), attention_fn=fn, progress=False)
    np.testing.assert_allclose(np.asarray(model(tokens)), want, atol=TOL, rtol=0)


# ---- what longctx refuses or carries ------------------------------------------------------------

def _config(name, **changes):
  config = make_family_model(name).config.to_dict()
  return {**config, **changes}


REFUSED = {
    "qwen3 sliding layers without a window": (
        "qwen3", dict(layer_types=["full_attention", "sliding_attention"]),
        r"layer_types=\['full_attention', 'sliding_attention'\]: sliding layers need "
        "use_sliding_window=true"),
    "soft-cap": ("qwen3", dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    "attention soft-cap": ("mistral", dict(attn_logit_softcapping=50.0),
                           "attn_logit_softcapping=50.0"),
    "relu": ("mistral", dict(hidden_act="relu"), "hidden_act='relu': the MLP gates with SiLU"),
    "gemma3 bidirectional": ("gemma3", dict(use_bidirectional_attention=True),
                             "use_bidirectional_attention=True"),
    "gemma3 scaled local rope": (
        "gemma3", dict(rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
        "sliding layers' RoPE must be plain"),
    "unknown rope_type": ("qwen2", dict(rope_parameters={"rope_type": "mrope", "rope_theta": 1e6}),
                          "Unsupported rope_type 'mrope'"),
    "phi3 dynamic": ("phi3", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                   "rope_theta": 1e4}), "rope_scaling="),
    "partial rotary on llama": ("qwen2", dict(partial_rotary_factor=0.5),
                                "partial_rotary_factor=0.5"),
    "dropout": ("phi3", dict(resid_pdrop=0.1), "resid_pdrop=0.1"),
    "quantized": ("mistral", dict(quantization_config={"quant_method": "gptq"}),
                  "quantization_config="),
    "unknown model_type": ("qwen2", dict(model_type="gemma2"),
                           r"model_type 'gemma2' is not supported.*'gemma3_text', 'llama', "
                           r"'mistral', 'phi3', 'qwen2', 'qwen3'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unimplemented_keys_are_refused_by_name_and_value(case):
  name, changes, message = REFUSED[case]
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_hf(_config(name, **changes))


def test_a_gemma3_config_of_the_4x_style_reads_its_two_ropes_and_its_pattern():
  """Gemma 3 4B's config.json as released (4.x keys, shapes cut down): linear ×8 over base 1e6
  on the full layers, base 10k on the sliding ones, every 6th layer full."""
  hf = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 8,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 1024,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "cache_implementation": "hybrid", "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # every key read or bookkeeping
    cfg = ModelConfig.from_hf(hf)
  from longctx.model.rope import DefaultRope, LinearRope
  assert cfg.rope == LinearRope(theta=1e6, factor=8.0)
  assert cfg.layer_rope(1024) == DefaultRope(theta=1e4) and cfg.layer_rope(None) == cfg.rope
  assert cfg.layer_windows == (1024,) * 5 + (None,) + (1024,) * 2
  assert (cfg.query_pre_attn_scalar, cfg.eos_token_id, cfg.tie_word_embeddings) == (256, 1, True)
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  from longctx.model.rope import override
  extended = cfg.replace(rope=override(cfg.rope, cfg.max_position_embeddings, {"factor": 32.0}))
  assert extended.layer_rope(None).factor == 32.0 and extended.layer_rope(1024) == DefaultRope(1e4)
  with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration.*'gemma3_text'"):
    ModelConfig.from_hf({**hf, "model_type": "gemma3"})


def test_unread_keys_are_reported():
  with pytest.warns(UserWarning, match=r"keys not read by longctx.*\['full_attn_mod'\]"):
    ModelConfig.from_hf(_config("phi3", full_attn_mod=1))


def test_a_sliding_window_applies_past_its_length(tmp_path):
  """Mistral-7B-v0.1 slides 4096 tokens: rows longer than the window equal transformers', and
  the window survives the conversions (more: tests/test_model_window.py)."""
  hf_model = save_family_dir("mistral", tmp_path / "hf", sliding_window=24)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing carried unimplemented: no note
    model = longctx.load_pretrained(str(tmp_path / "hf"), progress=False)
  assert model.config.sliding_window == 24 and model.config.layer_windows == (24, 24)
  tokens = _tokens(60)
  np.testing.assert_allclose(np.asarray(model(tokens)), _torch_logits(hf_model, tokens),
                             atol=TOL, rtol=0)
  assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"),
                       "--no_progress"]) == 0
  assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"),
                       "--no_progress"]) == 0
  assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] == 24


def test_export_refuses_what_the_family_cannot_hold():
  cfg = ModelConfig(family="qwen2", qkv_bias=True, num_heads=4, num_kv_heads=4)
  assert cfg.to_hf()["architectures"] == ["Qwen2ForCausalLM"]
  with pytest.raises(ValueError, match="model.qk_norm=True: the qwen2 family"):
    cfg.replace(qk_norm=True).to_hf()
  with pytest.raises(ValueError, match="dynamic.*has no LongRoPE form"):
    from longctx.model.rope import DynamicRope
    ModelConfig(family="phi3", rope=DynamicRope(1e4, 2.0, 64)).to_hf()
  with pytest.raises(ValueError, match="model_type 'gemma' is not supported"):
    ModelConfig(family="gemma")
  with pytest.raises(ValueError, match="model.sandwich_norms=True: the llama family"):
    ModelConfig(sandwich_norms=True).to_hf()
  assert families.families() == ["gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3"]


def test_phi3_exports_other_static_scalings_as_equal_factor_longrope(tmp_path):
  """transformers' Phi3Config holds only LongRoPE: a Phi-3 extended with YaRN is written as
  LongRoPE with short = long factors and YaRN's cos / sin scale; transformers computes the same
  logits from it."""
  from longctx.model.rope import YarnRope
  save_family_dir("phi3", tmp_path / "hf")
  assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--no_progress"]) == 0
  cfg, params = load_params(str(tmp_path / "ckpt"))
  yarn = cfg.replace(rope=YarnRope(10000.0, 4.0, 32))
  save_params(str(tmp_path / "yarn"), params, yarn)
  assert convert.main(["to-hf", str(tmp_path / "yarn"), str(tmp_path / "out"), "--no_progress"]) == 0
  exported = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
  assert exported["rope_type"] == "longrope" and exported["short_factor"] == exported["long_factor"]
  tokens = _tokens(96)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
  ours = np.asarray(longctx.load_pretrained(str(tmp_path / "yarn"), progress=False)(tokens))
  np.testing.assert_allclose(_torch_logits(reloaded, tokens), ours, atol=TOL, rtol=0)


@pytest.mark.slow
def test_the_families_bench_runs():
  from tests.bench_scripts import run_bench
  out = run_bench("families.py", "--length", "64", "--layers", "1", "--repeats", "1").stdout
  rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
  assert rows[1:] == ["llama", "llama tied", "mistral", "qwen2", "qwen3", "phi3"]
