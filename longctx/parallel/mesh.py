"""Mesh axes and the one logical-axis rules table (DESIGN.md, Mesh).

Axes:  data    pure data parallelism (parameters replicated)
       fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3)
       seq     context parallelism: each row's tokens split across devices, ring attention
       tensor  tensor parallelism over heads and the MLP hidden dimension

Rows of a batch are split over (data, fsdp); tokens over seq. Parameters carry logical axis
names (longctx.model.llama) and RULES maps them to mesh axes. A dimension that a mesh axis does
not divide is left unsharded on that axis (reported by `param_shardings`), so tiny models run
on any mesh.

Parameters, their gradients and the optimizer state are sharded over fsdp × seq (the `embed`
rule, as MaxText shards over its fsdp and context axes): a device of the `seq` axis holds other
tokens of the same rows, so it has no reason to hold another copy of the state. Only `data`
replicates the state. The same table constrains activations: the residual stream and the token
chunks of the MLP and the loss are [batch, length, ...] (model.llama, model.chunking).
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longctx.errors import ConfigError

AXES = ("data", "fsdp", "seq", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or None). The one table; params and activations both use it.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", "seq"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "seq")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("lora_rank", None),
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """Resolve one -1 entry to the remaining devices; ValueError when the product does not fit."""
  unknown = [a for a in AXES if sizes.get(a, 1) == -1]
  if len(unknown) > 1:
    raise ConfigError(f"config mesh: expected at most one axis = -1, found {unknown}")
  bad = {a: sizes[a] for a in AXES if sizes.get(a, 1) == 0 or sizes.get(a, 1) < -1}
  if bad:
    raise ConfigError(f"config mesh: expected sizes >= 1 (or -1), found {bad}")
  known = math.prod(sizes.get(a, 1) for a in AXES if a not in unknown)
  if num_devices % known:
    raise ConfigError(f"config mesh: {dict((a, sizes.get(a, 1)) for a in AXES)} does not divide "
                      f"the {num_devices} devices")
  shape = {a: sizes.get(a, 1) for a in AXES}
  if unknown:
    shape[unknown[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ConfigError(f"config mesh: {shape} uses {math.prod(shape.values())} devices, found "
                      f"{num_devices} (set one axis to -1 to take the rest)")
  return shape


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes AXES. Devices are laid out so that `seq` and `tensor` (the chattiest
  axes) are innermost, i.e. within a host / slice where possible."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  dims = tuple(shape[a] for a in AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(dims)
  return Mesh(grid, AXES)


def logical_to_spec(names: Sequence[str | None]) -> P:
  return nn.logical_to_mesh_axes(tuple(names), RULES)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> tuple[P, list[str]]:
  """Drop mesh axes that do not divide their dimension; return the spec and what was dropped."""
  out, dropped = [], []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    keep = []
    for a in axes:
      size = math.prod(mesh.shape[k] for k in keep + [a])
      if dim % size == 0:
        keep.append(a)
      elif mesh.shape[a] > 1:
        dropped.append(f"{a} (size {mesh.shape[a]}) on a dimension of {dim}")
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out), dropped


def param_shardings(abstract_tree, mesh: Mesh, report: list[str] | None = None):
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract arrays.

  Returns an unboxed tree of shardings. Leaves without logical names are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  values = nn.meta.unbox(abstract_tree)

  def one(path, spec, value):
    mesh_spec = logical_to_spec(spec) if spec is not None else P()
    mesh_spec, dropped = _fit_spec(mesh_spec, value.shape, mesh)
    if dropped and report is not None:
      report.append(f"{jax.tree_util.keystr(path)}: unsharded over {', '.join(dropped)}")
    return NamedSharding(mesh, mesh_spec)

  return jax.tree_util.tree_map_with_path(one, specs, values,
                                          is_leaf=lambda x: isinstance(x, P) or x is None)


# Logical axes of a train step's batch [micro-batches, rows, tokens] and of its per-row
# denominator [micro-batches, rows] (train.data, train.loop, plan).
STEP_BATCH_AXES = (None, "batch", "length")
STEP_ROWS_AXES = (None, "batch")


def step_batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(STEP_BATCH_AXES))


def step_rows_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(STEP_ROWS_AXES))


def rows_per_step_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ---- activation constraints ------------------------------------------------------------------
_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_constraints(mesh: Mesh):
  """While tracing a step under `mesh`, make `constrain` pin activations by RULES.

  Usable inside jit (it sets the abstract mesh only). Outside it `constrain` is the identity, so
  model code stays mesh-agnostic (generation, one device)."""
  previous = getattr(_ACTIVE, "on", False)
  _ACTIVE.on = True
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield
  finally:
    _ACTIVE.on = previous


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical axis names, inside `activation_constraints` only."""
  if not getattr(_ACTIVE, "on", False):
    return x
  return nn.with_logical_constraint(x, tuple(names), rules=RULES)
