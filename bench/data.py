"""Data pipeline benchmark: tokens/s (byte and BPE tokenizers), and packing efficiency / padding
waste of naive, sorted and packed batching on the LongAlign-like mix at max_len 64k.

  python bench/data.py [--examples 1024] [--workers 0]

Prints a markdown table; results go in bench/RESULTS.md ("## Data"). Text for the BPE run:
Python standard-library sources on this machine (real prose + code, nothing downloaded), split
into ~16k-character documents; the BPE tokenizer (vocab 32000, byte-level) is trained on half
of them and measured on the other half.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from longctx.data import DataConfig, default_config  # noqa: E402
from longctx.data.report import summarize  # noqa: E402
from longctx.data.synthetic import longalign_length  # noqa: E402
from longctx.data.tokenizers import train_bpe_tokenizer  # noqa: E402


def _config(**kw) -> DataConfig:
  cd = default_config()
  cd.update_from_flattened_dict(kw)
  return DataConfig.from_config_dict(cd)


def stdlib_documents(n_chars: int = 16_000, limit: int = 4000) -> list[str]:
  """~16k-character documents cut from the Python standard library's sources."""
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"),
                           recursive=True))
  text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files[:1500])
  return [text[i:i + n_chars] for i in range(0, len(text) - n_chars, n_chars)][:limit]


def throughput_rows(args, tmp: str) -> list[tuple[str, dict]]:
  docs = stdlib_documents()
  half = len(docs) // 2
  jsonl = os.path.join(tmp, "docs.jsonl")
  with open(jsonl, "w") as f:
    for d in docs[half:]:
      f.write(json.dumps({"text": d}) + "\n")
  bpe = os.path.join(tmp, "tokenizer.json")
  train_bpe_tokenizer(docs[:half], bpe, vocab_size=32000)
  common = dict(max_len=65536, batch_size=1, window=512, num_workers=args.workers)
  runs = [
      ("byte, synthetic LongAlign mix", _config(**common, **{
          "source.num_examples": args.examples})),
      ("byte, stdlib text JSONL", _config(**common, **{
          "source.kind": "jsonl", "source.paths": jsonl, "template": "plain"})),
      ("BPE 32k, stdlib text JSONL", _config(**common, **{
          "source.kind": "jsonl", "source.paths": jsonl, "template": "plain",
          "tokenizer": "hf", "tokenizer_path": bpe})),
  ]
  return [(name, summarize(cfg)) for name, cfg in runs]


def batching_efficiency(n: int, max_len: int = 65536, batch: int = 8, seed: int = 0) -> dict:
  """Non-pad fraction of naive / sorted / packed batching on the LongAlign-like lengths."""
  rng = np.random.default_rng(seed)
  lengths = np.array([longalign_length(rng, 1024, max_len) for _ in range(n)])
  slots = sum(batch * lengths[i:i + batch].max() for i in range(0, n, batch))
  naive = lengths.sum() / slots
  out = {"naive (random order, pad to batch max)": naive}
  for name, batching in (("sorted (window 1024)", "sorted"), ("packed (window 512)", "packed")):
    cfg = _config(**{"source.num_examples": n, "batching": batching, "max_len": max_len,
                     "batch_size": batch if batching == "sorted" else 1,
                     "window": 1024 if batching == "sorted" else 512})
    out[name] = summarize(cfg)["non_pad_fraction"]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--examples", type=int, default=1024)
  parser.add_argument("--workers", type=int, default=0)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    rows = throughput_rows(args, tmp)
  print("| pipeline | documents | tokens | tokens/s | non-pad |")
  print("|---|---|---|---|---|")
  for name, s in rows:
    print(f"| {name} | {s['documents']} | {s['tokens']:,} | {s['tokens_per_s']:,.0f} | "
          f"{s['non_pad_fraction']:.4f} |")
  print()
  print("| batching, LongAlign-like mix, max_len 64k | non-pad | padding |")
  print("|---|---|---|")
  for name, frac in batching_efficiency(args.examples).items():
    print(f"| {name} | {frac:.4f} | {1 - frac:.2%} |")


if __name__ == "__main__":
  main()
