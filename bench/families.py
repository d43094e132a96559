"""Forward time of each model family's decoder against Llama's, at equal shapes.

    python bench/families.py [--length 2048] [--layers 4] [--repeats 7] [--dtype float32]

Every family runs the one decoder (longctx/model/llama.py) with its own ModelConfig fields:
Qwen2 adds q/k/v biases and a tied head, Qwen3 a per-head q/k RMSNorm, Phi-3 partial rotary
embeddings (0.75) and LongRoPE's length-chosen factors, Mistral nothing. The shapes are the
same for all (hidden 512, 8 / 2 heads of 64, MLP 1408, a 4096-token vocabulary so that the
layers dominate), so a family that costs more than Llama shows here; "llama tied" (the head
tied to the embedding, as in the small Qwen2.5 models) separates that choice from the family.
Prints a table: the best of `--repeats` rounds, each timing every family's compiled forward
once, and XLA's FLOP and byte counts of each compiled program (exact, where a CPU's wall times
move by several percent between runs; XLA counts the scan over layers once, so the counts
compare layers and head, not totals).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from longctx.attention import AttentionSpec  # noqa: E402
from longctx.model import Llama, LongRope, ModelConfig, init_params  # noqa: E402
from timing import best_seconds  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_heads=8,
             num_kv_heads=2, head_dim=64, max_position_embeddings=131072)
_PHI3_ROPE = LongRope(10000.0, tuple(1.0 + i / 48 for i in range(24)),
                      tuple(2.0 + i for i in range(24)), original_max_position_embeddings=4096,
                      factor=32.0)
# family -> the ModelConfig fields that family's checkpoints set
FAMILIES = {
    "llama": {},
    "llama tied": dict(tie_word_embeddings=True),
    "mistral": dict(family="mistral"),
    "qwen2": dict(family="qwen2", qkv_bias=True, tie_word_embeddings=True),
    "qwen3": dict(family="qwen3", qk_norm=True),
    "phi3": dict(family="phi3", partial_rotary_factor=0.75, rope=_PHI3_ROPE),
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=2048, help="tokens per row (default 2048)")
  parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
  parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  return parser


def compiled_forward(fields: dict, args):
  """(the compiled forward pass with blockwise attention, its arguments) of a family's model,
  run once."""
  cfg = ModelConfig(**SHAPE, num_layers=args.layers, dtype=args.dtype, **fields)
  params = init_params(cfg, jax.random.PRNGKey(0))
  model = Llama(cfg, AttentionSpec(impl="tiled").function())
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, args.length), 0, cfg.vocab_size,
                              jnp.int32)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).compile()
  jax.block_until_ready(forward(params, tokens))
  return forward, (params, tokens)


def xla_cost(forward, fn_args) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of the compiled forward by XLA's cost analysis: deterministic,
  where wall times on a shared CPU move by several percent from run to run."""
  del fn_args
  cost = forward.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def interleaved_best(calls: dict, repeats: int) -> dict[str, float]:
  """{name: best seconds}; each round times every call once, so drift on a busy machine
  reaches every family alike."""
  best = {name: float("inf") for name in calls}
  for _ in range(repeats):
    for name, (fn, fn_args) in calls.items():
      best[name] = min(best[name], best_seconds(fn, fn_args, 1))
  return best


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  print(f"forward pass, 1 x {args.length} tokens, {args.layers} layers, {args.dtype}, "
        f"{jax.devices()[0].platform}")
  calls = {name: compiled_forward(fields, args) for name, fields in FAMILIES.items()}
  times = interleaved_best(calls, args.repeats)
  costs = {name: xla_cost(*call) for name, call in calls.items()}
  flops0, bytes0 = costs["llama"]
  print("| family | forward (ms) | vs llama | XLA GFLOP | vs llama | XLA GB accessed | vs llama |"
        "\n|---|---|---|---|---|---|---|")
  for name, seconds in times.items():
    flops, nbytes = costs[name]
    print(f"| {name} | {1e3 * seconds:.1f} | {seconds / times['llama']:.3f} | {flops / 1e9:.2f} "
          f"| {flops / flops0:.4f} | {nbytes / 1e9:.3f} | {nbytes / bytes0:.4f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
