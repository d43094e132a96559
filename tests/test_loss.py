"""The fused, chunked cross-entropy (train.loss) and the memory options of the trainer.

- The chunked numerator and its gradients equal the reference logits path within 1e-6 (relative,
  float32): on its own, and through the trainer on meshes data / fsdp / seq, in token and
  sequence modes, packed rows, tied and untied heads, LoRA.
- No [tokens, vocab] array exists in the chunked program.
- The trainer's loss is data.objective's `objective(...)` of the same batch (contract 2 has one
  implementation).
- Every remat / offload policy gives the uninterrupted tiny run's losses (1e-6).
- Bad chunk sizes and offload without host memory are refused, naming the key and the values.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.data.objective import ObjectiveMode, objective
from longctx.parallel.mesh import make_mesh
from longctx.train import loop
from longctx.train.config import read_stages
from longctx.train.data import GlobalBatches
from longctx.train.loss import chunked_numerator, reference_numerator, token_nll
from longctx.train.runner import StageRunner
from longctx.train.step import make_loss_and_grads
from tests.helpers import losses as _losses
from tests.helpers import tiny_config

RTOL = 1e-6


def _assert_close(got, want, what=""):
  """|got − want| ≤ RTOL · max|want| (relative to the array's scale)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want)))
  assert err <= RTOL * scale, f"{what}: max error {err:.3g} > {RTOL} x {scale:.3g}"


def _head_inputs(vocab_first, dtype=jnp.float32, b=2, length=48, e=16, v=70):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(b, length, e)), dtype)
  w = jnp.asarray(rng.normal(size=(v, e) if vocab_first else (e, v)) * 0.3, jnp.float32)
  t = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
  keep = rng.random((b, length)) > 0.3
  weights = jnp.asarray(np.where(keep, rng.random((b, length)), 0.0), jnp.float32)
  return x, w, t, weights


def _reference(x, w, t, weights, vocab_first):
  spec = "ble,ve->blv" if vocab_first else "ble,ev->blv"
  logits = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  return reference_numerator(logits, t, weights)


@pytest.mark.parametrize("vocab_first", [True, False])
@pytest.mark.parametrize("chunk,shards", [(8, 1), (4, 3), (48, 1), (2, 8)])
def test_chunked_numerator_equals_the_reference(vocab_first, chunk, shards):
  x, w, t, weights = _head_inputs(vocab_first)
  ref, (ref_dx, ref_dw) = jax.value_and_grad(_reference, argnums=(0, 1))(x, w, t, weights,
                                                                        vocab_first)
  fn = functools.partial(chunked_numerator, chunk=chunk, token_shards=shards,
                         vocab_first=vocab_first)
  got, (dx, dw) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(x, w, t, weights)
  _assert_close(got, ref, "value")
  _assert_close(dx, ref_dx, "d hidden")
  _assert_close(dw, ref_dw, "d head")


def test_bfloat16_compute_is_at_least_as_close_to_float32_as_the_reference():
  """bf16 hidden states over float32 parameters: the chunked path keeps float32 logits, so it
  is no further from the float32 answer than bf16 autodiff of the reference."""
  x, w, t, weights = _head_inputs(True)
  exact = float(_reference(x, w, t, weights, True))
  x16 = x.astype(jnp.bfloat16)
  spec = "ble,ve->blv"
  ref16 = float(reference_numerator(jnp.einsum(spec, x16, w.astype(jnp.bfloat16)), t, weights))
  got16 = float(chunked_numerator(x16, w, t, weights, chunk=8, vocab_first=True))
  assert abs(got16 - exact) <= abs(ref16 - exact) + 1e-3 * abs(exact)
  dx = jax.grad(chunked_numerator)(x16, w, t, weights, chunk=8, vocab_first=True)
  assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx)))


def _all_avals(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield var.aval
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_avals(inner)


def test_no_tokens_by_vocab_array_in_the_chunked_program():
  x, w, t, weights = _head_inputs(False, b=2, length=64, v=97)
  fn = jax.value_and_grad(functools.partial(chunked_numerator, chunk=8, token_shards=2,
                                            vocab_first=False), argnums=(0, 1))
  sizes = [int(np.prod(a.shape)) for a in _all_avals(jax.make_jaxpr(fn)(x, w, t, weights).jaxpr)
           if hasattr(a, "shape") and a.shape and a.shape[-1] == 97]
  assert sizes and max(sizes) == 2 * 2 * 8 * 97  # one chunk [B, P, C, V], never [B, L, V]
  ref = jax.value_and_grad(_reference, argnums=(0, 1))
  ref_sizes = [int(np.prod(a.shape)) for a in _all_avals(
      jax.make_jaxpr(ref, static_argnums=4)(x, w, t, weights, False).jaxpr)
      if hasattr(a, "shape") and a.shape and a.shape[-1] == 97]
  assert max(ref_sizes) == 2 * 64 * 97  # the reference does hold them


# ---- through the trainer -----------------------------------------------------------------------
def _trainer_loss_and_grads(mesh_sizes, overrides, micro_batches=1):
  config = tiny_config({"data.num_shards": 2, "data.batch_size": 4,
                        "train.micro_batches": micro_batches, "attention.block_q": 32,
                        "attention.block_k": 32, **overrides})
  stage = read_stages(config)[0]
  mesh = make_mesh(mesh_sizes)
  runner = StageRunner(stage, mesh, seed=0, log=lambda *_: None)
  params = runner.random_params()
  if stage.lora.enabled:  # B = 0 at init would leave LoRA's own gradients trivial
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if "lora_b" in jax.tree_util.keystr(p) else x, params)
  loader = GlobalBatches(stage.data, mesh, micro_batches,
                         stage.attention.layout if mesh.shape["seq"] > 1 else None)
  batches, denominator, _ = next(loader)
  from longctx.train.step import split_params
  trainable, frozen = split_params(params, runner.mask)
  loss, grads = jax.jit(make_loss_and_grads(runner.numerator_fn))(trainable, frozen, batches,
                                                                  denominator)
  return float(loss), jax.device_get(grads)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes,overrides", [
    ({"data": 2, "seq": 4}, {"data.objective": "sequence"}),  # untied head
    ({"fsdp": 2, "seq": 4}, {"lora.enabled": True, "lora.s2_group_fraction": 0.0,
                             "model.tie_word_embeddings": True}),
])
def test_chunked_loss_in_the_trainer_equals_the_unchunked_path(mesh_sizes, overrides):
  ref_loss, ref_grads = _trainer_loss_and_grads(mesh_sizes, overrides)
  loss, grads = _trainer_loss_and_grads(mesh_sizes, {**overrides, "train.loss_chunk": 8,
                                                     "model.mlp_chunk": 16})
  _assert_close(loss, ref_loss, "loss")
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    _assert_close(g, dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path],
           jax.tree_util.keystr(path))


@pytest.mark.matrix
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_the_trainer_loss_is_the_objective_of_the_batch(mode):
  """Two micro-batches of packed rows: the step's loss equals data.objective's objective(...)
  over all their rows, from the model's own logits."""
  config = tiny_config({"data.objective": mode, "mesh.data": 8, "mesh.seq": 1,
                        "data.num_shards": 4, "data.batch_size": 2, "train.micro_batches": 2,
                        "train.loss_chunk": 16, "attention.impl": "dense"})
  stage = read_stages(config)[0]
  mesh = make_mesh({"data": 8})
  runner = StageRunner(stage, mesh, seed=0, log=lambda *_: None)
  params = runner.random_params()
  batches, denominator, _ = next(GlobalBatches(stage.data, mesh, 2, None))
  loss, _ = jax.jit(make_loss_and_grads(runner.numerator_fn))(params, {}, batches, denominator)
  rows = {k: np.asarray(v).reshape((-1,) + v.shape[2:]) for k, v in batches.items()}
  logits = runner.model.apply({"params": params}, rows["inputs"], rows["positions"],
                              rows["segment_ids"])
  want = objective(token_nll(logits, rows["targets"]), rows, ObjectiveMode(mode))
  np.testing.assert_allclose(float(loss), float(want), rtol=RTOL)


POLICIES = {
    "full": {"model.remat": "full"},
    "dots": {"model.remat": "dots"},
    "dots_no_batch": {"model.remat": "dots_no_batch"},
    "offload layer inputs, optimizer": {"model.remat": "full", "model.remat_offload":
                                        "layer_input", "train.offload_optimizer": True},
    "save qkv + attention, chunks": {"model.remat": "full", "model.remat_save": "qkv,attention",
                                     "model.mlp_chunk": 16, "train.loss_chunk": 32},
}


SHORT_RUN = {"stage_order": "short", "stages.short.train.steps": 2}


@functools.lru_cache(maxsize=1)
def _no_remat_losses(tmp):
  loop.run(tiny_config(SHORT_RUN), tmp, log=lambda *_: None)
  return tuple(_losses(tmp, "short"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(POLICIES))
def test_remat_and_offload_policies_give_the_same_losses(name, tmp_path_factory):
  """Two optimizer steps of the tiny config: the second loss depends on the first update."""
  ref = _no_remat_losses(str(tmp_path_factory.getbasetemp() / "no_remat"))
  workdir = str(tmp_path_factory.mktemp("policy"))
  loop.run(tiny_config({**SHORT_RUN, **POLICIES[name]}), workdir, log=lambda *_: None)
  got = _losses(workdir, "short")
  assert [s for s, _ in got] == [s for s, _ in ref] == [1, 2]
  np.testing.assert_allclose([x for _, x in got], [x for _, x in ref], rtol=RTOL, atol=0)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,message", [
    ("train.loss_chunk", 48, r"stages.short.train.loss_chunk=48: expected a divisor of the "
     r"tokens each device holds per row, 128 / seq 4 = 32"),
    ("model.mlp_chunk", 5, r"stages.short.model.mlp_chunk=5: expected a divisor"),
    ("train.loss_chunk", -1, r"stages.short.train.loss_chunk: expected tokens per chunk >= 0"),
])
def test_chunks_that_do_not_tile_the_tokens_per_device(tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message):
    loop.run(tiny_config({key: value}), str(tmp_path), log=lambda *_: None)


def test_offload_without_host_memory(tmp_path, monkeypatch):
  from longctx.train import runner
  monkeypatch.setattr(runner, "has_host_memory", lambda device=None: False)
  with pytest.raises(ValueError, match=r"stages.short.train.offload_optimizer: offloading needs "
                     r"a 'pinned_host' memory on the cpu devices, found memories \["):
    loop.run(tiny_config({"train.offload_optimizer": True}), str(tmp_path), log=lambda *_: None)
  with pytest.raises(ValueError, match=r"stages.short.model.remat_offload"):
    loop.run(tiny_config({"model.remat": "full", "model.remat_offload": "layer_input"}),
             str(tmp_path), log=lambda *_: None)


def test_unknown_tensor_name_and_offload_without_remat(tmp_path):
  with pytest.raises(ValueError, match=r"remat_offload: \['layer_inputs'\] are not tensor names"):
    loop.run(tiny_config({"model.remat": "full", "model.remat_offload": "layer_inputs"}),
             str(tmp_path), log=lambda *_: None)
  with pytest.raises(ValueError, match=r"but remat is 'none'"):
    loop.run(tiny_config({"model.remat_offload": "layer_input"}), str(tmp_path),
             log=lambda *_: None)
