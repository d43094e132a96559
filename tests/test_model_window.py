"""Sliding-window and local/global layers (ModelConfig.layer_types) against transformers
(PyTorch CPU, float32, eager attention) on tiny random models built here: Mistral sliding every
layer, Qwen2 with `use_sliding_window` and `max_window_layers` splitting its layers into full
and sliding ones, Gemma 3 with a RoPE per kind of layer. Rows are several windows long: logits, greedy generation (one device and a
context-parallel prefill), the HF round trip, remat, two training steps under ring attention,
and the errors for what cannot be."""
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import longctx
from longctx import convert
from longctx.attention import AttentionSpec
from longctx.model import ModelConfig
from longctx.model.config import LayerType, RematPolicy
from longctx.model.llama import DecoderLayer, Llama, RMSNorm, layer_attention_fns
from tests.hf_models import FAMILY_SHAPE, save_family_dir

TOL = 1e-4  # logits, float32 (the bar)
WINDOW = 12
LENGTH = 64  # five windows and more
VOCAB = FAMILY_SHAPE["vocab_size"]
# name -> (family, transformers config overrides, the layer windows longctx must read)
CASES = {
    "mistral": ("mistral", dict(sliding_window=WINDOW), (WINDOW, WINDOW)),
    "qwen2": ("qwen2", dict(num_hidden_layers=3, use_sliding_window=True,
                            sliding_window=WINDOW, max_window_layers=1),
              (None, WINDOW, WINDOW)),
    # Gemma 3's pattern cut short: every 3rd layer full (the old `sliding_window_pattern` key),
    # each kind with its own RoPE.
    "gemma3": ("gemma3", dict(num_hidden_layers=3, sliding_window=WINDOW, layer_types=None,
                              sliding_window_pattern=3), (WINDOW, WINDOW, None)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(name, the transformers model (eager attention), its HF directory)."""
  family, overrides, _ = CASES[request.param]
  path = tmp_path_factory.mktemp(request.param)
  hf_model = save_family_dir(family, path, **overrides)
  hf_model.config._attn_implementation = "eager"
  return request.param, hf_model, path


def _tokens(length, seed=0, batch=2):
  return np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length), dtype=np.int32)


def _torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def _load(path, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # every key is read: no note
    return longctx.load_pretrained(str(path), progress=False, **kwargs)


def test_the_layer_kinds_are_read_as_transformers_has_them(case):
  name, hf_model, path = case
  model = _load(path)
  assert model.config.layer_windows == CASES[name][2]
  if name == "qwen2":  # MistralConfig has no layer_types: its window slides every layer
    assert [LayerType(t) for t in hf_model.config.layer_types] == [
        LayerType.FULL if w is None else LayerType.SLIDING for w in model.config.layer_windows]


@pytest.mark.parametrize("attention", ["dense", "tiled", "ring"])
def test_logits_match_transformers_over_several_windows(case, attention):
  name, hf_model, path = case
  if attention == "ring":
    spec = AttentionSpec(strategy="ring", layout="zigzag")
    fn = spec.function(jax.make_mesh((4,), ("seq",)))
  else:
    fn = AttentionSpec(impl=attention).function()
  tokens = _tokens(LENGTH)
  want = _torch_logits(hf_model, tokens)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(np.asarray(_load(path, attention_fn=fn)(tokens)), want,
                             atol=TOL, rtol=0)
  # the window matters at this length: global attention gives other logits
  ours_global = _load(path, attention_fn=fn, sliding_window=None, layer_types=())(tokens)
  assert np.abs(np.asarray(ours_global) - want).max() > 1e-2, name


def test_greedy_generation_is_token_for_token_equal(case):
  """A 20-token prompt and 40 new tokens: decoding reaches past the window many times, with
  the prompt prefilled on one device and by the ring (its cache slots in zigzag order)."""
  name, hf_model, path = case
  prompt = _tokens(20, seed=3, batch=1)[0].tolist()
  with torch.no_grad():
    out = hf_model.generate(torch.as_tensor([prompt]), max_new_tokens=40, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
  want = out[0, len(prompt):].tolist()
  model = _load(path)
  assert model.generate([prompt], max_new_tokens=40) == [want], name
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("seq",))
  assert model.generate([prompt], max_new_tokens=40, mesh=mesh) == [want], name


def test_the_round_trip_is_bit_exact(case, tmp_path):
  name, hf_model, path = case
  assert convert.main(["from-hf", str(path), str(tmp_path / "ckpt"), "--no_progress"]) == 0
  assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"),
                       "--no_progress"]) == 0
  source, exported = (load_file(str(d / "model.safetensors")) for d in (path, tmp_path / "hf"))
  assert sorted(source) == sorted(exported)
  for key, value in source.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  cfg = ModelConfig.from_directory(str(path))
  assert ModelConfig.from_directory(str(tmp_path / "hf")) == cfg
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "hf", attn_implementation="eager").float().eval()
  assert (getattr(reloaded.config, "layer_types", None)  # Mistral's has none
          == getattr(hf_model.config, "layer_types", None))
  assert reloaded.config.sliding_window == hf_model.config.sliding_window
  tokens = _tokens(LENGTH)
  np.testing.assert_array_equal(_torch_logits(reloaded, tokens), _torch_logits(hf_model, tokens))


@pytest.mark.slow
def test_two_training_steps_under_ring_attention_and_the_eval_commands(tmp_path):
  """configs/finetune_hf.py on the windowed Qwen2 (mesh data=2 x seq=4, ring in zigzag, remat
  keeping qkv and offloading layer_input): two finite steps on 128-token rows, ten windows;
  then perplexity past the window through the eval command."""
  from longctx.eval import __main__ as eval_main
  from longctx.train import loop
  from longctx.train.config import read_stages
  from longctx.train.metrics import read_metrics
  from tests.hf_models import FAMILY_TEXT, finetune_config
  family, overrides, windows = CASES["qwen2"]
  save_family_dir(family, tmp_path / "hf", **overrides)
  config = finetune_config(tmp_path / "hf", {
      "attention.strategy": "ring", "model.remat": "full", "model.remat_save": "qkv",
      "model.remat_offload": "layer_input"})
  (stage,) = read_stages(config)
  assert stage.model.layer_windows == windows and stage.data.max_len == 128
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    loop.run(config, str(tmp_path / "run"), log=lambda *_: None)
  losses = [r["loss"] for r in read_metrics(str(tmp_path / "run" / "main")) if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses)), losses
  (tmp_path / "doc.txt").write_text(FAMILY_TEXT)
  assert eval_main.main(["perplexity", "--checkpoint", str(tmp_path / "run" / "main" / "final"),
                         "--tokenizer", str(tmp_path / "hf" / "tokenizer.json"), "--data",
                         str(tmp_path / "doc.txt"), "--lengths", "96", "--max_windows", "1",
                         "--out", str(tmp_path / "ppl.json")]) == 0


def test_s2_attention_on_a_windowed_model_is_refused_by_the_config_check(tmp_path):
  from longctx.errors import ConfigError
  from longctx.train import checks
  from longctx.train.config import read_stages
  from tests.hf_models import finetune_config
  family, overrides, _ = CASES["qwen2"]
  save_family_dir(family, tmp_path / "hf", **overrides)
  (stage,) = read_stages(finetune_config(tmp_path / "hf", {
      "lora.enabled": True, "lora.targets": "q_proj,v_proj"}))
  from longctx.parallel.mesh import make_mesh
  mesh = make_mesh({"data": 2, "seq": 4})
  assert stage.attention.s2_group
  with pytest.raises(ConfigError, match=r"lora.s2_group_fraction=.*S²-Attn on a model with "
                                        r"sliding-window layers \(model.sliding_window=12\)"):
    checks.check_stage(stage, mesh, False, None, "")


# ---- the model without transformers ------------------------------------------------------------

MIXED = ModelConfig(num_layers=3, sliding_window=4,
                    layer_types=("sliding_attention", "full_attention", "sliding_attention"))


def test_one_scan_keeps_the_parameter_tree_of_a_uniform_model():
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = [jax.tree.map(lambda x: x.shape, jax.eval_shape(
      lambda: Llama(cfg).init(jax.random.PRNGKey(0), tokens))["params"])
            for cfg in (MIXED, MIXED.replace(sliding_window=None, layer_types=()))]
  assert shapes[0] == shapes[1]


def test_remat_gives_the_same_gradients_on_local_and_global_layers():
  """Remat keeping only the attention output (a name tagged after `lax.switch`)."""
  tokens = jnp.asarray(_tokens(16, batch=2) % MIXED.vocab_size)
  params = _unboxed(Llama(MIXED).init(jax.random.PRNGKey(0), tokens)["params"])

  def grads(cfg):
    loss = lambda p: jnp.mean(Llama(cfg).apply({"params": p}, tokens) ** 2)
    return jax.jit(jax.grad(loss))(params)
  want = grads(MIXED)
  got = grads(MIXED.replace(remat=RematPolicy.FULL, remat_save=("attention",)))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)


def _unboxed(tree):
  return nn.meta.unbox(tree)


def test_each_layer_attends_within_its_own_window():
  """A layer-by-layer oracle: the mixed model equals its three layers run one at a time, each
  as a uniform layer of its own window with that layer's parameters; swapping the kinds
  changes the answer (the kind index is used)."""
  tokens = jnp.asarray(_tokens(16, batch=1) % MIXED.vocab_size)
  params = _unboxed(Llama(MIXED).init(jax.random.PRNGKey(1), tokens)["params"])
  hidden = jax.jit(lambda cfg, p: Llama(cfg).apply({"params": p}, tokens, return_hidden=True),
                   static_argnums=0)
  got = hidden(MIXED, params)
  swapped = MIXED.replace(layer_types=("full_attention", "sliding_attention", "full_attention"))
  other = hidden(swapped, params)
  assert np.abs(np.asarray(got - other)).max() > 1e-3
  positions = jnp.arange(16)[None]
  segments = jnp.ones_like(tokens)
  x_BLE = jnp.take(params["embed_tokens"], tokens, axis=0)
  for i, window in enumerate(MIXED.layer_windows):
    cfg = MIXED.replace(num_layers=1, layer_types=(), sliding_window=window)
    fns = layer_attention_fns(AttentionSpec(impl="dense").function(), cfg)
    layer_params = jax.tree.map(lambda a: a[i], params["layers"])
    x_BLE, _ = DecoderLayer(cfg, fns).apply({"params": layer_params}, x_BLE,
                                            (positions, segments, ()))
  want = RMSNorm(MIXED).apply({"params": params["norm"]}, x_BLE)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


# ---- what cannot be ----------------------------------------------------------------------------

def test_layer_types_of_the_wrong_length_are_refused():
  with pytest.raises(ValueError, match="layer_types has 2 entries but num_layers is 3"):
    ModelConfig(num_layers=3, sliding_window=8, layer_types=("full_attention",) * 2)
  with pytest.raises(ValueError, match="unknown layer_types entry 'chunked_attention'"):
    ModelConfig(num_layers=1, layer_types=("chunked_attention",))


def test_a_sliding_layer_needs_a_window():
  with pytest.raises(ValueError, match=r"layer_types\[1\]='sliding_attention' needs "
                                       "sliding_window >= 1, found None"):
    ModelConfig(num_layers=2, layer_types=("full_attention", "sliding_attention"))
  with pytest.raises(ValueError, match="sliding_window: expected a positive number of tokens "
                                       "or None, found 0"):
    ModelConfig(sliding_window=0)


def test_a_plain_function_is_refused_for_a_windowed_model():
  def my_attention(q, k, v, segment_ids, positions):
    return q
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = Llama(MIXED).init(jax.random.PRNGKey(0), tokens)["params"]
  with pytest.raises(ValueError, match=r"attention_fn 'my_attention' is a plain function, but "
                                       r"the model has sliding-window layers \(sliding_window=4, "
                                       r"layer windows \[4, None, 4\]\)"):
    Llama(MIXED, my_attention).apply({"params": params}, tokens)
  uniform = MIXED.replace(sliding_window=None, layer_types=())
  assert Llama(uniform, my_attention).apply({"params": params}, tokens).shape == (1, 8, 256)


def test_exports_refuse_kinds_the_family_cannot_hold():
  cfg = MIXED.replace(family="mistral")
  with pytest.raises(ValueError, match=r"model.layer_types=\['sliding_attention', "
                                       r"'full_attention', 'sliding_attention'\] with "
                                       "sliding_window=4: the mistral family's HF class"):
    cfg.to_hf()
  qwen2 = MIXED.replace(family="qwen2", qkv_bias=True)
  hf = qwen2.to_hf()
  assert hf["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
  assert (hf["use_sliding_window"], hf["sliding_window"], hf["max_window_layers"]) == (True, 4, 0)
  assert ModelConfig.from_hf(hf) == qwen2
  # transformers reads the explicit layer_types over max_window_layers
  assert transformers.Qwen2Config(**hf).layer_types == hf["layer_types"]


def test_qwen2_sliding_layers_without_use_sliding_window_are_refused():
  hf = MIXED.replace(family="qwen2", qkv_bias=True).to_hf() | dict(use_sliding_window=False)
  with pytest.raises(ValueError, match="key layer_types=.*sliding layers need "
                                       "use_sliding_window=true"):
    ModelConfig.from_hf(hf)


def test_s2_attention_with_a_window_is_refused_by_name():
  with pytest.raises(ValueError, match=r"a sliding window \(4\) with S²-Attn \(s2_group=8\)"):
    Llama(MIXED, AttentionSpec(impl="tiled", s2_group=8).function()).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
