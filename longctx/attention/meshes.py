"""Running the context-parallel wrappers on Auto and on Explicit meshes (JAX ≥ 0.9 sharding
in types; DESIGN.md contract 3, "Explicit meshes").

`jax.make_mesh` makes Explicit axes by default. On an Explicit mesh every array's type carries
its sharding, so `jax.shard_map` refuses inputs whose sharding is not its in_specs, and the
layout's permutation (a gather along the sequence) refuses a sequence-sharded operand unless it
is told the output sharding. The wrappers therefore run their whole body (permute, shard_map,
unpermute) on the mesh's Auto twin, where XLA picks the collectives as it always did:
- inputs whose type carries no mesh (unsharded arrays, no `jax.set_mesh`): the body runs as is
  and the output is as unsharded as the inputs;
- inputs typed on the Explicit mesh (sharded ones), or any input under `jax.set_mesh`: the body
  runs under `jax.sharding.auto_axes`, which reshards them to Auto on entry, and the output is
  resharded to q's sharding on exit (gradients follow through `reshard`'s transpose).
"""
from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def explicit_axes(mesh) -> tuple[str, ...]:
  """The names of the mesh's Explicit axes."""
  return tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
               if kind == AxisType.Explicit)


def auto_twin(mesh: Mesh) -> Mesh:
  """The same devices and axis names with every axis Auto."""
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def run_on_auto_mesh(body, mesh: Mesh, q, *args):
  """body(auto_mesh, q, *args) with `mesh`'s axes Auto; see the module docstring.

  body returns one array shaped like q; on an Explicit mesh, when q's type carries a mesh (or
  a context mesh is set, `jax.set_mesh`), it comes back with q's sharding.
  """
  explicit = explicit_axes(mesh)
  if not explicit:
    return body(mesh, q, *args)
  twin = auto_twin(mesh)
  sharding = jax.typeof(q).sharding
  typed = getattr(sharding, "mesh", None) is not None and not sharding.mesh.empty
  if not typed and jax.sharding.get_abstract_mesh().empty:
    return body(twin, q, *args)
  out = NamedSharding(mesh, sharding.spec if typed else PartitionSpec())
  return jax.sharding.auto_axes(lambda *xs: body(twin, *xs), axes=explicit,
                                out_sharding=out)(q, *args)


def split_axis(mesh: Mesh, axis: str, inner: int, names: tuple[str, str]) -> Mesh:
  """`mesh` with `axis` (size S) split into names = (outer, inner) of sizes (S / inner, inner),
  outer major: device i of `axis` becomes (i // inner, i % inner), so an array sharded over
  `axis` is the same array sharded over (outer, inner). The hybrid strategy runs on it over
  the trainer's one sequence axis. Raises ValueError when `inner` does not divide S."""
  size = mesh.shape[axis]
  if inner < 1 or size % inner:
    raise ValueError(f"cannot split mesh axis {axis!r} of size {size} into {size // max(inner, 1)}"
                     f" × {inner}: {inner} must divide {size}")
  i = mesh.axis_names.index(axis)
  shape = mesh.devices.shape[:i] + (size // inner, inner) + mesh.devices.shape[i + 1:]
  axis_names = mesh.axis_names[:i] + tuple(names) + mesh.axis_names[i + 1:]
  types = mesh.axis_types[:i] + (mesh.axis_types[i],) * 2 + mesh.axis_types[i + 1:]
  return Mesh(mesh.devices.reshape(shape), axis_names, axis_types=types)
