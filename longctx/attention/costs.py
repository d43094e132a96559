"""Communication of the context-parallel strategies: read from compiled HLO, and in closed form.

Legend: B batch, L sequence, H query heads, K kv heads, D head dim, P devices of the axis
(U Ulysses and R ring devices for hybrid), b bytes per element of q / k / v.

What is counted, for every collective, is the bytes of its *result on one device* (the buffer
the device ends up with), once per execution (loop bodies × their known trip count):
  collective-permute  the chunk received (= the chunk sent)
  all-gather          the gathered array: P × the operand
  all-to-all          the array received (= the operand: same shape)
  reduce-scatter      the scattered shard: 1/P of the operand
  all-reduce          the reduced array (= the operand)
Bytes on the wire per device follow from that with the usual ring-algorithm factors: all-gather
(P−1)/P × result, reduce-scatter (P−1) × result, all-to-all (P−1)/P × result, all-reduce
2(P−1)/P × result, collective-permute 1 × result. Async `*-start` ops count their result part
(`*-done` nothing). `collective_bytes` reads a compiled module's text; `strategy_bytes` gives
the same numbers from the shapes, for the programs strategies.py runs under `jax.shard_map`
(the attention alone: not the layout permutation or an Explicit mesh's reshards around it).
"""
from __future__ import annotations

import functools
import math
import re

KINDS = ("collective-permute", "all-gather", "all-to-all", "reduce-scatter", "all-reduce")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_CALLEE = re.compile(r"(?:calls|to_apply|body|true_computation|false_computation)=%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP = re.compile(r"= (.*?) (" + "|".join(KINDS) + r")(-start)?\(")


def array_bytes(type_text: str) -> int:
  """Total bytes of the arrays in an HLO type (`f32[1,16,2,8]{...}` or a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    total += math.prod(int(x) for x in filter(None, dims.split(","))) * _DTYPE_BYTES.get(dtype, 0)
  return total


def _result_bytes(kind: str, is_start: bool, type_text: str) -> int:
  """Bytes of the result part of one collective's HLO type (see the module docstring)."""
  if not is_start or kind == "all-reduce":
    return array_bytes(type_text)
  arrays = _ARRAY.findall(type_text)
  if kind == "collective-permute":  # (operand, result, contexts...): the first
    return array_bytes("{}[{}]".format(*arrays[0]))
  if type_text.startswith("(("):  # ((operands...), (results...))
    return array_bytes(type_text[type_text.index(")") + 1:])
  return array_bytes("{}[{}]".format(*arrays[-1]))  # (operand, result)


def _computations(hlo_text: str):
  comps, entry, name = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      name = header.group(1)
      comps[name] = []
      entry = name if line.startswith("ENTRY") else entry
    elif name is not None and line.strip():
      comps[name].append(line)
  return comps, entry


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """{kind: bytes} for each of KINDS in a compiled HLO module (`.as_text()`), per device, as
  defined in the module docstring. Loop bodies count once per trip (`known_trip_count`), other
  called computations once per call."""
  comps, entry = _computations(hlo_text)

  @functools.lru_cache(maxsize=None)
  def total(comp: str) -> tuple[int, ...]:
    nbytes = [0] * len(KINDS)
    for line in comps.get(comp, ()):
      op = _OP.search(line)
      if op:
        nbytes[KINDS.index(op.group(2))] += _result_bytes(op.group(2), bool(op.group(3)),
                                                          op.group(1))
      trips = _TRIP.search(line)
      for callee in _CALLEE.findall(line):
        times = int(trips.group(1)) if (f"body=%{callee}" in line and trips) else 1
        nbytes = [n + times * c for n, c in zip(nbytes, total(callee))]
    return tuple(nbytes)

  return dict(zip(KINDS, total(entry)))


def _ring_bytes(b, s, kh, d, nbytes, r, grad, hops=None, regather=True):
  """Ring over r devices of chunks of s tokens: K, V and their segment ids and indices make
  `hops` = (forward, backward) hops each pass ((r − 1, 0) unless a window lets the ring stop
  early, `ring.ring_hops`); in the backward the float32 dK, dV accumulators travel with them
  and go home in one more permute each way. regather=False: the backward's first backward send
  (outside any loop, the forward's own) is merged with the forward's (see `strategy_bytes`)."""
  fwd, bwd = (r - 1, 0) if hops is None else hops
  hop = 2 * b * s * kh * d * nbytes + 2 * b * s * 4
  acc = 2 * b * s * kh * d * 4
  moves = (fwd + 1 if fwd else 0) + bwd
  sends = (fwd + bwd) * (2 if grad else 1) - (1 if grad and bwd and not regather else 0)
  return sends * hop + (moves * acc if grad else 0)


def _ulysses_bytes(b, c, h, kv_sent, d, nbytes, u, grad):
  """Ulysses over u devices, chunk c: all-to-alls of q, k, v (kv_sent heads leave each device)
  and of the output, each transposed once in the backward; metadata gathered once."""
  a2a = (2 * b * c * h * d + 2 * b * c * kv_sent * d) * nbytes
  return {"all-to-all": a2a * (2 if grad else 1), "all-gather": 2 * b * c * u * 4}


def strategy_bytes(strategy, batch: int, length: int, num_heads: int, kv_heads: int,
                   head_dim: int, dtype_bytes: int, size, *, grad: bool = False,
                   regather: bool = True, mask_spec=None, layout=None,
                   layout_devices: int | None = None) -> dict[str, int]:
  """{kind: bytes} per device of one attention call (forward, or forward + backward with
  grad=True), as `collective_bytes` counts them in its compiled shard_map program.

  size: P, or (U, R) for "hybrid". regather=True counts what the backward sends again outside
  a loop: all-gather's second gather of K/V (its custom_vjp does not keep the gathered K/V), a
  two-way ring's first backward send; in one program holding both passes of a single call XLA
  may merge such identical collectives (CSE), so pass False to match such a program. dK/dV are reduce-scattered in float32. mask_spec and layout (both given): a
  windowed ring stops after the hops some device needs (`ring.ring_hops`), as the ring does when
  it is told its layout (over `layout_devices`: default the ring's devices, as on natural-order
  rows; the trainer's permuted rows are laid out over all S sequence devices, hybrid too); the
  other strategies move the same bytes with or without a window.
  Raises ValueError on an unknown strategy (see `strategies.Strategy`).
  """
  from longctx.attention.ring import ring_hops
  from longctx.attention.strategies import Strategy
  from longctx.attention.ulysses import kv_head_plan

  strategy = Strategy.parse(strategy)
  b, l, h, kh, d, nb = batch, length, num_heads, kv_heads, head_dim, dtype_bytes
  out = dict.fromkeys(KINDS, 0)
  hops = lambda r: (None if mask_spec is None or layout is None
                    else ring_hops(layout, layout_devices or r, l, r, mask_spec))
  if strategy is Strategy.RING:
    out["collective-permute"] = _ring_bytes(b, l // size, kh, d, nb, size, grad, hops(size), regather)
  elif strategy is Strategy.ALL_GATHER:
    gather = 2 * b * l * kh * d * nb + 2 * b * l * 4
    out["all-gather"] = gather * (2 if grad and regather else 1)
    out["reduce-scatter"] = 2 * b * (l // size) * kh * d * 4 if grad else 0
  elif strategy is Strategy.ULYSSES:
    sent = kv_head_plan(h, kh, size).size
    out.update(_ulysses_bytes(b, l // size, h, sent, d, nb, size, grad))
  else:
    u, r = size
    heads = kv_head_plan(h, kh, u)  # [U, m]: what each device receives
    sent, m = heads.size, heads.shape[1]
    out.update(_ulysses_bytes(b, l // (u * r), h, sent, d, nb, u, grad))
    out["collective-permute"] = _ring_bytes(b, l // r, m, d, nb, r, grad, hops(r), regather)
  return out


def collective_permute_bytes(hlo_text: str) -> int:
  """Bytes one device sends by collective-permute in a compiled HLO module (`.as_text()`).

  Loop bodies count once per trip (`known_trip_count`), called computations once per call.
  For async `collective-permute-start` only the first element of its tuple (the operand) counts.
  Every collective: `costs.collective_bytes`.
  """
  return collective_bytes(hlo_text)["collective-permute"]
