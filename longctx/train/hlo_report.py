"""The largest temporary buffers of a compiled program, named by the JAX op that produced them.

Reads what XLA writes with `compile({"xla_dump_to": dir})`: the buffer assignment
(`*after_optimizations-buffer-assignment.txt`: allocations and the HLO values living in them)
and the optimized HLO (`*after_optimizations.txt`, whose instructions carry the JAX op_name in
their metadata). Parameters, constants and outputs are not temporaries and are skipped.
"""
from __future__ import annotations

import os
import re

_ALLOCATION = re.compile(r"^allocation \d+: size (\d+)(.*)$")
_VALUE = re.compile(r"^ value: <\d+ ([^ >]+)[^>]*> \(size=(\d+),offset=(\d+)\): (\S+)")
_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"')
_NOT_TEMP = ("parameter", "constant", "output", "live-out")
# Values that only alias another buffer (a loop body's parameter, tuple plumbing): not counted.
_ALIASES = ("param", "tuple", "get-tuple-element", "bitcast", "while", "conditional")


def _files(directory: str, module: re.Pattern | None) -> tuple[str, str]:
  names = sorted(os.listdir(directory))
  if module is not None:
    names = [n for n in names if module.search(n)]
  assignment = [n for n in names if n.endswith("after_optimizations-buffer-assignment.txt")]
  hlo = [n for n in names if n.endswith("after_optimizations.txt")]
  if not assignment or not hlo:
    raise FileNotFoundError(f"{directory}: expected an XLA dump with a buffer assignment and "
                            f"the optimized HLO, found {names[:8]}")
  return os.path.join(directory, assignment[-1]), os.path.join(directory, hlo[-1])


def _op_names(hlo_path: str) -> dict[str, str]:
  out = {}
  with open(hlo_path) as f:
    for line in f:
      m = _OP_NAME.match(line)
      if m:
        out[m.group(1)] = m.group(2)
  return out


def short_op_name(op_name: str) -> str:
  """The meaningful tail of a JAX op_name: no jit(...) prefix, transforms kept as markers."""
  parts = [p for p in op_name.split("/") if p and not p.startswith("jit(")]
  return "/".join(parts[-4:])


def _value_name(hlo_name: str, op_names: dict[str, str]) -> str:
  base = hlo_name.split("{")[0]  # a tuple element: name{index}
  if base in op_names:
    return short_op_name(op_names[base])
  return re.sub(r"\.\d+$", "", base)  # no metadata (a copy, a parameter): its HLO opcode


def read_buffer_report(directory: str, top: int = 6,
                       module: re.Pattern | None = None) -> list[dict]:
  """[{"bytes", "shape", "name", "values"}] of the `top` largest regions of temporary memory,
  largest first. A region is a stretch of a temporary allocation (an offset) that several values
  share over time (a loop's state and its in-place updates, say): its bytes are held at once,
  `values` counts its tenants, and it is named by its largest value's producing op. (XLA:CPU
  puts every temporary in one allocation, so allocations alone would say nothing.)"""
  assignment, hlo = _files(directory, module)
  names = _op_names(hlo)
  regions: dict[tuple[int, int], dict] = {}
  allocation, temp = -1, False
  with open(assignment) as f:
    for line in f:
      m = _ALLOCATION.match(line)
      if m:
        allocation += 1
        temp = not any(k in m.group(2) for k in _NOT_TEMP)
        continue
      m = _VALUE.match(line)
      if not (m and temp):
        continue
      size, offset = int(m.group(2)), int(m.group(3))
      region = regions.setdefault((allocation, offset), {"bytes": 0, "values": 0, "named": -1})
      region["bytes"] = max(region["bytes"], size)
      region["values"] += 1
      base = re.sub(r"\.\d+$", "", m.group(1).split("{")[0])
      if size > region["named"] and base not in _ALIASES:
        region.update(named=size, shape=m.group(4).split("{")[0],
                      name=_value_name(m.group(1), names))
  ranked = sorted((r for r in regions.values() if r["named"] >= 0), key=lambda r: -r["bytes"])
  return [{"bytes": r["bytes"], "shape": r["shape"], "name": r["name"], "values": r["values"]}
          for r in ranked[:top]]
