"""One flag spelling for every command (launch, plan, data, convert, eval): words joined by
underscores, `--max_len`, as absl spells `--config.train.learning_rate` and every config key.
Subcommands keep their names (`from-gguf`, `longbench-chat`). A flag's old dashed spelling still
works, rewritten by `respell` with a note on stderr naming the new one."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Every option's default shown (unless its help says it in words); the command's docstring as
  written."""

  def _get_help_string(self, action):
    text = action.help or ""
    return text if "default" in text or action.required else super()._get_help_string(action)


def old_spellings(*flags: str) -> dict[str, str]:
  """{old dashed spelling: flag} of underscore-spelled `flags` ("--max_len")."""
  return {"--" + f[2:].replace("_", "-"): f for f in flags}


def respell(argv: Sequence[str], renamed: dict[str, str]) -> list[str]:
  """`argv` with each old spelling (`--max-len` or `--max-len=V`) replaced by its new one."""
  out = []
  for arg in argv:
    name, eq, value = arg.partition("=")
    new = renamed.get(name)
    if new is not None:
      print(f"note: {name} is now spelled {new}; the old spelling still works", file=sys.stderr)
      arg = new + eq + value
    out.append(arg)
  return out


HELP_FLAGS = ("-h", "--help", "--helpshort", "-?")


def absl_flags_parser(doc: str, old: dict[str, str] | None = None, after_flags: str = "",
                      explain: Callable[[str], str] = str):
  """A `flags_parser` for absl's `app.run`: old spellings respelled, `--help` printing `doc`,
  the command's flags with their defaults and `after_flags`, and exiting 0 (absl's own exits 1),
  and a bad flag one line (`explain` of absl's message) with exit 2."""
  from absl import flags

  def parse(argv: list[str]) -> list[str]:
    argv = respell(argv, old or {})
    if any(a in HELP_FLAGS for a in argv[1:]):
      print(f"{doc}\nflags:\n{flags.FLAGS.main_module_help()}{after_flags}")
      sys.exit(0)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"longctx: {explain(str(e))}", file=sys.stderr)
      sys.exit(2)
  return parse
