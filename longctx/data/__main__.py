"""`python -m longctx.data inspect --config=configs/data_example.py [--config.data.x=…] [--json]`

Runs the configured data pipeline and prints lengths, rows, packing efficiency, sequences per
row, dropped / truncated counts and tokens/s (with a progress bar on stderr). On a training
config that starts from a model directory (`init.path`), an empty `data.tokenizer_path` takes
that directory's tokenizer, as training does.
"""
from __future__ import annotations

import dataclasses
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from longctx.cli import absl_flags_parser
from longctx.data.config import DataConfig
from longctx.data.pipeline import Shard
from longctx.data.report import format_summary, summarize

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file with a `data` section")
_JSON = flags.DEFINE_bool("json", False, "print the summary as JSON")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "stop after this many batches (0: one "
                                    "epoch, also of a source that repeats: data.num_epochs=0)")
_SHARD = flags.DEFINE_string("shard", "0/1", "INDEX/COUNT of the process share to inspect")

COMMANDS = ("inspect",)


def _data_section(config):
  """config.data, its empty tokenizer_path filled from config.init.path when there is one."""
  data = config.data
  init = config.get("init")
  path = str(init.get("path", "") or "") if init is not None else ""
  if not data.get("tokenizer_path") and path and str(init.get("kind", "")) != "random":
    from longctx.data.tokenizers import tokenizer_in
    found = tokenizer_in(path, data.get("tokenizer"))
    if found:
      data = data.copy_and_resolve_references()
      with data.unlocked():
        data.tokenizer_path = found
  return data


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"expected one command among {COMMANDS}, found {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("expected --config=configs/NAME.py, found none")
  cfg = DataConfig.from_config_dict(_data_section(_CONFIG.value))
  if cfg.num_epochs == 0 and not _MAX_BATCHES.value:  # a repeating source would never end
    cfg = dataclasses.replace(cfg, num_epochs=1)
    print("data.num_epochs=0 repeats the source forever; inspecting one epoch", file=sys.stderr)
  index, count = (int(x) for x in _SHARD.value.split("/"))
  summary = summarize(cfg, Shard(index, count), _MAX_BATCHES.value, progress=True)
  sys.stdout.write((json.dumps(summary, indent=2) if _JSON.value else format_summary(summary))
                   + "\n")


if __name__ == "__main__":
  app.run(main, flags_parser=absl_flags_parser(__doc__))
