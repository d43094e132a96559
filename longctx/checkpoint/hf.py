"""HF Llama checkpoints <-> longctx parameters (METHODS.md §7).

One table, `tensor_specs`, maps every HF tensor to its place in the longctx parameter tree and
back; import and export both walk it. Tensors are read one at a time through `safe_open` (never
the whole file at once) and keep their dtype, so bf16 stays bf16 and a round trip is bit-exact.
HF linear weights are [out, in]; longctx kernels are [*in_axes, *out_axes], hence a transpose and
a reshape. Scanned layers are stacked along a leading `layers` axis.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from longctx.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor: its name, its path in the longctx tree, and how its axes map.

  `layer` is the index into the stacked `layers` axis (None for non-layer tensors);
  `kernel_shape` is the longctx shape without the layer axis; `in_axes` is the number of its
  leading axes that are HF's input dimension (0: not a linear weight; the tensor is flattened,
  or kept as it is with `same_shape`, e.g. the embedding).
  """
  hf_name: str
  path: tuple[str, ...]
  layer: int | None
  kernel_shape: tuple[int, ...]
  in_axes: int
  same_shape: bool = False

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if self.same_shape:
      return self.kernel_shape
    if self.in_axes == 0:
      return (math.prod(self.kernel_shape),)
    return (math.prod(self.kernel_shape[self.in_axes:]), math.prod(self.kernel_shape[:self.in_axes]))

  def to_longctx(self, w: np.ndarray) -> np.ndarray:
    if tuple(w.shape) != self.hf_shape:
      raise ValueError(f"{self.hf_name}: expected shape {self.hf_shape}, found {tuple(w.shape)}")
    if self.in_axes == 0:
      return w.reshape(self.kernel_shape)
    return np.ascontiguousarray(w.T).reshape(self.kernel_shape)

  def to_hf(self, kernel: np.ndarray) -> np.ndarray:
    if self.in_axes == 0:
      return np.ascontiguousarray(kernel.reshape(self.hf_shape))
    w_in_out = kernel.reshape(self.hf_shape[1], self.hf_shape[0])
    return np.ascontiguousarray(w_in_out.T)


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every HF tensor of a Llama model with this config, in HF's order."""
  e, h, k, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens",), None, (cfg.vocab_size, e), 0,
                     same_shape=True)]
  linear = {  # name: (module path, kernel shape, in_axes, bias shape)
      "self_attn.q_proj": (("self_attn", "q_proj"), (e, h, d), 1, (h, d)),
      "self_attn.k_proj": (("self_attn", "k_proj"), (e, k, d), 1, (k, d)),
      "self_attn.v_proj": (("self_attn", "v_proj"), (e, k, d), 1, (k, d)),
      "self_attn.o_proj": (("self_attn", "o_proj"), (h, d, e), 2, (e,)),
      "mlp.gate_proj": (("mlp", "gate_proj"), (e, m), 1, (m,)),
      "mlp.up_proj": (("mlp", "up_proj"), (e, m), 1, (m,)),
      "mlp.down_proj": (("mlp", "down_proj"), (m, e), 1, (e,)),
  }
  for i in range(cfg.num_layers):
    prefix = f"model.layers.{i}."
    specs.append(TensorSpec(prefix + "input_layernorm.weight", ("layers", "input_layernorm", "scale"),
                            i, (e,), 0))
    for name, (path, shape, in_axes, bias_shape) in linear.items():
      specs.append(TensorSpec(prefix + name + ".weight", ("layers", *path, "dense", "kernel"), i,
                              shape, in_axes))
      has_bias = cfg.attention_bias if name.startswith("self_attn") else cfg.mlp_bias
      if has_bias:
        specs.append(TensorSpec(prefix + name + ".bias", ("layers", *path, "dense", "bias"), i,
                                bias_shape, 0))
    specs.append(TensorSpec(prefix + "post_attention_layernorm.weight",
                            ("layers", "post_attention_layernorm", "scale"), i, (e,), 0))
  specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), None, (e,), 0))
  if not cfg.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head", "dense", "kernel"), None,
                            (e, cfg.vocab_size), 1))
  return specs


# ---- reading -----------------------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config.json in {hf_dir!r}: expected an HF model directory")
  with open(path) as f:
    return json.load(f)


def _weight_files(hf_dir: str) -> dict[str, str]:
  """Tensor name -> safetensors file, from the index when sharded."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"No *.safetensors in {hf_dir!r} (PyTorch .bin checkpoints are not "
                            "supported: re-save with safe_serialization=True)")
  out = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      out.update({name: file for name in f.keys()})
  return out


def iter_hf_tensors(hf_dir: str, cfg: ModelConfig, progress: bool = True
                    ) -> Iterator[tuple[TensorSpec, np.ndarray]]:
  """Yields (spec, longctx-layout array) for every tensor, one at a time, keeping its dtype.

  Raises ValueError for a missing tensor and reports (in the error) any unexpected ones.
  """
  files = _weight_files(hf_dir)
  specs = tensor_specs(cfg)
  expected = {s.hf_name for s in specs}
  ignorable = {n for n in files if n.endswith("rotary_emb.inv_freq")}
  if cfg.tie_word_embeddings:
    ignorable.add("lm_head.weight")  # some exporters write the tied head anyway
  missing, unexpected = expected - set(files), set(files) - expected - ignorable
  if missing or unexpected:
    raise ValueError(f"{hf_dir}: tensors do not match config.json: missing {sorted(missing)[:5]} "
                     f"({len(missing)}), unexpected {sorted(unexpected)[:5]} ({len(unexpected)})")
  handles = {}
  try:
    for spec in tqdm(specs, desc="reading HF tensors", unit="tensor", disable=not progress):
      file = files[spec.hf_name]
      if file not in handles:
        handles[file] = safe_open(file, framework="numpy").__enter__()
      yield spec, spec.to_longctx(handles[file].get_tensor(spec.hf_name))
  finally:
    for h in handles.values():
      h.__exit__(None, None, None)


def _set(tree: dict, path: tuple[str, ...], value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def read_hf_params(hf_dir: str, cfg: ModelConfig, progress: bool = True) -> dict:
  """The longctx parameter tree (numpy, original dtypes) of an HF directory.

  Peak host memory is the model once: layer tensors are written into their stacked array as they
  are read.
  """
  params: dict = {}
  for spec, value in iter_hf_tensors(hf_dir, cfg, progress):
    if spec.layer is None:
      _set(params, spec.path, value)
      continue
    try:
      stacked = _get(params, spec.path)
    except KeyError:
      stacked = np.empty((cfg.num_layers, *spec.kernel_shape), value.dtype)
      _set(params, spec.path, stacked)
    if stacked.dtype != value.dtype:
      raise ValueError(f"{spec.hf_name}: dtype {value.dtype} differs from layer 0's {stacked.dtype}")
    stacked[spec.layer] = value
  return params


# ---- writing -----------------------------------------------------------------------------------

def _np_dtype(name: str | None):
  if name is None:
    return None
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def plan_shards(params: dict, specs: list[TensorSpec], dtype, max_shard_bytes: int
                ) -> tuple[list[list[TensorSpec]], int]:
  """Groups tensors, in order, into shards of at most `max_shard_bytes` (a lone larger tensor
  gets its own shard). Returns the groups and the total size in bytes."""
  plan: list[list[TensorSpec]] = [[]]
  size, total = 0, 0
  for spec in specs:
    itemsize = (dtype or np.asarray(_get(params, spec.path)).dtype).itemsize
    nbytes = math.prod(spec.kernel_shape) * itemsize
    if plan[-1] and size + nbytes > max_shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append(spec)
    size += nbytes
    total += nbytes
  return plan, total


def write_hf(params: dict, cfg: ModelConfig, hf_dir: str, *, dtype: str | None = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> None:
  """Writes an HF Llama directory: config.json and safetensors, sharded above `max_shard_bytes`
  with `model.safetensors.index.json`. At most one shard's tensors are in memory at a time.

  `dtype` (e.g. "bfloat16") casts every tensor; None keeps each tensor's own dtype.
  """
  os.makedirs(hf_dir, exist_ok=True)
  cast = _np_dtype(dtype)
  specs = tensor_specs(cfg)
  plan, total = plan_shards(params, specs, cast, max_shard_bytes)
  names = (["model.safetensors"] if len(plan) == 1 else
           [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
  weight_map, dtypes = {}, set()
  bar = tqdm(total=len(specs), desc="writing HF tensors", unit="tensor", disable=not progress)
  for name, shard_specs in zip(names, plan):
    shard = {}
    for spec in shard_specs:
      value = np.asarray(_get(params, spec.path))
      value = value if spec.layer is None else value[spec.layer]
      shard[spec.hf_name] = spec.to_hf(value if cast is None else value.astype(cast))
      dtypes.add(str(shard[spec.hf_name].dtype))
      weight_map[spec.hf_name] = name
      bar.update()
    save_file(shard, os.path.join(hf_dir, name), metadata={"format": "pt"})
  bar.close()
  if len(plan) > 1:
    with open(os.path.join(hf_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f, indent=2)
  torch_dtype = "bfloat16" if "bfloat16" in dtypes else sorted(dtypes)[0]
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(cfg.to_hf(torch_dtype=torch_dtype), f, indent=2)


def write_generation_config(cfg: ModelConfig, hf_dir: str) -> None:
  """generation_config.json from the model's special tokens, for an export whose source had none
  (transformers' `generate` reads its BOS / EOS there)."""
  with open(os.path.join(hf_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "_from_model_config": True}, f, indent=2)
