"""The package's import graph: no import cycles between modules, and rooms import only the rooms
upstream of them (data flows config → data → batch → step → checkpoint → export; docs/DESIGN.md).
Imports inside functions count: they are still dependencies."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A room may import the rooms before it in this order, never one after it.
ROOMS = ("errors", "names", "schema", "cli", "parallel", "attention", "model", "data", "checkpoint",
         "eval", "train", "plan", "convert", "launch", "longctx")


def _modules() -> dict[str, str]:
  out = {}
  for directory, _, files in os.walk(os.path.join(ROOT, "longctx")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
  return out


def _graph() -> dict[str, set[str]]:
  """module -> the longctx modules it imports (`from pkg import submodule` counts the submodule
  only: the package's __init__ runs either way)."""
  modules = _modules()
  edges: dict[str, set[str]] = {m: set() for m in modules}
  for module, path in modules.items():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("longctx"):
        subs = [f"{node.module}.{a.name}" for a in node.names
                if f"{node.module}.{a.name}" in modules]
        targets = subs if len(subs) == len(node.names) else [node.module] + subs
      elif isinstance(node, ast.Import):
        targets = [a.name for a in node.names if a.name.startswith("longctx")]
      else:
        continue
      edges[module].update(t for t in targets if t in modules and t != module)
  return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def _room(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "longctx"


def test_no_import_cycles():
  cycles = _cycles(_graph())
  assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_rooms_import_only_upstream():
  back = sorted(f"{m} imports {t}" for m, targets in _graph().items() for t in targets
                if _room(m) != _room(t) and ROOMS.index(_room(t)) > ROOMS.index(_room(m)))
  assert not back, "\n".join(back)


def test_no_test_file_imports_another():
  """Shared test code lives in helper modules (tests/helpers.py and the topical ones), so a test
  file can run alone and its helpers are found in one place."""
  tests = os.path.join(ROOT, "tests")
  offenders = []
  for name in sorted(os.listdir(tests)):
    if name.endswith(".py"):
      for node in ast.walk(ast.parse(open(os.path.join(tests, name)).read())):
        modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                   else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        offenders += [f"{name} imports {m}" for m in modules if m.startswith("tests.test_")]
  assert not offenders, offenders
