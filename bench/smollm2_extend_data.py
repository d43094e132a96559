"""The training data of configs/smollm2_135m_extend.py: long real text from this Python's stdlib.

Three JSONL files, deterministic for a given Python, nothing downloaded:
  cpt.jsonl  {"text"}: the stdlib's modules (not `pydoc_data`, not tests), each cut at line
             boundaries into pieces of about --chars characters (~3.6 characters per SmolLM2
             token on this code: 56k characters ≈ 14k–17k tokens, so a 16k row holds about one
             piece; longer ones are truncated and counted by the pipeline). Continued
             pre-training text (XVERSE stage 1).
  docs.jsonl {"text"}: the stdlib's documentation as English prose, rendered from its docstrings
             the way `pydoc` lays a module out (NAME, DESCRIPTION, then every public class,
             function and method in source order with its signature and docstring), cut into
             pieces like cpt.jsonl (4.2–4.8 characters per token: 72k characters ≈ 15k–17k
             tokens). Continued pre-training text of the held-out text's kind (reference prose),
             without any of it.
  sft.jsonl  {"messages"}: LongAlign-style long instructions made from the same modules. The
             user turn holds a window of a module's source (2k to ~15k tokens) and asks for the
             docstring of one function defined inside it; the assistant answers with that
             docstring, verbatim but for the indentation. Answering needs the window: retrieval
             from a long context.

The held-out text of the evaluation is `pydoc_data.topics` (bench/smollm2_baselines.py), which
neither file contains.

    python bench/smollm2_extend_data.py --out /tmp/smollm2-extend
"""
import argparse
import ast
import glob
import json
import os
import random
import sysconfig


def modules(min_chars: int) -> list[str]:
  """Stdlib module paths of at least min_chars characters, sorted (tests and pydoc_data out)."""
  lib = sysconfig.get_paths()["stdlib"]
  found = []
  for path in sorted(glob.glob(os.path.join(lib, "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, lib)
    if rel.startswith(("test", "site-packages", "pydoc_data", "lib2to3/tests", "idlelib/idle_test")):
      continue
    if "/test" in rel or os.path.getsize(path) < min_chars:
      continue
    found.append(path)
  return found


def module_name(path: str, lib: str) -> str:
  """The dotted name of a stdlib file: .../json/decoder.py → json.decoder."""
  return os.path.relpath(path, lib)[:-3].replace("/", ".").removesuffix(".__init__")


def pieces(text: str, chars: int) -> list[str]:
  """text cut at line boundaries into pieces of about `chars` characters (the last may be short)."""
  out, cur, size = [], [], 0
  for line in text.splitlines(keepends=True):
    cur.append(line)
    size += len(line)
    if size >= chars:
      out.append("".join(cur))
      cur, size = [], 0
  if size > chars // 4:
    out.append("".join(cur))
  return out


def _signature(node) -> str:
  """`def name(args)` or `class Name(bases)` as written in the source."""
  if isinstance(node, ast.ClassDef):
    bases = ", ".join(ast.unparse(b) for b in node.bases)
    return f"class {node.name}({bases})" if bases else f"class {node.name}"
  return f"def {node.name}({ast.unparse(node.args)})"


def _doc_lines(body, indent: str) -> list[str]:
  """The public classes and functions of an ast body, each with its docstring, recursively."""
  out = []
  for node in body:
    if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    if node.name.startswith("_") and node.name != "__init__":
      continue
    doc = ast.get_docstring(node)
    if doc is None and not isinstance(node, ast.ClassDef):
      continue
    out.append(indent + _signature(node))
    out += [(indent + "    " + line).rstrip() for line in (doc or "").split("\n")]
    if isinstance(node, ast.ClassDef):
      out += [""] * bool(doc) + _doc_lines(node.body, indent + "    ")
    out.append("")
  return out


def module_doc(source: str, name: str) -> str:
  """A module's documentation as plain text in pydoc's layout; '' without any docstring."""
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return ""
  doc, entries = ast.get_docstring(tree) or "", _doc_lines(tree.body, "    ")
  if not doc and not entries:
    return ""
  head = doc.split("\n")[0]
  lines = ["NAME", f"    {name}" + (f" - {head}" if head else ""), ""]
  if doc:
    lines += ["DESCRIPTION"] + [("    " + line).rstrip() for line in doc.split("\n")] + [""]
  if entries:
    lines += ["CONTENTS"] + entries
  return "\n".join(lines) + "\n"


def docstring_questions(source: str, name: str, rng: random.Random, max_chars: int, count: int):
  """Up to `count` SFT conversations: a source window containing one function, and its docstring."""
  lines = source.splitlines(keepends=True)
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return []
  funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
           and ast.get_docstring(n) and len(ast.get_docstring(n)) >= 80]
  out = []
  for fn in rng.sample(funcs, min(count, len(funcs))):
    want = rng.randint(max_chars // 8, max_chars)  # a LongAlign-like spread of lengths
    start, end = fn.lineno - 1, fn.end_lineno
    while sum(len(x) for x in lines[start:end]) < want and (start > 0 or end < len(lines)):
      start, end = max(0, start - rng.randint(1, 40)), min(len(lines), end + rng.randint(1, 40))
    window, answer = "".join(lines[start:end]), ast.get_docstring(fn)
    if not all(line.strip() in window for line in answer.split("\n")):
      continue  # escapes in the literal: the answer would not be in the text as written
    user = (f"Below is part of the Python module `{name}`.\n\n{window}\n\n"
            f"Quote the docstring of the function `{fn.name}` (defined at line {fn.lineno} "
            f"of the module) exactly, without its indentation.")
    out.append({"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": answer}]})
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="directory for cpt.jsonl, docs.jsonl and sft.jsonl")
  p.add_argument("--chars", type=int, default=56_000, help="characters per CPT piece")
  p.add_argument("--doc_chars", type=int, default=72_000, help="characters per docs piece")
  p.add_argument("--sft_chars", type=int, default=48_000, help="longest SFT source window")
  p.add_argument("--per_module", type=int, default=2, help="SFT questions per module")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  rng = random.Random(a.seed)
  lib = sysconfig.get_paths()["stdlib"]
  counts = {"cpt": 0, "sft": 0, "cpt_chars": 0, "docs": 0, "docs_chars": 0}
  docs_text = []
  with open(os.path.join(a.out, "cpt.jsonl"), "w") as cpt, \
       open(os.path.join(a.out, "sft.jsonl"), "w") as sft:
    for path in modules(min_chars=a.chars // 2):
      with open(path, encoding="utf-8") as f:
        source = f.read()
      for piece in pieces(source, a.chars):
        cpt.write(json.dumps({"text": piece}) + "\n")
        counts["cpt"] += 1
        counts["cpt_chars"] += len(piece)
      name = module_name(path, lib)
      for conv in docstring_questions(source, name, rng, a.sft_chars, a.per_module):
        sft.write(json.dumps(conv) + "\n")
        counts["sft"] += 1
  for path in modules(min_chars=0):
    with open(path, encoding="utf-8") as f:
      docs_text.append(module_doc(f.read(), module_name(path, lib)))
  with open(os.path.join(a.out, "docs.jsonl"), "w") as docs:
    for piece in pieces("\n".join(t for t in docs_text if t), a.doc_chars):
      docs.write(json.dumps({"text": piece}) + "\n")
      counts["docs"] += 1
      counts["docs_chars"] += len(piece)
  mchars = {k: counts[f"{k}_chars"] / 1e6 for k in ("cpt", "docs")}
  print(f"{a.out}/cpt.jsonl: {counts['cpt']} pieces, {mchars['cpt']:.1f}M characters; "
        f"{a.out}/docs.jsonl: {counts['docs']} pieces, {mchars['docs']:.1f}M characters; "
        f"{a.out}/sft.jsonl: {counts['sft']} conversations")


if __name__ == "__main__":
  main()
