"""The training data of configs/smollm2_135m_extend.py: long real text from this Python's stdlib.

Two JSONL files, deterministic for a given Python, nothing downloaded:
  cpt.jsonl  {"text"}: the stdlib's modules (not `pydoc_data`, not tests), each cut at line
             boundaries into pieces of about --chars characters (~3.6 characters per SmolLM2
             token on this code: 56k characters ≈ 14k–17k tokens, so a 16k row holds about one
             piece; longer ones are truncated and counted by the pipeline). Continued
             pre-training text (XVERSE stage 1).
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
  p.add_argument("--out", required=True, help="directory for cpt.jsonl and sft.jsonl")
  p.add_argument("--chars", type=int, default=56_000, help="characters per CPT piece")
  p.add_argument("--sft_chars", type=int, default=48_000, help="longest SFT source window")
  p.add_argument("--per_module", type=int, default=2, help="SFT questions per module")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  rng = random.Random(a.seed)
  lib = sysconfig.get_paths()["stdlib"]
  counts = {"cpt": 0, "sft": 0, "cpt_chars": 0}
  with open(os.path.join(a.out, "cpt.jsonl"), "w") as cpt, \
       open(os.path.join(a.out, "sft.jsonl"), "w") as sft:
    for path in modules(min_chars=a.chars // 2):
      with open(path, encoding="utf-8") as f:
        source = f.read()
      for piece in pieces(source, a.chars):
        cpt.write(json.dumps({"text": piece}) + "\n")
        counts["cpt"] += 1
        counts["cpt_chars"] += len(piece)
      name = os.path.relpath(path, lib)[:-3].replace("/", ".").removesuffix(".__init__")
      for conv in docstring_questions(source, name, rng, a.sft_chars, a.per_module):
        sft.write(json.dumps(conv) + "\n")
        counts["sft"] += 1
  print(f"{a.out}/cpt.jsonl: {counts['cpt']} pieces, {counts['cpt_chars'] / 1e6:.1f}M characters; "
        f"{a.out}/sft.jsonl: {counts['sft']} conversations")


if __name__ == "__main__":
  main()
