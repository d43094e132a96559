"""Forward time of each model family's decoder against Llama's, at equal shapes.

    python bench/families.py [--length 2048] [--layers 4] [--repeats 5] [--dtype float32]

Every family runs the one decoder (longctx/model/llama.py) with its own ModelConfig fields: Qwen2
adds q/k/v biases, Qwen3 a per-head q/k RMSNorm, Phi-3 partial rotary embeddings (0.75) and
LongRoPE's length-chosen factors, Mistral nothing. The shapes are the same for all (hidden 512,
8 / 2 heads of 64, MLP 1408, vocabulary 32000), so a family that costs more than Llama shows it
here. Prints a table (best of `--repeats` jitted calls after a compile) and the ratio to Llama.
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

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_heads=8,
             num_kv_heads=2, head_dim=64, max_position_embeddings=131072)
_PHI3_ROPE = LongRope(10000.0, tuple(1.0 + i / 48 for i in range(24)),
                      tuple(2.0 + i for i in range(24)), original_max_position_embeddings=4096,
                      factor=32.0)
# family -> the ModelConfig fields that family's checkpoints set
FAMILIES = {
    "llama": {},
    "mistral": dict(family="mistral"),
    "qwen2": dict(family="qwen2", qkv_bias=True, tie_word_embeddings=True),
    "qwen3": dict(family="qwen3", qk_norm=True),
    "phi3": dict(family="phi3", partial_rotary_factor=0.75, rope=_PHI3_ROPE),
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=2048, help="tokens per row (default 2048)")
  parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls (default 5)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  return parser


def forward_seconds(fields: dict, args) -> float:
  """Best wall time of one jitted forward pass (blockwise attention) of a family's model."""
  cfg = ModelConfig(**SHAPE, num_layers=args.layers, dtype=args.dtype, **fields)
  params = init_params(cfg, jax.random.PRNGKey(0))
  model = Llama(cfg, AttentionSpec(impl="blockwise").function())
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, args.length), 0, cfg.vocab_size,
                              jnp.int32)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
  return best_seconds(forward, (params, tokens), args.repeats, warmup=True)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  print(f"forward pass, 1 x {args.length} tokens, {args.layers} layers, {args.dtype}, "
        f"{jax.devices()[0].platform}")
  times = {name: forward_seconds(fields, args) for name, fields in FAMILIES.items()}
  print(f"| family | forward (ms) | vs llama |\n|---|---|---|")
  for name, seconds in times.items():
    print(f"| {name} | {1e3 * seconds:.1f} | {seconds / times['llama']:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
