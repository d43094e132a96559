"""LoRA adapters -> a PEFT adapter directory (METHODS.md §7): `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base, DIR)` loads onto the HF
export of the base model.

Tensor names follow PEFT's `get_peft_model_state_dict` for a LlamaForCausalLM:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]
    base_model.model.model.embed_tokens.weight                         (modules_to_save)
    base_model.model.model.layers.{i}.input_layernorm.weight           (modules_to_save)

LoRA+ trains the embedding and every RMSNorm fully (METHODS.md §2). PEFT's `modules_to_save`
takes any module, norms included (it wraps each in a ModulesToSaveWrapper and saves the whole
module under its own name), so they go there: the adapter then reproduces the trained model on
the *original* base, and equally on the frozen base of the checkpoint
(`python -m longctx.convert to-hf CKPT DIR --base-only`), whose untrained weights are the same.
A tied embedding also feeds the head: then `ensure_weight_tying` is set, with which PEFT keeps
the head tied to its trained copy of the embedding and saves that copy as `lm_head.weight` too
(a PEFT version that knows `ensure_weight_tying` is needed; 0.21.2 is tested).
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


def _lora_tensors(params, cfg: ModelConfig, cast) -> dict[str, np.ndarray]:
  """PEFT lora_A [r, in] / lora_B [out, r] of every adapted projection of every layer."""
  out = {}
  r = cfg.lora_rank
  for spec in hf.tensor_specs(lora.base_config(cfg)):
    module_path, leaf = spec.path[:-2], spec.path[-2:]
    if leaf != ("dense", "kernel") or module_path[-1] not in cfg.lora_targets:
      continue
    a, b = (np.asarray(x) for x in lora.lora_factors(params, module_path))
    if spec.layer is not None:
      a, b = a[spec.layer], b[spec.layer]
    fan_in = math.prod(spec.kernel_shape[:spec.in_axes])
    module = PREFIX + spec.hf_name[:-len(".weight")]
    out[module + ".lora_A.weight"] = np.ascontiguousarray(_cast(a.reshape(fan_in, r).T, cast))
    out[module + ".lora_B.weight"] = np.ascontiguousarray(_cast(b.reshape(r, -1).T, cast))
  return out


def _saved_modules(params, cfg: ModelConfig, fragments: Sequence[str], cast
                   ) -> tuple[list[str], dict[str, np.ndarray]]:
  """(modules_to_save names, their tensors) for the longctx parameters matching `fragments`
  (the fragments of `lora.trainable_mask`); a matched module is saved whole.

  Raises ValueError for a fragment that matches nothing or an adapted projection."""
  specs = hf.tensor_specs(lora.base_config(cfg))
  modules: dict[str, str] = {}  # HF module path -> its last name
  for fragment in fragments:
    hits = [s for s in specs if fragment in "/".join(s.path)]
    if not hits:
      raise ValueError(f"modules_to_save fragment {fragment!r} matches no parameter of the model")
    for s in hits:
      module = s.hf_name.rsplit(".", 1)[0]
      name = module.rsplit(".", 1)[-1]
      if name in cfg.lora_targets:
        raise ValueError(f"modules_to_save fragment {fragment!r} matches {module}, which LoRA "
                         "adapts; PEFT cannot both adapt a module and save it whole")
      modules[module] = name
  tensors = {}
  for s in specs:
    if s.hf_name.rsplit(".", 1)[0] in modules:
      value = np.asarray(hf._get(params, s.path))
      value = value if s.layer is None else value[s.layer]
      tensors[PREFIX + s.hf_name] = s.to_hf(_cast(value, cast))
  if cfg.tie_word_embeddings and "model.embed_tokens" in modules:
    # With ensure_weight_tying PEFT wraps the tied head too and saves (and loads) its copy.
    tensors[PREFIX + "lm_head.weight"] = tensors[PREFIX + "model.embed_tokens.weight"]
  return sorted(set(modules.values())), tensors


def adapter_config(cfg: ModelConfig, modules_to_save: Sequence[str],
                   base_model_name_or_path: str | None = None) -> dict:
  """The adapter_config.json dict (keys PEFT's LoraConfig reads; others take its defaults)."""
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none",
      "target_modules": sorted(cfg.lora_targets), "modules_to_save": list(modules_to_save) or None,
      "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
      "inference_mode": True, "layers_to_transform": None, "rank_pattern": {},
      "alpha_pattern": {}, "revision": None,
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
  tensors = {**_lora_tensors(params, cfg, cast), **saved}
  config = adapter_config(cfg, names, base_model_name_or_path)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return config
