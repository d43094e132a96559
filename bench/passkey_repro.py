"""Small-scale reproduction of long-context extension (configs/tiny_passkey.py).

Trains the three stages (base at L0 -> ABF at 2·L0 -> XVERSE NTK at 4·L0) on this CPU with 8
emulated devices, prints passkey accuracy per stage x length (from each stage's metrics.jsonl,
written by the in-training evaluation: random depths), then evaluates each stage's final weights
on a lengths x depths grid (`longctx.eval.passkey` with depths) and draws the three heatmaps side
by side in WORKDIR/passkey_heatmaps.png; the numbers go to WORKDIR/passkey_repro.json.

    python bench/passkey_repro.py --workdir=/tmp/passkey
    python bench/passkey_repro.py --workdir=/tmp/pk --base_steps=300 --stages=base   # quick look
    python bench/passkey_repro.py --rebuild_tokenizer   # rewrite configs/assets/passkey_bpe.json
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(path):
  spec = importlib.util.spec_from_file_location("tiny_passkey", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod, mod.get_config()


def rebuild_tokenizer(path, vocab_size=400, documents=2000):
  """The config's BPE: trained on passkey documents of 200–4000 characters, digits split."""
  from longctx.data import synthetic
  from longctx.data.tokenizers import train_bpe_tokenizer
  texts = []
  for i in range(documents):
    rng = np.random.default_rng([20261123, i])
    ex = synthetic.passkey(rng, int(rng.integers(200, 4000)))
    texts.append(ex.prompt + ex.answer)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  train_bpe_tokenizer(texts, path, vocab_size, split_digits=True)
  print(f"wrote {path}")


def in_training_table(workdir, stages, lengths):
  """{stage: {"step", length: accuracy}} from the last passkey record of each stage."""
  table = {}
  for s in stages:
    path = os.path.join(workdir, s, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    last = None
    for line in open(path):
      rec = json.loads(line)
      if f"passkey_{lengths[0]}" in rec:
        last = rec
    if last is not None:
      table[s] = {"step": last.get("step"),
                  **{n: last.get(f"passkey_{n}", float("nan")) for n in lengths}}
  return table


def plot_grids(grids, path):
  """One depth × length heatmap per stage, side by side (the needle heatmap's cells)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from longctx.eval.needle import draw_grid
  fig, axes = plt.subplots(1, len(grids), figsize=(2.8 * len(grids) + 1.6, 4.6), squeeze=False,
                           sharey=True)
  for ax, (stage, rep) in zip(axes[0], grids.items()):
    im = draw_grid(ax, rep, fmt=".1f")
    ax.set_title(f"after {stage}", fontsize=10)
  axes[0][0].set_ylabel("passkey depth")
  fig.colorbar(im, ax=axes[0].tolist(), label="fraction correct")
  fig.suptitle(f"passkey retrieval, {next(iter(grids.values()))['trials']} trials per cell",
               fontsize=10)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser()
  p.add_argument("--workdir")
  p.add_argument("--config", default=os.path.join(HERE, "..", "configs", "tiny_passkey.py"))
  p.add_argument("--stages", default="", help="comma-separated subset of stage_order")
  p.add_argument("--base_steps", type=int, default=0)
  p.add_argument("--abf_steps", type=int, default=0)
  p.add_argument("--ntk_steps", type=int, default=0)
  p.add_argument("--trials", type=int, default=0, help="in-training passkey trials per length")
  p.add_argument("--depths", default="0,0.125,0.25,0.375,0.5,0.625,0.75,0.875,1",
                 help="heatmap depths ('' skips the heatmaps)")
  p.add_argument("--heatmap_trials", type=int, default=5, help="trials per heatmap cell")
  p.add_argument("--rebuild_tokenizer", action="store_true",
                 help="retrain the config's tokenizer file and exit")
  return p


def _override(config, args) -> None:
  """The command line's step counts, trials and stage subset, into the config."""
  for name, steps in (("base", args.base_steps), ("abf", args.abf_steps),
                      ("ntk", args.ntk_steps)):
    if steps:
      config.stages[name].train.steps = steps
      config.stages[name].eval.every_steps = steps
  if args.trials:
    config.eval.passkey_trials = args.trials
  if args.stages:
    config.stage_order = args.stages


def _print_training(config, table, lengths, summaries, t_train) -> None:
  print()
  print(f"passkey accuracy ({config.eval.passkey_trials} trials per cell at random depths; greedy)")
  print("stage".ljust(8) + "step".rjust(6) + "".join(f"{n:>8d}" for n in lengths))
  for s, row in table.items():
    print(s.ljust(8) + str(row["step"]).rjust(6) + "".join(f"{row[n]:8.2f}" for n in lengths))
  for s in summaries:
    if not s.skipped:
      print(f"{s.name}: {s.steps} steps, {s.tokens:,} tokens, {s.seconds:.0f} s")
  print(f"training + in-training evaluation + compilation: {t_train:.0f} s")


def _heatmaps(config, args, stages, lengths) -> dict:
  """Passkey over lengths × depths on every stage's final weights; writes the picture."""
  import longctx
  from longctx.data.config import TokenizerKind
  from longctx.data.tokenizers import make_tokenizer
  from longctx.eval import passkey
  tokenizer = make_tokenizer(TokenizerKind(config.data.tokenizer), config.data.tokenizer_path)
  depths = [float(d) for d in args.depths.split(",")]
  grids, t0 = {}, time.time()
  for s in stages:
    final = os.path.join(args.workdir, s, "final")
    if not os.path.isdir(final):
      continue
    model = longctx.load_pretrained(final, progress=False)
    grids[s] = passkey.run_passkey(model, tokenizer, lengths, args.heatmap_trials, seed=1,
                                   batch_size=args.heatmap_trials, depths=depths, progress=True)
    print(f"\nafter {s} (final weights), {args.heatmap_trials} trials per cell:")
    print(passkey.format_report(grids[s]))
  if grids:
    path = os.path.join(args.workdir, "passkey_heatmaps.png")
    plot_grids(grids, path)
    print(f"heatmaps: {time.time() - t0:.0f} s; wrote {path}")
  return grids


def main():
  p = _parser()
  args = p.parse_args()
  mod, config = load_config(args.config)
  if args.rebuild_tokenizer:
    rebuild_tokenizer(mod.TOKENIZER)
    return
  if not args.workdir:
    p.error("--workdir is required")
  _override(config, args)

  from longctx.train.loop import run
  stages = [s.strip() for s in str(config.stage_order).split(",") if s.strip()]
  t_all = time.time()
  summaries = run(config, args.workdir, log=lambda msg: print(msg, flush=True))
  t_train = time.time() - t_all
  lengths = [int(x) for x in str(config.eval.passkey_lengths).split(",")]
  table = in_training_table(args.workdir, stages, lengths)
  _print_training(config, table, lengths, summaries, t_train)
  grids = _heatmaps(config, args, stages, lengths) if args.depths else {}
  out = os.path.join(args.workdir, "passkey_repro.json")
  with open(out, "w") as f:
    json.dump({"in_training": table, "train_seconds": t_train,
               "stages": {s.name: {"steps": s.steps, "tokens": s.tokens, "seconds": s.seconds}
                          for s in summaries if not s.skipped},
               "heatmaps": {s: {k: r[k] for k in ("lengths", "depths", "trials", "grid",
                                                  "accuracy")} for s, r in grids.items()}},
              f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
