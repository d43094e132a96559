"""Evaluation during training (config section `eval`): every `every_steps` optimizer steps,

  eval_loss / eval_ppl   token-mean loss and its exp over `batches` held-out batches of the stage's
                         data (the same pipeline with seed + 1000: other shuffles and packings),
                         with full causal attention — LongLoRA trains with S²-Attn but evaluates
                         with full attention;
  passkey_<n>            passkey accuracy (LongLoRA's protocol, longctx.eval.passkey) at each
                         length n of `passkey_lengths`, greedy, `passkey_trials` trials;

written to metrics.jsonl and TensorBoard next to the training metrics. Everything here runs on
every process (SPMD); only process 0 writes.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longctx.model import Llama
from longctx.model.config import ModelConfig
from longctx.train.config import StageSpec
from longctx.train.loss import reference_numerator
from longctx.train.runner import attention_fn


class Evaluator:
  """Held-out loss and passkey for one stage; built once, called with the current params."""

  def __init__(self, stage: StageSpec, model_cfg: ModelConfig, mesh: Mesh):
    cfg = stage.eval
    from longctx.train.data import GlobalBatches
    self.cfg, self.model_cfg, self.mesh = cfg, model_cfg, mesh
    spec = stage.attention.full_attention()  # evaluation uses full attention
    self.layout = spec.layout if mesh.shape["seq"] > 1 else None
    if self.layout is None:  # plain jit: the pure-JAX kernel (a Pallas call would be gathered)
      spec = dataclasses.replace(spec, impl="tiled", kernel="xla")
    self.model = Llama(model_cfg, attention_fn(stage, mesh, spec))
    data = dataclasses.replace(stage.data, seed=stage.data.seed + 1000, num_epochs=0)
    loader = GlobalBatches(data, mesh, 1, self.layout)
    self.batches = [next(loader)[0] for _ in range(cfg.batches)]
    replicated = NamedSharding(mesh, P())

    def loss_terms(params, batch):
      batch = {k: v[0] for k, v in batch.items()}
      logits = self.model.apply({"params": params}, batch["inputs"], batch["positions"],
                                batch["segment_ids"])
      mask = (batch["loss_weights"] > 0).astype(jnp.float32)
      return reference_numerator(logits, batch["targets"], mask), jnp.sum(mask)

    self._loss_terms = jax.jit(loss_terms, out_shardings=(replicated, replicated))
    self.tokenizer = None
    if cfg.passkey_lengths:
      from longctx.data.tokenizers import make_tokenizer
      self.tokenizer = make_tokenizer(stage.data.tokenizer, stage.data.tokenizer_path)

  def due(self, step: int, last_step: int) -> bool:
    return self.cfg.every_steps > 0 and (step % self.cfg.every_steps == 0 or step == last_step)

  def __call__(self, params) -> dict[str, float]:
    total, count = 0.0, 0.0
    for batch in self.batches:
      s, n = self._loss_terms(params, batch)
      total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))}
    if self.cfg.passkey_lengths:
      from longctx.eval.pretrained import PretrainedModel
      from longctx.eval.passkey import run_passkey
      model = PretrainedModel(self.model_cfg, params)
      report = run_passkey(model, self.tokenizer, self.cfg.passkey_lengths,
                           trials=self.cfg.passkey_trials, seed=0,
                           batch_size=self.cfg.passkey_trials)
      out.update({f"passkey_{n}": float(acc) for n, acc in report["accuracy"].items()})
    return out
