"""HF checkpoints of every model family <-> longctx parameters (METHODS.md §7).

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

from longctx.model import families
from longctx.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One longctx parameter in an HF tensor: the HF name, its path in the longctx tree, and how
  its axes map.

  `layer` is the index into the stacked `layers` axis (None for non-layer tensors);
  `kernel_shape` is the longctx shape without the layer axis; `in_axes` is the number of its
  leading axes that are HF's input dimension (0: not a linear weight; the tensor is flattened,
  or kept as it is with `same_shape`, e.g. the embedding). `rows` (start, stop): the parameter
  is that slice of the HF tensor's output rows, a fused weight such as Phi-3's qkv_proj
  holding several longctx parameters; None: the whole tensor.
  """
  hf_name: str
  path: tuple[str, ...]
  layer: int | None
  kernel_shape: tuple[int, ...]
  in_axes: int
  same_shape: bool = False
  rows: tuple[int, int] | None = None

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """The shape of this parameter's part of the HF tensor."""
    if self.same_shape:
      return self.kernel_shape
    if self.in_axes == 0:
      return (math.prod(self.kernel_shape),)
    return (math.prod(self.kernel_shape[self.in_axes:]), math.prod(self.kernel_shape[:self.in_axes]))

  def to_longctx(self, w: np.ndarray) -> np.ndarray:
    """This parameter from the (whole) HF tensor `w`."""
    if self.rows is not None:
      w = w[self.rows[0]:self.rows[1]]
    if tuple(w.shape) != self.hf_shape:
      where = "" if self.rows is None else f" rows {self.rows[0]}:{self.rows[1]}"
      raise ValueError(f"{self.hf_name}{where}: expected shape {self.hf_shape}, found "
                       f"{tuple(w.shape)}")
    if self.in_axes == 0:
      return w.reshape(self.kernel_shape)
    return np.ascontiguousarray(w.T).reshape(self.kernel_shape)

  def to_hf(self, kernel: np.ndarray) -> np.ndarray:
    """This parameter's part of the HF tensor (the rows of a fused one)."""
    if self.in_axes == 0:
      return np.ascontiguousarray(kernel.reshape(self.hf_shape))
    w_in_out = kernel.reshape(self.hf_shape[1], self.hf_shape[0])
    return np.ascontiguousarray(w_in_out.T)


def _linear_modules(cfg: ModelConfig) -> dict:
  """name: (module path, kernel shape, in_axes, bias shape, has bias) of a layer's projections."""
  e, h, k, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  qkv_bias = cfg.attention_bias or cfg.qkv_bias
  return {
      "self_attn.q_proj": (("self_attn", "q_proj"), (e, h, d), 1, (h, d), qkv_bias),
      "self_attn.k_proj": (("self_attn", "k_proj"), (e, k, d), 1, (k, d), qkv_bias),
      "self_attn.v_proj": (("self_attn", "v_proj"), (e, k, d), 1, (k, d), qkv_bias),
      "self_attn.o_proj": (("self_attn", "o_proj"), (h, d, e), 2, (e,), cfg.attention_bias),
      "mlp.gate_proj": (("mlp", "gate_proj"), (e, m), 1, (m,), cfg.mlp_bias),
      "mlp.up_proj": (("mlp", "up_proj"), (e, m), 1, (m,), cfg.mlp_bias),
      "mlp.down_proj": (("mlp", "down_proj"), (m, e), 1, (e,), cfg.mlp_bias),
  }


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every longctx parameter of a model with this config in its family's HF tensors, in HF's
  order (the parts of a fused tensor next to each other, in the family's order)."""
  e = cfg.hidden_size
  family = families.get(cfg.family)
  specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens",), None, (cfg.vocab_size, e), 0,
                     same_shape=True)]
  for i in range(cfg.num_layers):
    prefix, rows = f"model.layers.{i}.", {}  # rows: fused HF tensor -> rows taken so far

    def add(module: str, leaf: str, path, shape, in_axes, layer=i, prefix=prefix, rows=rows):
      spec = TensorSpec(f"{prefix}{family.hf_module(module)}.{leaf}", path, layer, shape, in_axes)
      if family.hf_module(module) != module:
        start = rows.get(spec.hf_name, 0)
        rows[spec.hf_name] = start + spec.hf_shape[0]
        spec = dataclasses.replace(spec, rows=(start, rows[spec.hf_name]))
      specs.append(spec)

    add("input_layernorm", "weight", ("layers", "input_layernorm", "scale"), (e,), 0)
    for name, (path, shape, in_axes, bias_shape, has_bias) in _linear_modules(cfg).items():
      add(name, "weight", ("layers", *path, "dense", "kernel"), shape, in_axes)
      if has_bias:
        add(name, "bias", ("layers", *path, "dense", "bias"), bias_shape, 0)
      if cfg.qk_norm and name == "self_attn.v_proj":  # Qwen3's per-head norms, before o_proj
        for norm in ("q_norm", "k_norm"):
          add(f"self_attn.{norm}", "weight", ("layers", "self_attn", norm, "scale"),
              (cfg.head_dim,), 0)
    norms = ("post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm") if cfg.sandwich_norms else ("post_attention_layernorm",)
    for norm in norms:
      add(norm, "weight", ("layers", norm, "scale"), (e,), 0)
  specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), None, (e,), 0))
  if not cfg.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head", "dense", "kernel"), None,
                            (e, cfg.vocab_size), 1))
  return specs


def group_by_tensor(specs: list[TensorSpec]) -> list[list[TensorSpec]]:
  """The specs grouped by HF tensor (a fused tensor's parts together), in order."""
  groups: dict[str, list[TensorSpec]] = {}
  for spec in specs:
    groups.setdefault(spec.hf_name, []).append(spec)
  return list(groups.values())


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
    for group in tqdm(group_by_tensor(specs), desc="reading HF tensors", unit="tensor",
                      disable=not progress):
      name = group[0].hf_name
      if files[name] not in handles:
        handles[files[name]] = safe_open(files[name], framework="numpy").__enter__()
      tensor = handles[files[name]].get_tensor(name)
      _check_fused(group, tensor)
      for spec in group:
        yield spec, spec.to_longctx(tensor)
  finally:
    for h in handles.values():
      h.__exit__(None, None, None)


def _check_fused(group: list[TensorSpec], tensor: np.ndarray) -> None:
  """A fused HF tensor must hold exactly its parts' rows."""
  if group[0].rows is not None and tensor.shape[0] != group[-1].rows[1]:
    parts = [s.path[-3] for s in group]
    raise ValueError(f"{group[0].hf_name}: expected {group[-1].rows[1]} rows ({' + '.join(parts)}"
                     f"), found shape {tuple(tensor.shape)}")


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


def hf_tensor(params: dict, group: list[TensorSpec], cast) -> np.ndarray:
  """One HF tensor from the longctx parameters (a fused one: its parts' rows stacked)."""
  parts = []
  for spec in group:
    value = np.asarray(_get(params, spec.path))
    value = value if spec.layer is None else value[spec.layer]
    parts.append(spec.to_hf(value if cast is None else value.astype(cast)))
  return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def plan_shards(params: dict, groups: list[list[TensorSpec]], dtype, max_shard_bytes: int
                ) -> tuple[list[list[list[TensorSpec]]], int]:
  """Puts HF tensors (`group_by_tensor`'s groups), in order, into shards of at most
  `max_shard_bytes` (a lone larger tensor gets its own shard). Returns the shards and the total
  size in bytes."""
  plan: list[list[list[TensorSpec]]] = [[]]
  size, total = 0, 0
  for group in groups:
    nbytes = sum(math.prod(spec.kernel_shape) * (
        dtype or np.asarray(_get(params, spec.path)).dtype).itemsize for spec in group)
    if plan[-1] and size + nbytes > max_shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append(group)
    size += nbytes
    total += nbytes
  return plan, total


def write_hf(params: dict, cfg: ModelConfig, hf_dir: str, *, dtype: str | None = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> None:
  """Writes an HF directory of the model's family: config.json and safetensors, sharded above
  `max_shard_bytes` with `model.safetensors.index.json`. At most one shard's tensors are in
  memory at a time.

  `dtype` (e.g. "bfloat16") casts every tensor; None keeps each tensor's own dtype.
  """
  config = cfg.to_hf()  # before any file: a family that cannot hold the model is refused here
  os.makedirs(hf_dir, exist_ok=True)
  cast = _np_dtype(dtype)
  groups = group_by_tensor(tensor_specs(cfg))
  plan, total = plan_shards(params, groups, cast, max_shard_bytes)
  names = (["model.safetensors"] if len(plan) == 1 else
           [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
  weight_map, dtypes = {}, set()
  bar = tqdm(total=len(groups), desc="writing HF tensors", unit="tensor", disable=not progress)
  for name, shard_groups in zip(names, plan):
    shard = {}
    for group in shard_groups:
      tensor_name = group[0].hf_name
      shard[tensor_name] = hf_tensor(params, group, cast)
      dtypes.add(str(shard[tensor_name].dtype))
      weight_map[tensor_name] = name
      bar.update()
    save_file(shard, os.path.join(hf_dir, name), metadata={"format": "pt"})
  bar.close()
  if len(plan) > 1:
    with open(os.path.join(hf_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f, indent=2)
  torch_dtype = "bfloat16" if "bfloat16" in dtypes else sorted(dtypes)[0]
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump({**config, "torch_dtype": torch_dtype}, f, indent=2)


def write_generation_config(cfg: ModelConfig, hf_dir: str) -> None:
  """generation_config.json from the model's special tokens, for an export whose source had none
  (transformers' `generate` reads its BOS / EOS there)."""
  with open(os.path.join(hf_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "_from_model_config": True}, f, indent=2)
