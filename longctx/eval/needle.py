"""Needle in a haystack: a lengths × depths grid, scored offline, drawn as a heatmap (§6).

For each cell (length in tokens, depth in [0, 1]) and each needle, the prompt is BOS + haystack
+ needle sentence + question, `length` tokens long. The needle goes at `depth` of the haystack's
text, backed up to the end of the sentence before it. The haystack is a local text file
(`--haystack`, repeated when shorter than needed) or the built-in synthetic prose
(`longctx.data.synthetic.prose`). Needles are "The magic number of KEY is V." sentences (the form
`synthetic.multi_needle` trains on) or a JSONL file of {"needle", "question", "answer"}. A needle
is found when the greedy answer contains its key fact (`answer`, case-insensitive); a cell's score
is the fraction of needles found.

Every finished cell is appended to `OUT/cells.jsonl` at once, so an interrupted run started again
with the same `--out` redoes only the missing cells. `OUT/needle.json` holds the grid and
`OUT/heatmap.png` draws it.

    python -m longctx.eval needle --checkpoint=DIR --lengths=1024,2048 \\
        --num_needles=4 --out=needle_out
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Sequence

import numpy as np
from tqdm import tqdm

from longctx.data import synthetic
from longctx.data.tokenizers import Tokenizer
from longctx.eval import common

NEW_TOKENS = 16
CELLS_FILE = "cells.jsonl"
RUN_FILE = "run.json"
REPORT_FILE = "needle.json"
HEATMAP_FILE = "heatmap.png"
DEFAULT_DEPTHS = tuple(float(d) for d in np.linspace(0.0, 1.0, 17))
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s")


@dataclasses.dataclass(frozen=True)
class Needle:
  sentence: str  # inserted into the haystack
  question: str  # appended after the haystack; the model continues it
  answer: str    # the key fact the answer must contain


def default_needles(n: int, seed: int) -> list[Needle]:
  """`n` magic-number needles, drawn by `synthetic.multi_needle` (so its training data matches)."""
  if n < 1:
    raise ValueError(f"--num_needles must be ≥ 1, found {n}")
  pairs = synthetic.multi_needle(np.random.default_rng([seed, 7]), 1, n_needles=n).needles
  return [Needle(f"The magic number of {k} is {v}.", f"\nWhat is the magic number of {k}? It is",
                 str(v)) for k, v in pairs]


def load_needles(path: str) -> list[Needle]:
  """Needles from a JSONL file of {"needle", "question", "answer"} records."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--needles: expected a local JSONL file, found nothing at {path!r}")
  needles = []
  for i, record in enumerate(common.read_jsonl(path)):
    missing = [k for k in ("needle", "question", "answer") if not isinstance(record.get(k), str)]
    if missing:
      raise ValueError(f"{path}:{i + 1}: expected string fields needle, question, answer; "
                       f"missing {missing}")
    needles.append(Needle(record["needle"], record["question"], record["answer"]))
  if not needles:
    raise ValueError(f"{path}: no needles found")
  return needles


def haystack_tokens(tokenizer: Tokenizer, n_tokens: int, path: str | None = None,
                    seed: int = 0) -> np.ndarray:
  """At least `n_tokens` haystack token ids: the file's text (repeated) or synthetic prose."""
  if path is not None:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--haystack: expected a local text file, found nothing at {path!r}")
    with open(path, encoding="utf-8") as f:
      ids = tokenizer.encode(f.read())
    if ids.size == 0:
      raise ValueError(f"--haystack {path}: the file is empty")
    return np.tile(ids, -(-n_tokens // ids.size))
  n_chars = n_tokens
  while True:
    ids = tokenizer.encode(synthetic.prose(np.random.default_rng(seed), n_chars))
    if ids.size >= n_tokens:
      return ids
    n_chars *= 2


def insertion_point(text: str, depth: float) -> int:
  """The character index of the sentence start at or before `depth` of `text`."""
  pos = int(round(depth * len(text)))
  if pos >= len(text) and text.rstrip().endswith((".", "!", "?")):
    return len(text)
  cut = 0
  for m in _SENTENCE_END.finditer(text, 0, pos):
    cut = m.end()
  return cut


def build_prompt(tokenizer: Tokenizer, hay: np.ndarray, length: int, depth: float,
                 needle: Needle) -> list[int]:
  """BOS + haystack with the needle at `depth` + question: about `length` token ids."""
  overhead = (1 + len(tokenizer.encode(needle.sentence + " "))
              + len(tokenizer.encode(needle.question)))
  budget = length - overhead
  if budget < 1:
    raise ValueError(f"needle length {length} is shorter than the needle and question "
                     f"({overhead} tokens)")
  text = tokenizer.decode(hay[:budget])
  cut = insertion_point(text, depth)
  sep = "" if cut == 0 or text[cut - 1].isspace() else " "
  body = text[:cut] + sep + needle.sentence + " " + text[cut:].lstrip() + needle.question
  return [tokenizer.bos_id] + tokenizer.encode(body).tolist()


@dataclasses.dataclass(frozen=True)
class NeedleGrid:
  lengths: tuple[int, ...]
  depths: tuple[float, ...] = DEFAULT_DEPTHS

  def __post_init__(self):
    common.validate_lengths(self.lengths, "needle lengths")
    if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
      raise ValueError(f"needle depths must lie in [0, 1], found {self.depths}")

  def cells(self) -> list[tuple[int, float]]:
    return [(n, d) for n in self.lengths for d in self.depths]


def _cell_key(length: int, depth: float, needle_index: int) -> tuple[int, float, int]:
  return int(length), round(float(depth), 6), int(needle_index)


def run_needle(model, tokenizer: Tokenizer, grid: NeedleGrid, needles: Sequence[Needle],
               out_dir: str, haystack: str | None = None, seed: int = 0,
               budget: common.MemoryBudget | None = None, run_info: dict | None = None,
               progress: bool = True) -> dict:
  """Runs the missing cells of the grid (resuming from OUT/cells.jsonl), writes the report + PNG.

  model: `.config` and `.generate(prompts, max_new_tokens, temperature, eos_token_id)`.
  Returns {"lengths", "depths", "grid" [len(lengths)][len(depths)] fraction found, "cells"}.
  """
  common.check_vocab(model.config, tokenizer)
  budget = budget or common.MemoryBudget.from_gib(None)
  for n in grid.lengths:
    common.check_fits(model.config, len(needles), n, NEW_TOKENS, budget, f"needle length {n}",
                      getattr(model, "attention", None))
  os.makedirs(out_dir, exist_ok=True)
  run = {"needles": [dataclasses.asdict(x) for x in needles], "haystack": haystack, "seed": seed,
         "new_tokens": NEW_TOKENS, **(run_info or {})}
  common.check_run_file(os.path.join(out_dir, RUN_FILE), run)
  cells_path = os.path.join(out_dir, CELLS_FILE)
  done = {_cell_key(r["length"], r["depth"], r["needle_index"]): r
          for r in common.read_jsonl(cells_path)}
  todo = [c for c in grid.cells()
          if any(_cell_key(*c, i) not in done for i in range(len(needles)))]
  hay = haystack_tokens(tokenizer, max(grid.lengths), haystack, seed)
  cells = grid.cells()
  with tqdm(total=len(cells), initial=len(cells) - len(todo), desc="needle cells",
            disable=not progress) as bar:
    for length, depth in todo:
      for record in _run_cell(model, tokenizer, hay, length, depth, needles):
        common.append_jsonl(cells_path, record)
        done[_cell_key(length, depth, record["needle_index"])] = record
      bar.update(1)
  report = {**_report(grid, len(needles), done), **(run_info or {})}
  common.write_json(os.path.join(out_dir, REPORT_FILE), report)
  plot_heatmap(report, os.path.join(out_dir, HEATMAP_FILE))
  return report


def _run_cell(model, tokenizer, hay, length, depth, needles) -> list[dict]:
  prompts = [build_prompt(tokenizer, hay, length, depth, nd) for nd in needles]
  outputs = model.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0,
                           eos_token_id=tokenizer.eos_id)
  records = []
  for i, (nd, prompt, out) in enumerate(zip(needles, prompts, outputs)):
    text = tokenizer.decode([t for t in out if t != tokenizer.eos_id])
    records.append({"length": length, "depth": depth, "needle_index": i,
                    "prompt_tokens": len(prompt), "generated": text,
                    "correct": nd.answer.strip().lower() in text.lower()})
  return records


def _report(grid: NeedleGrid, n_needles: int, done: dict) -> dict:
  values = [[float(np.mean([done[_cell_key(n, d, i)]["correct"] for i in range(n_needles)]))
             for d in grid.depths] for n in grid.lengths]
  cells = [done[_cell_key(n, d, i)] for n, d in grid.cells() for i in range(n_needles)]
  return {"task": "needle", "lengths": list(grid.lengths), "depths": list(grid.depths),
          "needles": n_needles, "grid": values, "accuracy": float(np.mean(values)),
          "cells": cells}


def draw_grid(ax, report: dict, fmt: str = ".2f"):
  """Draws report["grid"] ([lengths][depths] fractions) on `ax`: depth rows (0% at the top),
  length columns, each cell's value written in it; returns the image (for a colorbar)."""
  values = np.array(report["grid"]).T  # [depths, lengths]
  im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
  ax.set_xticks(range(len(report["lengths"])), [str(n) for n in report["lengths"]], rotation=45)
  ax.set_yticks(range(len(report["depths"])), [f"{100 * d:.0f}%" for d in report["depths"]])
  ax.set_xlabel("context length (tokens)")
  for j in range(values.shape[1]):
    for i in range(values.shape[0]):
      ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=7)
  return im


def plot_heatmap(report: dict, path: str, title: str | None = None) -> None:
  """Depth (rows, 0% at the top) × length (columns) of the fraction of needles found."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  width = max(5.0, 2.5 + 0.5 * len(report["lengths"]))
  fig, ax = plt.subplots(figsize=(width, max(3.0, 1.5 + 0.28 * len(report["depths"]))))
  im = draw_grid(ax, report)
  ax.set_ylabel("needle depth")
  title = title or f"needle in a haystack ({report['needles']} needle(s))"
  ax.set_title(f"{title}: {100 * report['accuracy']:.1f}% found", fontsize=10)
  fig.colorbar(im, ax=ax, label="fraction found")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def format_report(report: dict) -> str:
  header = ["depth"] + [str(n) for n in report["lengths"]]
  rows = [[f"{100 * d:.0f}%"] + [f"{row[j]:.2f}" for row in report["grid"]]
          for j, d in enumerate(report["depths"])]
  return common.format_table(header, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--lengths", default="1024,2048,4096", help="comma-separated, in tokens")
  parser.add_argument("--depths", default=None,
                      help="comma-separated fractions in [0, 1] (default 17 from 0 to 1)")
  parser.add_argument("--num_depths", type=int, default=17,
                      help="depths evenly spaced in [0, 1] (without --depths)")
  parser.add_argument("--num_needles", type=int, default=1, help="built-in magic-number needles")
  parser.add_argument("--needles", default=None, help="JSONL of {needle, question, answer}")
  parser.add_argument("--haystack", default=None, help="a local text file (default: synthetic)")
  parser.add_argument("--out", default="needle_out", help="output directory (cache, JSON, PNG)")


def main(args: argparse.Namespace) -> dict:
  tokenizer = common.open_tokenizer(args.tokenizer, args.checkpoint)
  needles = load_needles(args.needles) if args.needles else default_needles(args.num_needles,
                                                                           args.seed)
  depths = (common.parse_floats(args.depths, "--depths") if args.depths
            else [float(d) for d in np.linspace(0, 1, args.num_depths)])
  grid = NeedleGrid(tuple(common.parse_ints(args.lengths, "--lengths")), tuple(depths))
  if args.haystack and not os.path.isfile(args.haystack):
    raise FileNotFoundError(f"--haystack: expected a local text file, found nothing at "
                            f"{args.haystack!r}")
  model = common.load_model(args.checkpoint, common.eval_attention(args),
                            args.rope)
  run = common.run_info(args, tokenizer, model)
  report = run_needle(model, tokenizer, grid, needles, args.out, args.haystack, args.seed,
                      common.MemoryBudget.from_gib(args.max_memory_gb), run)
  print(common.format_run(run))
  print(format_report(report))
  print(f"wrote {os.path.join(args.out, REPORT_FILE)} and {os.path.join(args.out, HEATMAP_FILE)}")
  return report
