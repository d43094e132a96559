"""Training-free RoPE scalings of SmolLM2-135M-Instruct: perplexity on real long text.

The model trained to 8,192 positions is scored at each length with its RoPE as is and with the
training-free scalings at factor max(1, L / 8192): linear (PI), dynamic NTK, YaRN and XVERSE's
fixed NTK (the base for L). The text is every pydoc topic of this Python (`pydoc_data.topics`,
~113k tokens); `--windows` windows per length from its start, blockwise attention, float32.

    python bench/smollm2_baselines.py --lengths 8192,16384 --out /tmp/baselines.json
    python bench/smollm2_baselines.py --model DIR   # any HF directory; default: the test cache

Prints a table (perplexity per scaling × length, seconds per window) and writes the JSON.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

SCALINGS = ("default", "linear", "dynamic", "yarn", "xverse_ntk")


def rope_for(name: str, base, trained: int, length: int):
  """The scaling `name` of the model's RoPE `base` for evaluation at `length`."""
  from longctx.model import rope
  factor = max(1.0, length / trained)
  if name == "default" or factor == 1.0:
    return base
  if name == "xverse_ntk":
    return rope.FixedNtkRope(base.theta, trained_length=trained, target_length=length)
  given = {"rope_type": name, "factor": factor}
  return rope.override(base, trained, given)


def score(model_dir: str, lengths, windows: int, scalings) -> dict:
  import longctx
  from longctx.data.tokenizers import HFTokenizer
  from longctx.eval.common import EvalAttention
  from longctx.eval.perplexity import perplexity_at
  from longctx.model.config import ModelConfig
  from tests.real_model import real_text
  tok = HFTokenizer(os.path.join(model_dir, "tokenizer.json"))
  tokens = np.concatenate([[tok.bos_id], tok.encode(real_text(10 ** 7))]).astype(np.int32)
  base = ModelConfig.from_directory(model_dir)
  rows = []
  for name in scalings:
    for length in lengths:
      rope = rope_for(name, base.rope, base.max_position_embeddings, length)
      same = [r for r in rows if r["length"] == length and r["rope"] == rope.to_dict()]
      if same:  # factor 1: the model's own RoPE, already scored
        rows.append({**same[0], "scaling": name})
        continue
      model = longctx.load_pretrained(model_dir, progress=False, rope=rope,
                                      attention_fn=EvalAttention().attention_fn())
      start = time.perf_counter()
      r = perplexity_at(model, tokens, length, stride=length, max_windows=windows)
      seconds = (time.perf_counter() - start) / r["windows"]
      rows.append({"scaling": name, "length": length, "ppl": r["ppl"], "windows": r["windows"],
                   "seconds_per_window": seconds, "rope": rope.to_dict()})
      print(f"{name:>10} {length:>6}: ppl {r['ppl']:8.3f} ({seconds:.0f} s/window)", flush=True)
  return {"model": model_dir, "tokens": int(len(tokens)), "windows": windows, "results": rows}


def table(report: dict) -> str:
  lengths = sorted({r["length"] for r in report["results"]})
  lines = ["| scaling | " + " | ".join(f"{n:,}" for n in lengths) + " |",
           "|---|" + "---:|" * len(lengths)]
  for name in dict.fromkeys(r["scaling"] for r in report["results"]):
    cells = {r["length"]: f"{r['ppl']:.2f}" for r in report["results"] if r["scaling"] == name}
    lines.append(f"| {name} | " + " | ".join(cells.get(n, "") for n in lengths) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=None, help="an HF directory (default: the test cache)")
  parser.add_argument("--lengths", default="8192,16384")
  parser.add_argument("--windows", type=int, default=1)
  parser.add_argument("--scalings", default=",".join(SCALINGS))
  parser.add_argument("--out", default="smollm2_baselines.json")
  args = parser.parse_args(argv)
  if args.model is None:
    from tests.real_model import hf_dir
    args.model = hf_dir()
  lengths = [int(x) for x in args.lengths.split(",")]
  report = score(args.model, lengths, args.windows, args.scalings.split(","))
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(table(report))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
