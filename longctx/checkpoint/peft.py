"""LoRA adapters -> a PEFT adapter directory (METHODS.md §7): `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base, DIR)` loads onto the HF
export of the base model.

Tensor names follow PEFT's `get_peft_model_state_dict` (here a LlamaForCausalLM's):

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]
    base_model.model.model.embed_tokens.weight                         (modules_to_save)
    base_model.model.model.layers.{i}.input_layernorm.weight           (modules_to_save)

LoRA+ trains the embedding and every RMSNorm fully (METHODS.md §2). PEFT's `modules_to_save`
takes any module, norms included (it wraps each in a ModulesToSaveWrapper and saves the whole
module under its own name), so they go there: the adapter then reproduces the trained model on
the *original* base, and equally on the frozen base of the checkpoint
(`python -m longctx.convert to-hf CKPT DIR --base_only`), whose untrained weights are the same.
A tied embedding also feeds the head: then `ensure_weight_tying` is set, with which PEFT keeps
the head tied to its trained copy of the embedding and saves that copy as `lm_head.weight` too
(a PEFT version that knows `ensure_weight_tying` is needed; 0.21.2 is tested).

A family whose HF files fuse projections (Phi-3: q, k, v in `qkv_proj`; gate and up in
`gate_up_proj`) has PEFT adapt the fused module. longctx keeps one adapter of rank r per
projection, which is exported exactly as one block-structured adapter of rank n·r on the fused
module (n adapted parts): lora_A stacks the parts' A [n·r, in], lora_B holds each part's B in
its rows and its rank block [out_q + out_k + out_v, n·r], zero elsewhere; `rank_pattern` and
`alpha_pattern` give that module rank n·r and alpha n·alpha, so PEFT's alpha / rank stays
alpha / r and B·A·alpha/r is each part's update in its rows.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
from safetensors.numpy import save_file

from longctx.checkpoint import hf
from longctx.model import lora
from longctx.model.config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _cast(x: np.ndarray, cast) -> np.ndarray:
  return x if cast is None else x.astype(cast)


def _module(spec: hf.TensorSpec) -> str:
  """The longctx module a parameter belongs to ("q_proj", "input_layernorm", "embed_tokens")."""
  if spec.path[-2:] in (("dense", "kernel"), ("dense", "bias")):
    return spec.path[-3]
  return spec.path[-2] if len(spec.path) > 1 else spec.path[0]


def _factors(params, spec: hf.TensorSpec, r: int) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's (lora_A [r, in], lora_B [out, r]) of one adapted projection in one layer."""
  a, b = (np.asarray(x) for x in lora.lora_factors(params, spec.path[:-2]))
  if spec.layer is not None:
    a, b = a[spec.layer], b[spec.layer]
  fan_in = math.prod(spec.kernel_shape[:spec.in_axes])
  return a.reshape(fan_in, r).T, b.reshape(r, -1).T


def _lora_tensors(params, cfg: ModelConfig, cast) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """(PEFT lora_A [r', in] / lora_B [out, r'] of every adapted HF module of every layer, the
  rank multiple of each fused module).

  An HF module that fuses n adapted projections (Phi-3's qkv_proj, gate_up_proj) gets one
  block-structured adapter of rank n·r: the parts' A stacked, their B on the block diagonal
  (the rows of an unadapted part are zero), so that B·A is each part's B_p·A_p in its rows.
  With alpha scaled by n as well (`alpha_pattern`), PEFT's alpha / rank is alpha / r."""
  out, multiples = {}, {}
  kernels = [s for s in hf.tensor_specs(lora.base_config(cfg)) if s.path[-2:] == ("dense", "kernel")]
  for group in hf.group_by_tensor(kernels):
    parts = [s for s in group if _module(s) in cfg.lora_targets]
    if not parts:
      continue
    factors = [_factors(params, s, cfg.lora_rank) for s in parts]
    a = np.concatenate([fa for fa, _ in factors], axis=0)
    b = np.zeros((group[-1].rows[1], a.shape[0]), a.dtype) if group[0].rows else factors[0][1]
    for k, (spec, (_, fb)) in enumerate(zip(parts, factors)):
      if spec.rows:
        b[spec.rows[0]:spec.rows[1], k * cfg.lora_rank:(k + 1) * cfg.lora_rank] = fb
    module = PREFIX + group[0].hf_name[:-len(".weight")]
    out[module + ".lora_A.weight"] = np.ascontiguousarray(_cast(a, cast))
    out[module + ".lora_B.weight"] = np.ascontiguousarray(_cast(b, cast))
    if len(parts) > 1:
      multiples[module.rsplit(".", 1)[-1]] = len(parts)
  return out, multiples


def _saved_modules(params, cfg: ModelConfig, fragments: Sequence[str], cast
                   ) -> tuple[list[str], dict[str, np.ndarray]]:
  """(modules_to_save names, their tensors) for the longctx parameters matching `fragments`
  (the fragments of `lora.trainable_mask`); a matched HF module (a fused one with all its parts)
  is saved whole.

  Raises ValueError for a fragment that matches nothing or an adapted projection."""
  groups = hf.group_by_tensor(hf.tensor_specs(lora.base_config(cfg)))
  modules: dict[str, str] = {}  # HF module path -> its last name
  for fragment in fragments:
    hits = [s for group in groups for s in group if fragment in "/".join(s.path)]
    if not hits:
      raise ValueError(f"modules_to_save fragment {fragment!r} matches no parameter of the model")
    for s in hits:
      module = s.hf_name.rsplit(".", 1)[0]
      if _module(s) in cfg.lora_targets:
        raise ValueError(f"modules_to_save fragment {fragment!r} matches {module}, which LoRA "
                         "adapts; PEFT cannot both adapt a module and save it whole")
      modules[module] = module.rsplit(".", 1)[-1]
  tensors = {PREFIX + group[0].hf_name: hf.hf_tensor(params, group, cast) for group in groups
             if group[0].hf_name.rsplit(".", 1)[0] in modules}
  if cfg.tie_word_embeddings and "model.embed_tokens" in modules:
    # With ensure_weight_tying PEFT wraps the tied head too and saves (and loads) its copy.
    tensors[PREFIX + "lm_head.weight"] = tensors[PREFIX + "model.embed_tokens.weight"]
  return sorted(set(modules.values())), tensors


def target_modules(cfg: ModelConfig) -> list[str]:
  """The HF modules LoRA adapts: its targets, under their fused names in a fused family."""
  return sorted({s.hf_name.rsplit(".", 2)[-2] for s in hf.tensor_specs(lora.base_config(cfg))
                 if s.path[-2:] == ("dense", "kernel") and _module(s) in cfg.lora_targets})


def adapter_config(cfg: ModelConfig, modules_to_save: Sequence[str],
                   base_model_name_or_path: str | None = None,
                   rank_multiples: dict[str, int] | None = None) -> dict:
  """The adapter_config.json dict (keys PEFT's LoraConfig reads; others take its defaults).
  rank_multiples: HF module -> n for the fused modules adapted at rank n·r and alpha n·alpha."""
  multiples = rank_multiples or {}
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none",
      "target_modules": target_modules(cfg), "modules_to_save": list(modules_to_save) or None,
      "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
      "inference_mode": True, "layers_to_transform": None,
      "rank_pattern": {m: n * cfg.lora_rank for m, n in sorted(multiples.items())},
      "alpha_pattern": {m: n * cfg.lora_alpha for m, n in sorted(multiples.items())},
      "revision": None,
  }
  if cfg.tie_word_embeddings and "embed_tokens" in modules_to_save:
    config["ensure_weight_tying"] = True
  return config


def write_peft(params, cfg: ModelConfig, out_dir: str, *,
               modules_to_save: Sequence[str] = lora.DEFAULT_TRAINABLE,
               base_model_name_or_path: str | None = None, dtype: str | None = None) -> dict:
  """Writes the PEFT adapter of a LoRA model (params with LoRA leaves, cfg with lora_rank > 0).

  modules_to_save: fragments of longctx parameter paths that training updated fully (as passed
  to `lora.trainable_mask`; () for none); every HF module they touch is saved whole.
  dtype: cast every tensor (e.g. "bfloat16"); None keeps each tensor's saved dtype.
  Returns the adapter config. Raises ValueError if the model has no LoRA.
  """
  if not cfg.has_lora:
    raise ValueError("the checkpoint's model config has no LoRA (lora_rank = 0): nothing to "
                     "export as a PEFT adapter; use to-hf")
  cast = hf._np_dtype(dtype)
  names, saved = _saved_modules(params, cfg, tuple(modules_to_save), cast)
  adapters, multiples = _lora_tensors(params, cfg, cast)
  tensors = {**adapters, **saved}
  config = adapter_config(cfg, names, base_model_name_or_path, multiples)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return config
