"""Passkey retrieval, LongLoRA's protocol (METHODS.md §6).

A task line, filler, "The pass key is K. Remember it. K is the pass key." at a random depth, more
filler, then "What is the pass key? The pass key is"; K uniform in 1..50000 (the prompt comes from
`longctx.data.synthetic.passkey`). Greedy decoding; a trial is correct when the first integer in
the generated text equals K exactly. Lengths are in tokens of the evaluated tokenizer.

    python -m longctx.eval passkey --checkpoint=DIR --lengths=1024,2048 \\
        --trials=10 --out=passkey.json

With `--depths` (fractions of the filler before the passkey line, e.g. 0,0.25,0.5,0.75,1) every
length is tried `trials` times at each depth instead of at random depths, the report gains a
lengths × depths `grid`, and `--heatmap` draws it (the needle heatmap's picture).

Every finished trial is appended to `OUT.trials.jsonl` at once (`OUT` is `--out` without its
extension; `OUT.run.json` says which model, tokenizer, RoPE and attention made them), so an
interrupted run started again with the same `--out` redoes only the missing trials, and a rerun
with more trials or lengths reuses the ones it has.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from longctx.data import synthetic
from longctx.data.tokenizers import Tokenizer
from longctx.eval import common

NEW_TOKENS = 12  # " 50000." is 7 bytes; subword tokenizers need fewer
_INT = re.compile(r"\d+")


def first_integer(text: str) -> int | None:
  """The first run of digits in `text` as an int, or None."""
  m = _INT.search(text)
  return int(m.group()) if m else None


def fit_to_tokens(build: Callable[[int], str], tokenizer: Tokenizer, target: int,
                  rounds: int = 4) -> int:
  """The n_chars for which `build(n_chars)` has the most tokens (with BOS) not over `target`.

  Rescales n_chars by the measured characters per token a few times (exact for the byte
  tokenizer after one round, up to the filler's granularity), then shrinks it until the
  prompt fits: a prompt never passes its nominal length (nor the model's context at it), except
  when the task and question lines alone are longer (the report's prompt-tokens column shows it).
  """
  def count(n: int) -> int:
    return len(tokenizer.encode(build(n))) + 1

  n_chars, best = target, None
  for _ in range(rounds):
    n_tokens = count(n_chars)
    if n_tokens <= target and (best is None or n_tokens > best[1]):
      best = (n_chars, n_tokens)
    if n_tokens == target:
      return n_chars
    n_chars = max(1, int(round(n_chars * target / n_tokens)))
  for _ in range(200):  # from the last estimate, shrink by 1% until it fits
    n_tokens = count(n_chars)
    if n_tokens <= target or n_chars == 1:
      if n_tokens <= target and (best is None or n_tokens > best[1]):
        best = (n_chars, n_tokens)
      break
    n_chars = max(1, min(int(n_chars * 0.99), n_chars - 1))
  return best[0] if best else 1


def passkey_examples(tokenizer: Tokenizer, length: int, trials: int, seed: int,
                     depth: float | None = None) -> list[synthetic.PasskeyExample]:
  """`trials` passkey documents of about `length` tokens, the passkey line at `depth` (random
  when None); a pure function of (seed, length, depth)."""
  examples = []
  for trial in range(trials):
    key = [seed, length, trial] + ([] if depth is None else [int(round(depth * 1e6))])

    def build(n_chars, key=key):
      return synthetic.passkey(np.random.default_rng(key), n_chars, depth).prompt
    n_chars = fit_to_tokens(build, tokenizer, length)
    examples.append(synthetic.passkey(np.random.default_rng(key), n_chars, depth))
  return examples


def run_passkey(model, tokenizer: Tokenizer, lengths: Sequence[int], trials: int = 10,
                seed: int = 0, batch_size: int = 8,
                budget: common.MemoryBudget | None = None,
                depths: Sequence[float] | None = None, progress: bool = False,
                cache: str | None = None, run_info: dict | None = None) -> dict:
  """Passkey accuracy per length.

  model: anything with `.config` (ModelConfig) and `.generate(prompts, max_new_tokens=…,
  temperature=0, eos_token_id=…) -> list[list[int]]`: a `PretrainedModel`, e.g. during training
  `PretrainedModel(model_config, state_params)` from longctx.eval.pretrained.
  Returns {"accuracy": {length: fraction}, "lengths", "trials", "seed", "results": [per trial]};
  with `depths`, `trials` per (length, depth) and also "depths" and "grid" [lengths][depths].
  `cache`: a path prefix; trials are read from and appended to `cache.trials.jsonl`, and
  `cache.run.json` must match `run_info` (with the seed), so cached trials never mix runs.
  Raises ContextTooLongError before any work when a length does not fit the budget.
  """
  lengths = common.validate_lengths(lengths, "passkey lengths")
  if trials < 1 or batch_size < 1:
    raise ValueError(f"trials and batch_size must be ≥ 1, found {trials}, {batch_size}")
  if depths is not None and (not depths or any(not 0 <= d <= 1 for d in depths)):
    raise ValueError(f"passkey depths must lie in [0, 1], found {list(depths)}")
  common.check_vocab(model.config, tokenizer)
  budget = budget or common.MemoryBudget.from_gib(None)
  for n in lengths:
    common.check_fits(model.config, min(batch_size, trials), n, NEW_TOKENS, budget,
                      f"passkey length {n}", getattr(model, "attention", None))
  done, record = _trial_cache(cache, {"seed": seed, "new_tokens": NEW_TOKENS, **(run_info or {})})
  cells = [(n, d) for n in lengths for d in (depths if depths is not None else [None])]
  results, by_cell = [], {}
  cached = sum(_trial_key(n, d, t) in done for n, d in cells for t in range(trials))
  with tqdm(total=len(cells) * trials, initial=cached, desc="passkey", unit="trial",
            disable=not progress) as bar:
    for n, d in cells:
      rows = _run_length(model, tokenizer, n, trials, seed, batch_size, d, done,
                         _counted(record, bar))
      results += rows
      by_cell[n, d] = float(np.mean([r["correct"] for r in rows]))
  accuracy = {n: float(np.mean([r["correct"] for r in results if r["length"] == n]))
              for n in lengths}
  report = {"task": "passkey", "lengths": lengths, "trials": trials, "seed": seed,
            "max_position_embeddings": model.config.max_position_embeddings,
            "accuracy": accuracy, "results": results}
  if depths is not None:
    report.update(depths=[float(d) for d in depths],
                  grid=[[by_cell[n, d] for d in depths] for n in lengths])
  return report


def plot_heatmap(report: dict, path: str, title: str = "passkey retrieval") -> None:
  """Depth × length of the fraction of trials answered correctly (a report with `depths`)."""
  from longctx.eval.needle import plot_heatmap as draw
  draw({**report, "accuracy": float(np.mean(report["grid"])), "needles": report["trials"]},
       path, title=f"{title}, {report['trials']} trials per cell")


def _trial_key(length: int, depth: float | None, trial: int) -> tuple:
  return int(length), None if depth is None else round(float(depth), 6), int(trial)


def _trial_cache(cache: str | None, run: dict):
  """(finished trials by key, a function that records one) for the `cache` prefix (None: in
  memory only)."""
  if cache is None:
    return {}, lambda row: None
  common.check_run_file(cache + ".run.json", run)
  path = cache + ".trials.jsonl"
  done = {_trial_key(r["length"], r["cell_depth"], r["trial"]): r for r in common.read_jsonl(path)}
  return done, lambda row: common.append_jsonl(path, row)


def _counted(record, bar):
  """`record`, also advancing `bar` by one trial and showing the prompt tokens per second."""
  start, tokens = time.perf_counter(), [0]

  def counted(row):
    record(row)
    tokens[0] += row["prompt_tokens"]
    bar.set_postfix(tok_s=f"{tokens[0] / max(time.perf_counter() - start, 1e-9):.0f}")
    bar.update(1)
  return counted


def _run_length(model, tokenizer, length, trials, seed, batch_size, depth, done,
                record) -> list[dict]:
  """The `trials` rows of one (length, depth) cell: those in `done`, the others run in batches
  and `record`ed as each batch finishes."""
  examples = passkey_examples(tokenizer, length, trials, seed, depth)
  todo = [t for t in range(trials) if _trial_key(length, depth, t) not in done]
  for i in range(0, len(todo), batch_size):
    batch = todo[i:i + batch_size]
    prompts = [[tokenizer.bos_id] + tokenizer.encode(examples[t].prompt).tolist() for t in batch]
    outputs = model.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0,
                             eos_token_id=tokenizer.eos_id)
    for trial, prompt, out in zip(batch, prompts, outputs):
      ex = examples[trial]
      text = tokenizer.decode([t for t in out if t != tokenizer.eos_id])
      row = {"length": length, "trial": trial, "cell_depth": depth, "prompt_tokens": len(prompt),
             "depth": ex.depth, "passkey": ex.passkey, "generated": text,
             "correct": first_integer(text) == ex.passkey}
      record(row)
      done[_trial_key(length, depth, trial)] = row
  return [done[_trial_key(length, depth, t)] for t in range(trials)]


def format_report(report: dict) -> str:
  per_length = report["trials"] * len(report.get("depths", [None]))
  rows = []
  for n, acc in report["accuracy"].items():
    sizes = [r["prompt_tokens"] for r in report["results"] if r["length"] == n]
    rows.append((n, f"{min(sizes)}–{max(sizes)}" if sizes else "", per_length, f"{acc:.2f}" + (
        "  (beyond max_position_embeddings)" if n > report["max_position_embeddings"] else "")))
  table = common.format_table(["length", "prompt tokens", "trials", "accuracy"], rows)
  if "grid" in report:
    from longctx.eval.needle import format_report as grid_table
    table += "\n\n" + grid_table(report)
  return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--lengths", default="1024,2048,4096",
                      help="comma-separated prompt lengths in tokens")
  parser.add_argument("--trials", type=int, default=10,
                      help="prompts per length (per length and depth with --depths)")
  parser.add_argument("--batch_size", type=int, default=8,
                      help="prompts generated together")
  parser.add_argument("--out", default="passkey.json", help="JSON report path")
  parser.add_argument("--depths", default=None,
                      help="comma-separated fractions in [0, 1]: `trials` per length and depth "
                           "(default: one random depth per trial)")
  parser.add_argument("--heatmap", default=None, help="with --depths: write this PNG")


def main(args: argparse.Namespace) -> dict:
  tokenizer = common.open_tokenizer(args.tokenizer, args.checkpoint)
  depths = common.parse_floats(args.depths, "--depths") if args.depths else None
  if args.heatmap and depths is None:
    raise ValueError("--heatmap: expected --depths too (the heatmap is lengths × depths)")
  model = common.load_model(args.checkpoint, common.eval_attention(args),
                            args.rope)
  run = common.run_info(args, tokenizer, model)
  report = run_passkey(model, tokenizer, common.parse_ints(args.lengths, "--lengths"),
                       args.trials, args.seed, args.batch_size,
                       common.MemoryBudget.from_gib(args.max_memory_gb), depths, progress=True,
                       cache=os.path.splitext(args.out)[0], run_info=run)
  report.update(run)
  common.write_json(args.out, report)
  print(common.format_run(run))
  print(format_report(report))
  print(f"wrote {args.out}")
  if args.heatmap:
    plot_heatmap(report, args.heatmap)
    print(f"wrote {args.heatmap}")
  return report
