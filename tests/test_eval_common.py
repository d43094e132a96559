"""Shared pieces of the eval commands: the tiny checkpoint, the length limit, the CLI's errors."""
import os
import subprocess
import sys

import pytest

from longctx.eval import common
from longctx.eval.__main__ import main as cli
from longctx.eval.testing import TINY_CONFIG as TINY
from longctx.eval.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "eval_tiny_checkpoint")


def test_estimate_grows_with_length_and_longest_fitting_fits():
  budget = common.MemoryBudget.from_gib(0.01)
  n = common.longest_fitting(TINY, 1, 8, budget)
  assert n > 0
  assert sum(common.estimate_bytes(TINY, 1, n, 8).values()) <= budget.bytes
  assert sum(common.estimate_bytes(TINY, 1, n + 1, 8).values()) > budget.bytes
  common.check_fits(TINY, 1, n, 8, budget, "here")
  with pytest.raises(common.ContextTooLongError, match=f"longest length that fits is {n} tokens"):
    common.check_fits(TINY, 1, n + 1, 8, budget, "here")


def test_default_budget_rejects_an_absurd_length():
  with pytest.raises(common.ContextTooLongError, match="kv_cache"):
    common.check_fits(TINY, 1, 10**8, 8, common.MemoryBudget.from_gib(None), "passkey")


def test_tokenizer_flag_errors(tmp_path):
  assert common.tokenizer_from_flag("byte").vocab_size == 260
  with pytest.raises(FileNotFoundError, match="nothing at"):
    common.tokenizer_from_flag(str(tmp_path / "nope.json"))
  bad = tmp_path / "tok.txt"
  bad.write_text("x")
  with pytest.raises(ValueError, match="expected a file ending in"):
    common.tokenizer_from_flag(str(bad))


def test_the_default_tokenizer_is_the_checkpoint_directorys(tmp_path, capsys):
  """`auto`: tokenizer.json, else tokenizer.model, else byte, and stderr says which."""
  from longctx.data.tokenizers import train_bpe_tokenizer
  assert common.open_tokenizer("auto", str(tmp_path)).vocab_size == 260
  assert "tokenizer: byte (no tokenizer.json or tokenizer.model in" in capsys.readouterr().err
  train_bpe_tokenizer(["some text to learn a few merges from"] * 4, tmp_path / "tokenizer.json",
                      300)
  tok = common.open_tokenizer("auto", str(tmp_path))
  assert common.tokenizer_name(tok) == str(tmp_path / "tokenizer.json")
  assert "(the checkpoint directory's; --tokenizer overrides it)" in capsys.readouterr().err
  assert common.tokenizer_name(common.open_tokenizer("byte", str(tmp_path))) == "byte"


def test_the_byte_tokenizer_is_refused_on_a_subword_vocabulary():
  import dataclasses
  byte = common.tokenizer_from_flag("byte")
  common.check_vocab(dataclasses.replace(TINY, vocab_size=common.BYTE_VOCAB_LIMIT), byte)
  with pytest.raises(ValueError, match=r"the byte tokenizer \(260 ids\) on a model whose "
                                       r"vocabulary has 32000 ids .* pass --tokenizer="):
    common.check_vocab(dataclasses.replace(TINY, vocab_size=32000), byte)


def test_read_jsonl_drops_a_truncated_last_line(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
  assert common.read_jsonl(str(p)) == [{"a": 1}, {"a": 2}]
  common.append_jsonl(str(p), {"a": 3})  # the resumed run's record replaces the cut-off one
  assert common.read_jsonl(str(p)) == [{"a": 1}, {"a": 2}, {"a": 3}]
  (tmp_path / "b.jsonl").write_text('{"a": ')
  common.append_jsonl(str(tmp_path / "b.jsonl"), {"a": 4})
  assert common.read_jsonl(str(tmp_path / "b.jsonl")) == [{"a": 4}]
  p.write_text('{"a": 1}\n{"a\n{"a": 2}\n')
  with pytest.raises(ValueError, match="a.jsonl:2"):
    common.read_jsonl(str(p))


def test_cli_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
  rc = cli(["passkey", f"--checkpoint={tmp_path}/missing", "--lengths=64",
            f"--out={tmp_path}/p.json"])
  assert rc == 2
  assert "expected a directory" in capsys.readouterr().err


def test_cli_length_beyond_budget(tiny_checkpoint, tmp_path, capsys):
  rc = cli(["passkey", f"--checkpoint={tiny_checkpoint}", "--lengths=100000", "--trials=1",
            "--max_memory_gb=0.01", f"--out={tmp_path}/p.json"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "passkey length 100000" in err and "longest length that fits is" in err


def test_python_dash_m_entry_point(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-m", "longctx.eval", "perplexity",
                           f"--checkpoint={tmp_path}/missing", f"--data={tmp_path}/none.txt"],
                          capture_output=True, text=True, cwd=root, timeout=120)
  assert result.returncode == 2
  assert "error: perplexity: --data: expected a local text file" in result.stderr


def test_eval_attention_memory_and_flags():
  dense, tiled = common.EvalAttention("dense"), common.EvalAttention()
  ring = common.EvalAttention("context_parallel", seq=4)
  parts = {a.name: common.estimate_bytes(TINY, 1, 16384, 8, a) for a in (dense, tiled, ring)}
  assert parts["dense"]["attention_scores"] == 16 * parts["tiled"]["attention_scores"]
  assert parts["ring"]["kv_cache"] * 4 == parts["tiled"]["kv_cache"]
  assert parts["ring"]["params"] == parts["dense"]["params"]
  budget = common.MemoryBudget(1 << 30)
  assert (common.longest_fitting(TINY, 1, 8, budget, dense)
          < common.longest_fitting(TINY, 1, 8, budget, tiled)
          < common.longest_fitting(TINY, 1, 8, budget, ring))
  with pytest.raises(ValueError, match=r"unknown --attention 'flash'; expected one of "
                     r"\['dense', 'tiled', 'context_parallel'\]"):
    common.EvalAttention("flash")
  with pytest.raises(ValueError, match=r"--seq=2: expected 1, or ≥ 1 devices with "
                     r"--attention=context_parallel \(found --attention=tiled\)"):
    common.EvalAttention("tiled", seq=2)
  with pytest.raises(ValueError, match=r"--strategy: expected one of \['ring', 'all_gather', "
                     r"'ulysses'\], found 'hybrid'"):
    common.EvalAttention("context_parallel", 2, "hybrid")


def test_the_kv_cache_estimate_counts_w_ring_slots_for_windowed_layers():
  """A full layer keeps P+T slots (split over a context-parallel prefill's devices), a
  sliding-window layer a ring of min(W, P+T) slots (whole on every device)."""
  sliding = TINY.replace(num_layers=6, sliding_window=64,
                         layer_types=("sliding_attention",) * 5 + ("full_attention",))
  per_slot = 2 * TINY.num_kv_heads * TINY.head_dim * 4  # k and v, float32

  def cache(cfg, prompt_len, new_tokens, attention=None):
    return common.estimate_bytes(cfg, 1, prompt_len, new_tokens, attention)["kv_cache"]
  assert cache(sliding, 1000, 24) == per_slot * (1024 + 5 * 64)
  assert cache(sliding, 40, 8) == per_slot * 6 * 48  # shorter than the window
  ring = common.EvalAttention("context_parallel", seq=4)
  assert cache(sliding, 1000, 24, ring) == per_slot * (1024 // 4 + 5 * 64)
  assert cache(sliding.replace(sliding_window=None, layer_types=()), 1000, 24) == (
      per_slot * 6 * 1024)
  assert (common.longest_fitting(sliding, 1, 8, common.MemoryBudget(1 << 24))
          > common.longest_fitting(sliding.replace(layer_types=("full_attention",) * 6), 1, 8,
                                   common.MemoryBudget(1 << 24)))


def test_eval_attention_old_spellings_still_work_with_a_note(capsys):
  """`--attention=blockwise` and `--attention=ulysses` (before the renamings) mean what they
  meant, and say the new spelling."""
  old = common.EvalAttention("ulysses", seq=2)
  assert (old.impl, old.strategy, old.name) == ("context_parallel", "ulysses", "ulysses")
  assert "--attention=context_parallel --strategy=ulysses" in capsys.readouterr().err
  assert common.EvalAttention("blockwise") == common.EvalAttention("tiled")
  assert common.EvalAttention("ring", seq=2).spec() == common.EvalAttention(
      "context_parallel", seq=2).spec()
  assert common.parse_rope("yarn,factor=2") == {"rope_type": "yarn", "factor": 2}
  assert common.parse_rope("theta=1e6") == {"theta": 1e6}
  with pytest.raises(ValueError, match="rope_type first"):
    common.parse_rope("factor=2,yarn")


def test_every_eval_option_has_help_and_shows_its_default(capsys):
  import argparse

  from longctx.eval.__main__ import Command, build_parser
  sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
  for command in Command:
    parser = sub.choices[command.value]
    undocumented = [a.dest for a in parser._actions if not a.help]
    assert not undocumented, (command.value, undocumented)
    with pytest.raises(SystemExit) as exit_:
      cli([command.value, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
      if action.default not in (None, argparse.SUPPRESS) and not action.required:
        assert f"(default: {action.default})" in text or "default" in action.help, (
            command.value, action.dest)
