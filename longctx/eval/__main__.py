"""`python -m longctx.eval {passkey,needle,perplexity,longbench-chat} --checkpoint=DIR ...`.

Evaluates a longctx checkpoint or an HF model directory: passkey retrieval, a needle-in-a-haystack
grid, sliding-window perplexity, or LongBench-Chat answers with a judge's scores.
`python -m longctx.eval COMMAND --help` lists a command's options with their defaults. Errors a
user can act on (missing files, lengths that do not fit, an unreachable judge) are printed as one
line and exit with status 2.
"""
from __future__ import annotations

import argparse
import enum
import importlib
import sys

from longctx.attention.layouts import Layout
from longctx.attention.spec import AttentionImpl
from longctx.attention.strategies import ONE_AXIS, Strategy
from longctx.cli import HelpFormatter
from longctx.eval import common


class Command(enum.Enum):
  PASSKEY = "passkey"
  NEEDLE = "needle"
  PERPLEXITY = "perplexity"
  LONGBENCH_CHAT = "longbench-chat"

  @property
  def module(self):
    return importlib.import_module(f"longctx.eval.{self.name.lower()}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m longctx.eval", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for command in Command:
    p = sub.add_parser(command.value, help=(command.module.__doc__ or "").splitlines()[0],
                       description=command.module.__doc__,
                       formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a longctx checkpoint or an HF model directory")
    p.add_argument("--tokenizer", default=common.AUTO_TOKENIZER,
                   help="'auto' (the checkpoint directory's tokenizer.json or tokenizer.model, "
                        "else 'byte'), 'byte', or a local tokenizer.json (HF) or *.model "
                        "(sentencepiece) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the generated prompts (keys, depths, needles, filler)")
    p.add_argument("--max_memory_gb", type=float, default=None,
                   help="memory budget for the length check (default: 90%% of the device's)")
    p.add_argument("--attention", default=AttentionImpl.TILED.value,
                   metavar="{" + ",".join(AttentionImpl.names()) + "}",
                   help="tiled (tiles, memory linear in length), dense (the O(L²) oracle) or "
                        "context_parallel (over --seq devices, by --strategy in --layout); the "
                        "old names blockwise and ring|all_gather|ulysses still work")
    p.add_argument("--seq", type=int, default=1,
                   help="devices a context-parallel prompt is split over")
    p.add_argument("--strategy", default=Strategy.RING.value, choices=[s.value for s in ONE_AXIS],
                   help="the context-parallel strategy (--attention=context_parallel)")
    p.add_argument("--layout", default=Layout.ZIGZAG.value, choices=Layout.names(),
                   help="how a context-parallel prompt is laid out over the devices")
    p.add_argument("--rope", default="",
                   help="override the model's RoPE: 'yarn,factor=2' (a new scaling; theta and "
                        "the trained length default to the model's) or 'theta=1e6' (default: "
                        "none, the model's own)")
    command.module.add_arguments(p)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  command = Command(args.command)
  try:
    command.module.main(args)
  except (FileNotFoundError, ValueError, ConnectionError) as e:
    print(f"error: {command.value}: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
