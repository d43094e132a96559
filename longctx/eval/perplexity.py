"""Perplexity with LongLoRA's sliding windows (METHODS.md §6).

For an evaluation length L and stride s (256 by default), window i holds tokens
[i·s, i·s + L + 1) of the evaluation stream: L inputs and their L next-token targets, every one
scored. A window's loss is the mean negative log-likelihood of its L targets; the reported
perplexity is exp(mean over windows of the window loss) (LongLoRA `eval.py`). The stream is a
local text file (tokenized once, with a leading BOS) or a token file (.npy of integer ids).

    python -m longctx.eval perplexity --checkpoint=DIR --data=book.txt \\
        --lengths=2048,4096 --stride=256 --out=ppl.json

Legend: B windows in a batch, L evaluation length, V vocab.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longctx.data.tokenizers import Tokenizer
from longctx.eval import common


def load_tokens(path: str, tokenizer: Tokenizer | None) -> np.ndarray:
  """int32 [n]: a .npy token file as is, or a text file encoded with a leading BOS."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--data: expected a local text file or .npy token file, found "
                            f"nothing at {path!r}")
  if path.endswith(".npy"):
    tokens = np.load(path)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"{path}: expected a 1-D integer token array, found {tokens.dtype} "
                       f"{tokens.shape}")
    return tokens.astype(np.int32)
  if tokenizer is None:
    raise ValueError(f"{path}: a text file needs a tokenizer")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  return np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int32)


def window_starts(n_tokens: int, length: int, stride: int,
                  max_windows: int | None = None) -> list[int]:
  """Starts i·stride of every window of length+1 tokens inside the stream (LongLoRA's
  `range(0, n - length, stride)`), the first `max_windows` of them if given."""
  if stride < 1:
    raise ValueError(f"stride must be ≥ 1, found {stride}")
  starts = list(range(0, n_tokens - length, stride))
  return starts[:max_windows] if max_windows else starts


@jax.jit
def _window_losses(logits_BLV, targets_BL):
  """Mean next-token NLL of each window, float32 [B]."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  nll_BL = -jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return nll_BL.mean(axis=-1)


def perplexity_at(model, tokens: np.ndarray, length: int, stride: int = 256,
                  batch_size: int = 1, max_windows: int | None = None) -> dict:
  """{"length", "windows", "loss" (mean window loss), "ppl" (exp of it)} for one length.

  model: `model(tokens int32 [B, L]) -> logits float32 [B, L, V]` (a `PretrainedModel`; during
  training `PretrainedModel(model_config, state_params)`).
  """
  starts = window_starts(len(tokens), length, stride, max_windows)
  if not starts:
    raise ValueError(f"perplexity at length {length} needs at least {length + 1} tokens; the "
                     f"data has {len(tokens)}")
  losses = []
  for i in range(0, len(starts), batch_size):
    windows_BL1 = np.stack([tokens[s:s + length + 1] for s in starts[i:i + batch_size]])
    logits_BLV = model(windows_BL1[:, :-1])
    losses += np.asarray(_window_losses(logits_BLV, jnp.asarray(windows_BL1[:, 1:]))).tolist()
  loss = float(np.mean(losses))
  return {"length": length, "windows": len(starts), "loss": loss, "ppl": math.exp(loss),
          "window_losses": losses}


def run_perplexity(model, tokens: np.ndarray, lengths: Sequence[int], stride: int = 256,
                   batch_size: int = 1, max_windows: int | None = None,
                   budget: common.MemoryBudget | None = None) -> dict:
  """Perplexity per length on one token stream; checks every length fits before any work."""
  lengths = common.validate_lengths(lengths, "perplexity lengths")
  vocab = model.config.vocab_size
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
    raise ValueError(f"token ids must lie in [0, {vocab}) for this model; the data has ids in "
                     f"[{tokens.min()}, {tokens.max()}]")
  budget = budget or common.MemoryBudget.from_gib(None)
  for n in lengths:
    common.check_fits(model.config, batch_size, n, 0, budget, f"perplexity length {n}",
                      getattr(model, "attention", None))
  per_length = [perplexity_at(model, tokens, n, stride, batch_size, max_windows) for n in lengths]
  return {"task": "perplexity", "stride": stride, "tokens": int(len(tokens)),
          "results": per_length}


def format_report(report: dict) -> str:
  rows = [(r["length"], r["windows"], f"{r['loss']:.4f}", f"{r['ppl']:.3f}")
          for r in report["results"]]
  return common.format_table(["length", "windows", "loss", "ppl"], rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--data", required=True, help="a local text file or .npy of int32 tokens")
  parser.add_argument("--lengths", default="2048,4096", help="comma-separated lengths in tokens")
  parser.add_argument("--stride", type=int, default=256,
                      help="tokens between the starts of consecutive windows")
  parser.add_argument("--batch_size", type=int, default=1, help="windows scored together")
  parser.add_argument("--max_windows", type=int, default=None,
                      help="score only the first N windows per length")
  parser.add_argument("--out", default="perplexity.json", help="JSON report path")


def main(args: argparse.Namespace) -> dict:
  tokenizer = common.open_tokenizer(args.tokenizer, args.checkpoint)
  tokens = load_tokens(args.data, tokenizer)
  model = common.load_model(args.checkpoint, common.eval_attention(args),
                            args.rope)
  if not args.data.endswith(".npy"):  # token files do not go through the tokenizer
    common.check_vocab(model.config, tokenizer)
  run = common.run_info(args, tokenizer, model)
  report = run_perplexity(model, tokens, common.parse_ints(args.lengths, "--lengths"),
                          args.stride, args.batch_size, args.max_windows,
                          common.MemoryBudget.from_gib(args.max_memory_gb))
  report.update(run, data=os.path.abspath(args.data))
  common.write_json(args.out, report)
  print(common.format_run(run))
  print(format_report(report))
  print(f"wrote {args.out}")
  return report
