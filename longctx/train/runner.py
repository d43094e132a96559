"""One stage's model, sharded train state and compiled train step, built from abstract shapes.

The model is told how many devices split each row (`token_shards` = the mesh's `seq`) so its
token chunks stay local; the loss is contract 2's numerator, through the chunked head
(`train.loss_chunk` > 0) or the reference logits path (0). Every activation constraint the
model and the loss carry is resolved against RULES under this stage's mesh while the step is
traced (`sharding_context`). With `train.offload_optimizer` the optimizer state lives in
pinned host memory between steps and visits the device only for the update.
"""
from __future__ import annotations

import warnings
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longctx.checkpoint import manager as ckpt
from longctx.data.packing import BATCH_KEYS
from longctx.checkpoint.params import load_config
from longctx.model import Llama
from longctx.model.config import ModelConfig
from longctx.model.llama import head_weight
from longctx.parallel.mesh import (BATCH_AXES, activation_constraints, param_shardings,
                                   step_batch_sharding, step_rows_sharding)
from longctx.train.config import InitKind, StageSpec
from longctx.train.loss import chunked_numerator, reference_numerator
from longctx.train.step import (TrainState, init_state, learning_rate_schedule, make_optimizer,
                                make_train_step)

HOST_MEMORY = "pinned_host"


def model_config(stage: StageSpec) -> ModelConfig:
  if not stage.lora.enabled:
    return stage.model
  from longctx.model import lora
  return lora.with_lora(stage.model, stage.lora.rank, stage.lora.alpha, stage.lora.targets)


def head_axis(stage: StageSpec, mesh: Mesh) -> str | None:
  """"tensor" when context-parallel attention runs with the heads split over it (it divides
  both head counts; S²-Attn also needs it even), else None (the heads gathered per device)."""
  m, tensor = stage.model, mesh.shape["tensor"]
  if tensor == 1 or m.num_heads % tensor or m.num_kv_heads % tensor:
    return None
  return None if stage.attention.s2_group and tensor % 2 else "tensor"


def attention_fn(stage: StageSpec, mesh: Mesh, spec=None):
  """The model's attention function for `stage` (spec: stage.attention unless given) on the
  trainer's batches: in the spec's layout when context parallel (`permuted`)."""
  spec = stage.attention if spec is None else spec
  from longctx.attention.kernels import interpret
  if spec.kernel.pallas and interpret(spec.kernel):
    warnings.warn(f"attention.kernel={spec.kernel!r} on {jax.default_backend()}: it runs in "
                  "Pallas' interpreter, which is for tests and very slow", stacklevel=2)
  if not spec.context_parallel:
    return spec.function()
  return spec.function(mesh, seq_axis="seq", permuted=True, batch_axes=BATCH_AXES,
                       head_axis=head_axis(stage, mesh))


def has_host_memory(device: jax.Device | None = None) -> bool:
  device = device or jax.devices()[0]
  return HOST_MEMORY in {m.kind for m in device.addressable_memories()}


def boxed_abstract_params(cfg: ModelConfig):
  return jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 8), jnp.int32))["params"])


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=s),
                      abstract, shardings)


def _on_host(shardings):
  return jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), shardings)


class StageRunner:
  """Builds the sharded state and the compiled step of one stage."""

  def __init__(self, stage: StageSpec, mesh: Mesh, seed: int, log: Callable[[str], None]):
    self.stage, self.mesh, self.seed, self.log = stage, mesh, seed, log
    self.model_cfg = model_config(stage)
    self.token_shards = mesh.shape["seq"]
    self.model = Llama(self.model_cfg, attention_fn(stage, mesh), token_shards=self.token_shards)
    self.optimizer = make_optimizer(stage.train)
    self.schedule = learning_rate_schedule(stage.train)
    boxed = boxed_abstract_params(self.model_cfg)
    report: list[str] = []
    self.param_shardings = param_shardings(boxed, mesh, report)
    for line in report:
      log(f"  note: {line}")
    self.abstract_params = nn.meta.unbox(boxed)
    self.mask = None
    if stage.lora.enabled:
      from longctx.model import lora
      self.mask = lora.trainable_mask(self.abstract_params, stage.lora.trainable)
    boxed_state = jax.eval_shape(lambda p: init_state(p, self.mask, self.optimizer), boxed)
    self.device_state_shardings = param_shardings(boxed_state, mesh)
    self.state_shardings = self.device_state_shardings
    if stage.train.offload_optimizer:
      self.state_shardings = self.state_shardings.replace(
          opt_state=_on_host(self.state_shardings.opt_state))
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed_state), self.state_shardings)

  # -- parameters ---------------------------------------------------------------------------
  def random_params(self):
    init = jax.jit(lambda rng: nn.meta.unbox(Llama(self.model_cfg).init(
        rng, jnp.zeros((1, 8), jnp.int32))["params"]), out_shardings=self.param_shardings)
    return init(jax.random.PRNGKey(self.seed))

  def load_params(self, kind: InitKind, path: str):
    """Base weights from a longctx checkpoint or a HF directory, placed sharded; LoRA leaves
    (absent from a base) are added freshly initialised."""
    base_cfg = self.stage.model
    if kind is InitKind.HF:
      from longctx.checkpoint.hf import read_hf_config, read_hf_params
      src_cfg = ModelConfig.from_hf(read_hf_config(path))
    else:
      src_cfg = load_config(path)
    check_same_architecture(src_cfg, base_cfg, path)
    base_abstract = nn.meta.unbox(boxed_abstract_params(src_cfg.replace(
        rope=base_cfg.rope, dtype=base_cfg.dtype, remat=base_cfg.remat)))
    flat_sh = traverse_util.flatten_dict(self.param_shardings)
    base_sh = traverse_util.unflatten_dict(
        {k: flat_sh[k] for k in traverse_util.flatten_dict(base_abstract)})
    target = _with_shardings(base_abstract, base_sh)
    if kind is InitKind.HF:
      host = read_hf_params(path, src_cfg)
      params = jax.tree.map(lambda x, t: jax.device_put(np.asarray(x, np.float32), t.sharding),
                            host, target)
    else:
      params = ckpt.restore_params(path, target)
      if _has_lora_leaves(params) and not self.stage.lora.enabled:
        from longctx.model import lora
        params, _ = lora.merge_lora(params, load_config(path))
    if self.stage.lora.enabled:
      from longctx.model.lora_params import add_lora_params
      params = add_lora_params(params, self.model_cfg, jax.random.PRNGKey(self.seed + 1))
      params = jax.device_put(params, self.param_shardings)
    return params

  def init_state(self, params) -> TrainState:
    fn = jax.jit(lambda p: init_state(p, self.mask, self.optimizer),
                 out_shardings=self.state_shardings, donate_argnums=0)
    return fn(params)

  # -- the step -------------------------------------------------------------------------------
  def sharding_context(self):
    """Where activation constraints resolve while tracing: this mesh and the rules table."""
    return activation_constraints(self.mesh)

  def numerator_fn(self, params, batch) -> jax.Array:
    """Σ_t w_t ℓ_t of one micro-batch [B, L] (contract 2's numerator, train.loss)."""
    chunk = self.stage.train.loss_chunk
    with self.sharding_context():
      inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
      if not chunk:
        logits = self.model.apply({"params": params}, *inputs)
        return reference_numerator(logits, batch["targets"], batch["loss_weights"])
      hidden = self.model.apply({"params": params}, *inputs, return_hidden=True)
      head, vocab_first = head_weight(params, self.model_cfg)
      return chunked_numerator(hidden, head, batch["targets"], batch["loss_weights"],
                               chunk=chunk, token_shards=self.token_shards,
                               vocab_first=vocab_first)

  def apply_fn(self, params, batch):
    """Logits [B, L, V] of one micro-batch (evaluation, tests)."""
    return self.model.apply({"params": params}, batch["inputs"], batch["positions"],
                            batch["segment_ids"])

  def step_fn(self):
    """The pure train step; with offload_optimizer it brings the optimizer state to the
    device for the update and sends it back to host memory."""
    grads = self.device_state_shardings.trainable
    step = make_train_step(self.numerator_fn, self.optimizer, self.schedule, grads)
    if not self.stage.train.offload_optimizer:
      return step
    device_opt = self.device_state_shardings.opt_state
    host_opt = self.state_shardings.opt_state

    def offloaded(state, batches, denominator, ok):
      state = state.replace(opt_state=jax.device_put(state.opt_state, device_opt))
      state, metrics = step(state, batches, denominator, ok)
      return state.replace(opt_state=jax.device_put(state.opt_state, host_opt)), metrics
    return offloaded

  def compiled_step(self):
    replicated = NamedSharding(self.mesh, P())
    return jax.jit(self.step_fn(), in_shardings=(self.state_shardings,
                                                 step_batch_sharding(self.mesh),
                                                 step_rows_sharding(self.mesh), replicated),
                   out_shardings=(self.state_shardings, replicated), donate_argnums=0)

  def first_ok(self) -> jax.Array:
    """The `ok` input of a stage's first step (train.step.make_train_step)."""
    return jax.device_put(jnp.int32(1), NamedSharding(self.mesh, P()))

  def abstract_ok(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(self.mesh, P()))

  def abstract_batch(self, length: int | None = None):
    """(batches, denominator) as ShapeDtypeStructs of one step at `length` (default max_len)."""
    data = self.stage.data
    k, rows = self.stage.train.micro_batches, data.num_shards * data.batch_size
    shape = (k, rows, length or self.stage.data.max_len)
    batch_sh = step_batch_sharding(self.mesh)
    batches = {key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == "loss_weights"
                                         else jnp.int32, sharding=batch_sh)
               for key in BATCH_KEYS}
    denominator = jax.ShapeDtypeStruct((k, rows), jnp.int32,
                                       sharding=step_rows_sharding(self.mesh))
    return batches, denominator


def _has_lora_leaves(params) -> bool:
  return any("lora" in "/".join(k) for k in traverse_util.flatten_dict(params))


def check_same_architecture(src: ModelConfig, want: ModelConfig, path: str) -> None:
  keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
          "num_kv_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias",
          "qkv_bias", "qk_norm")
  diff = {k: (getattr(want, k), getattr(src, k)) for k in keys
          if getattr(want, k) != getattr(src, k)}
  if diff:
    raise ValueError(f"{path}: the checkpoint's architecture differs from config.model "
                     f"(key: (config, checkpoint)): {diff}")
