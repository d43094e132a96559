"""Token chunks for token-wise work (the MLP, the loss), so its working set does not grow with
the tokens a device holds.

A row's L tokens are split over P devices (the mesh's `seq` axis, `token_shards`), each holding a
contiguous block of L/P tokens of the batch's layout order. `to_chunks` views [B, L, ...] as
[N, B, P, C, ...] with C tokens per chunk and N = L / (P·C): chunk n holds tokens [n·C, (n+1)·C)
of every device's block. A scan over N then keeps each device on C of its own tokens per
iteration, with no communication and the same work on every device. The view is a reshape: on
one device (P = 1) it is plain contiguous chunking. Work that is per token (an MLP, a per-token
loss) gives the same values chunked or not.

Legend: N chunks, B rows, P token shards, C tokens per chunk and shard, L = N·P·C.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from longctx.errors import ConfigError
from longctx.parallel.mesh import constrain

# Logical axes of one chunk [B, P, C, ...]: rows and token shards stay where the batch is.
CHUNK_AXES = ("batch", "length", None)


def num_chunks(length: int, token_shards: int, chunk: int) -> int:
  """N for rows of `length` tokens; 0 when chunking is off (chunk 0) or does not apply (a
  length the chunks do not tile, such as a decoding step)."""
  if chunk <= 0 or length % token_shards or (length // token_shards) % chunk:
    return 0
  return length // (token_shards * chunk)


def check_chunk(length: int, token_shards: int, chunk: int, where: str) -> None:
  """ValueError naming `where` when `chunk` tokens do not tile each device's L/P tokens."""
  if chunk < 0:
    raise ConfigError(f"config {where}: expected tokens per chunk >= 0 (0 = no chunking), "
                      f"found {chunk}")
  if chunk and not num_chunks(length, token_shards, chunk):
    per_device = length / token_shards
    raise ConfigError(f"config {where}={chunk}: expected a divisor of the tokens each device "
                      f"holds per row, {length} / seq {token_shards} = {per_device:g}")


def to_chunks(x_BL: jax.Array, token_shards: int, chunk: int) -> jax.Array:
  """[B, L, ...] -> [N, B, P, C, ...] (see the module docstring)."""
  b, length, rest = x_BL.shape[0], x_BL.shape[1], x_BL.shape[2:]
  n = length // (token_shards * chunk)
  x_BPNC = x_BL.reshape(b, token_shards, n, chunk, *rest)
  return jnp.moveaxis(x_BPNC, 2, 0)


def from_chunks(x_NBPC: jax.Array) -> jax.Array:
  """[N, B, P, C, ...] -> [B, L, ...], the inverse of `to_chunks`."""
  n, b, p, c, rest = *x_NBPC.shape[:4], x_NBPC.shape[4:]
  return jnp.moveaxis(x_NBPC, 0, 2).reshape(b, p * n * c, *rest)


def constrain_chunk(x_BPC: jax.Array) -> jax.Array:
  """Pin a chunk [B, P, C, ...] to the batch's devices (the rules table's `batch`, `length`);
  a no-op outside parallel.mesh.activation_constraints."""
  return constrain(x_BPC, CHUNK_AXES + (None,) * (x_BPC.ndim - 3))


def apply_chunked(module: nn.Module, x_BLE: jax.Array, token_shards: int, chunk: int):
  """module(x) for a token-wise flax `module`, computed over token chunks.

  The chunks run in a scan that shares the module's parameters (same parameter tree as an
  unchunked call), each chunk under remat, so the backward keeps only the chunk inputs and
  recomputes one chunk's temporaries at a time. Falls back to module(x) when the chunks do not
  tile the length (num_chunks = 0) or there is a single chunk.
  """
  n = num_chunks(x_BLE.shape[1], token_shards, chunk)
  if n <= 1:
    return module(x_BLE)

  def body(mdl, carry, x_BPCE):
    return carry, constrain_chunk(mdl(constrain_chunk(x_BPCE)))

  scan = nn.scan(nn.remat(body, prevent_cse=False), variable_broadcast="params",
                 split_rngs={"params": False}, in_axes=0, out_axes=0, length=n)
  _, y_NBPCE = scan(module, None, to_chunks(x_BLE, token_shards, chunk))
  return from_chunks(y_NBPCE)
