"""Small-scale reproduction of long-context extension (configs/tiny_passkey.py).

Trains the three stages (base at L0 -> ABF at 2·L0 -> XVERSE NTK at 4·L0) on this CPU with 8
emulated devices, then prints passkey accuracy per stage x length (from each stage's
metrics.jsonl, written by the in-training evaluation) and the wall time of each stage.

    python bench/passkey_repro.py --workdir=/tmp/passkey
    python bench/passkey_repro.py --workdir=/tmp/pk --base_steps=300 --stages=base   # quick look
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import importlib.util  # noqa: E402


def load_config(path):
  spec = importlib.util.spec_from_file_location("tiny_passkey", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def write_full_text(config, data_dir):
  """One JSONL of passkey documents per stage, with that stage's length range; point it there."""
  import ml_collections
  import numpy as np
  from longctx.data import synthetic
  os.makedirs(data_dir, exist_ok=True)
  base_src = config.data.source
  for name in config.stages.keys():
    src = config.stages[name].get("data", {}).get("source", {})
    lo = int(src.get("min_tokens", base_src.min_tokens))
    hi = int(src.get("max_tokens", base_src.max_tokens))
    path = os.path.join(data_dir, f"{name}.jsonl")
    if not os.path.exists(path):
      with open(path, "w") as f:
        for i in range(20000):
          rng = np.random.default_rng([1, i, hi])
          ex = synthetic.passkey(rng, synthetic.longalign_length(rng, lo, hi))
          f.write(json.dumps({"text": ex.prompt + ex.answer}) + "\n")
    with config.unlocked():
      stage = config.stages[name]
      if "data" not in stage:
        stage.data = ml_collections.ConfigDict()
      stage.data.source = ml_collections.ConfigDict(dict(kind="jsonl", paths=path))
  config.data.source.kind = "jsonl"


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--config", default=os.path.join(here, "..", "configs", "tiny_passkey.py"))
  p.add_argument("--stages", default="", help="comma-separated subset of stage_order")
  p.add_argument("--base_steps", type=int, default=0)
  p.add_argument("--abf_steps", type=int, default=0)
  p.add_argument("--ntk_steps", type=int, default=0)
  p.add_argument("--lr", type=float, default=0.0, help="base stage learning rate")
  p.add_argument("--trials", type=int, default=0)
  p.add_argument("--init_checkpoint", default="",
                 help="start the first stage from these params (e.g. an earlier WORKDIR/base/final)")
  p.add_argument("--eval_lengths", default="", help="override eval.passkey_lengths")
  p.add_argument("--full_text", action="store_true",
                 help="train on JSONL {'text': prompt + answer} passkey documents written to "
                      "WORKDIR/data (loss on every token, so the in-line repeat of K is a copy "
                      "target too) instead of the synthetic source (loss on the answer only)")
  args = p.parse_args()

  config = load_config(args.config)
  for name, steps in (("base", args.base_steps), ("abf", args.abf_steps),
                      ("ntk", args.ntk_steps)):
    if steps:
      config.stages[name].train.steps = steps
      config.stages[name].eval.every_steps = steps
  if args.lr:
    config.train.learning_rate = args.lr
  if args.trials:
    config.eval.passkey_trials = args.trials
  if args.stages:
    config.stage_order = args.stages
  if args.init_checkpoint:
    config.init.kind, config.init.path = "checkpoint", args.init_checkpoint
  if args.eval_lengths:
    config.eval.passkey_lengths = args.eval_lengths
  if args.full_text:
    write_full_text(config, os.path.join(args.workdir, "data"))

  from longctx.train.loop import run
  stages = [s.strip() for s in str(config.stage_order).split(",") if s.strip()]
  t_all = time.time()
  summaries = run(config, args.workdir, log=lambda msg: print(msg, flush=True))
  total = time.time() - t_all

  lengths = [int(x) for x in str(config.eval.passkey_lengths).split(",")]
  print()
  print(f"passkey accuracy ({config.eval.passkey_trials} trials per cell; greedy)")
  print("stage".ljust(8) + "step".rjust(6) + "".join(f"{n:>8d}" for n in lengths))
  for s in stages:
    path = os.path.join(args.workdir, s, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    last = None
    for line in open(path):
      rec = json.loads(line)
      if f"passkey_{lengths[0]}" in rec:
        last = rec
    if last is None:
      continue
    accs = [last.get(f"passkey_{n}", float("nan")) for n in lengths]
    print(s.ljust(8) + str(last.get("step")).rjust(6) + "".join(f"{a:8.2f}" for a in accs))
  for s in summaries:
    if not s.skipped:
      print(f"{s.name}: {s.steps} steps, {s.tokens:,} tokens, {s.seconds:.0f} s")
  print(f"total wall time (training + evaluation + compilation): {total:.0f} s")


if __name__ == "__main__":
  main()
