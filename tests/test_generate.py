"""Generation: greedy equals transformers' greedy generate; the KV cache equals full recompute."""
import numpy as np
import pytest
import torch

import longctx
from longctx.data.tokenizers import ByteTokenizer
from longctx.eval.generate import SamplingConfig, generate_text, sample_token
from tests.hf_models import CASES, make_hf_model

NEW = 32


@pytest.mark.matrix
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers_generate(tmp_path, case):
  make_hf_model(case).save_pretrained(tmp_path)
  model = longctx.load_pretrained(str(tmp_path), progress=False)
  prompt = np.random.default_rng(0).integers(3, 97, 12).tolist()
  ours = model.generate([prompt], max_new_tokens=NEW)[0]
  hf_model = make_hf_model(case)
  hf_model.generation_config.eos_token_id = None  # run all NEW steps, as ours does
  with torch.no_grad():
    hf = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=0)
  assert hf.shape[1] == len(prompt) + NEW
  assert ours == hf[0, len(prompt):].tolist()


@pytest.mark.slow
def test_batched_ragged_prompts_equal_one_by_one(tmp_path):
  make_hf_model("gqa_yarn_bias").save_pretrained(tmp_path)
  model = longctx.load_pretrained(str(tmp_path), progress=False)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, 97, n).tolist() for n in (5, 13, 9)]
  batched = model.generate(prompts, max_new_tokens=8)
  assert batched == [model.generate([p], max_new_tokens=8)[0] for p in prompts]


def test_cache_decoding_equals_full_forward(tmp_path):
  """Each greedy token is the argmax of a full, cache-free forward over prompt + tokens so far."""
  make_hf_model("mqa_dynamic_headdim").save_pretrained(tmp_path)
  model = longctx.load_pretrained(str(tmp_path), progress=False)
  prompt = list(range(3, 20))
  out = model.generate([prompt], max_new_tokens=6)[0]
  seq = prompt + out
  logits = np.asarray(model(np.array([seq], np.int32)))
  assert out == logits[0, len(prompt) - 1:-1].argmax(-1).tolist()


def test_sampling_is_seeded_and_respects_top_p():
  import jax
  logits = jax.numpy.array([[5.0, 4.0, -10.0, -10.0]])
  draws = {int(sample_token(logits, jax.random.PRNGKey(s), 1.0, 0.5)[0]) for s in range(20)}
  assert draws == {0}  # the nucleus of mass 0.5 is the top token alone
  draws = {int(sample_token(logits, jax.random.PRNGKey(s), 1.0, 0.999)[0]) for s in range(40)}
  assert draws == {0, 1}


def test_text_generation_with_eos(tmp_path):
  import jax
  from longctx.model import ModelConfig, Llama, init_params
  cfg = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=48, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8)
  params = init_params(cfg, jax.random.PRNGKey(0))
  texts = generate_text(Llama(cfg), params, ByteTokenizer(), ["hello", "a longer prompt"],
                        SamplingConfig(max_new_tokens=5, temperature=0.8, seed=3))
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  with pytest.raises(ValueError, match="max_new_tokens"):
    SamplingConfig(max_new_tokens=0)


def _mesh(devices=8):
  import jax
  return jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("seq",))


@pytest.mark.parametrize("strategy,devices", [("ring", 8), ("all_gather", 8), ("ulysses", 4)])
def test_ring_prefill_equals_single_device_prefill(tmp_path, strategy, devices):
  """Context-parallel prefill (every strategy; Ulysses over 4 devices: the model has 4 heads)
  gives single-device prefill's logits and cache within 1e-5."""
  import jax
  from longctx.eval.generate import ContextParallel, left_pad, prefill
  make_hf_model("gqa_yarn_bias").save_pretrained(tmp_path)
  model = longctx.load_pretrained(str(tmp_path), progress=False)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(3, 97, n).tolist() for n in (70, 41)]
  tokens, positions, segments, _ = left_pad(prompts, multiple=16)
  cp = ContextParallel(_mesh(devices), "seq", "zigzag", strategy)
  run = jax.jit(prefill, static_argnums=(0, 5, 6))
  single, cache1 = run(model.module, model.params, tokens, positions, segments, 16, None)
  ring, cache8 = run(model.module, model.params, tokens, positions, segments, 16, cp)
  np.testing.assert_allclose(np.asarray(ring), np.asarray(single), atol=1e-5, rtol=0)
  from longctx.attention.layouts import Layout
  inv = Layout.ZIGZAG.inverse(tokens.shape[1], devices)  # the ring's cache holds the prompt in layout order
  np.testing.assert_allclose(np.asarray(cache8.k_NBSKD)[:, :, inv],
                             np.asarray(cache1.k_NBSKD)[:, :, :tokens.shape[1]], atol=1e-5, rtol=0)
  assert cache8.k_NBSKD.sharding.spec[2] == "seq"  # slots stay spread over the devices


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_generation_with_ring_prefill_and_sharded_cache(tmp_path, layout):
  make_hf_model("mha_default_abf_untied").save_pretrained(tmp_path)
  model = longctx.load_pretrained(str(tmp_path), progress=False)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 97, n).tolist() for n in (50, 23)]
  assert (model.generate(prompts, max_new_tokens=10, mesh=_mesh(), layout=layout)
          == model.generate(prompts, max_new_tokens=10))


@pytest.mark.slow
def test_generation_never_gathers_the_context(tmp_path):
  """No all-gather in the compiled generation (ring prefill + decoding) moves a sequence-long
  activation or a layer's cache onto one device: the prompt is permuted as token ids only, the
  ring passes chunks, and decoding reduces partial softmax results across devices."""
  from longctx.eval.generate import ContextParallel, SamplingConfig, _generate, left_pad
  make_hf_model("mha_default_abf_untied").save_pretrained(tmp_path)
  model = longctx.load_pretrained(str(tmp_path), progress=False)
  tokens, positions, segments, lengths = left_pad([list(range(3, 67))], multiple=16)
  cp = ContextParallel(_mesh())
  hlo = _generate.lower(model.module, model.params, tokens, positions, segments, lengths,
                        SamplingConfig(max_new_tokens=8), cp).compile().as_text()
  cfg = model.config
  prompt_activation = 64 * min(cfg.num_kv_heads, cfg.num_heads) * cfg.head_dim  # [1, 64, K, D]
  import re
  for line in hlo.splitlines():
    if "all-gather" in line and "=" in line:
      shape = re.search(r"\[([0-9,]*)\]", line.split("=", 1)[1])
      elems = np.prod([int(x) for x in shape.group(1).split(",") if x]) if shape else 0
      assert elems < prompt_activation, line
