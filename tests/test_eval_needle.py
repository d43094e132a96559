"""Needle in a haystack: prompts, scoring, the heatmap's data, resuming an interrupted grid."""
import json
import os

import numpy as np
import pytest

from longctx.data.tokenizers import ByteTokenizer
from longctx.eval import needle
from longctx.eval.__main__ import main as cli
from longctx.eval.testing import TINY_CONFIG as TINY
from longctx.eval.testing import make_tiny_checkpoint

TOK = ByteTokenizer()
GRID = needle.NeedleGrid((600, 900), (0.0, 0.5, 1.0))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "eval_tiny_checkpoint")


class Oracle:
  """Answers with the needle's number when the needle sits in the first half of the prompt."""
  config = TINY

  def __init__(self, fail_after=None):
    self.calls, self.fail_after = 0, fail_after

  def generate(self, prompts, max_new_tokens, temperature, eos_token_id):
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise KeyboardInterrupt("simulated interruption")
    self.calls += 1
    out = []
    for p in prompts:
      text = TOK.decode(p)
      at = text.index("The magic number of")
      value = text[at:].split(" is ")[1].split(".")[0]
      answer = value if at < len(text) / 2 else "unknown"
      out.append(TOK.encode(f" {answer}.").tolist())
    return out


def test_default_needles_and_prompt():
  assert len(needle.DEFAULT_DEPTHS) == 17
  assert needle.DEFAULT_DEPTHS[0] == 0.0 and needle.DEFAULT_DEPTHS[-1] == 1.0
  needles = needle.default_needles(2, seed=0)
  assert len(needles) == 2 and needles[0].answer.isdigit()
  hay = needle.haystack_tokens(TOK, 400, seed=0)
  for depth in (0.0, 0.3, 1.0):
    ids = needle.build_prompt(TOK, hay, 300, depth, needles[0])
    assert abs(len(ids) - 300) <= 2 and ids[0] == TOK.bos_id
    text = TOK.decode(ids)
    assert text.endswith(needles[0].question)
    at = text.index(needles[0].sentence)
    assert at == 0 or text[:at].rstrip().endswith(".")  # backed up to a sentence boundary
    assert at <= depth * len(text) + 2


def test_insertion_point_backs_up_to_sentence_start():
  text = "One two. Three four five. Six."
  assert needle.insertion_point(text, 0.0) == 0
  assert needle.insertion_point(text, 0.5) == text.index("Three")
  assert needle.insertion_point(text, 1.0) == len(text)


def test_heatmap_data_equals_cells_and_resume(tmp_path):
  needles = needle.default_needles(2, seed=0)
  out = str(tmp_path / "run")
  with pytest.raises(KeyboardInterrupt):
    needle.run_needle(Oracle(fail_after=2), TOK, GRID, needles, out, progress=False)
  cells = [json.loads(l) for l in open(os.path.join(out, needle.CELLS_FILE))]
  assert len(cells) == 2 * len(needles)  # two finished cells were kept
  oracle = Oracle()
  report = needle.run_needle(oracle, TOK, GRID, needles, out, progress=False)
  assert oracle.calls == len(GRID.cells()) - 2  # only the missing cells ran
  saved = json.load(open(os.path.join(out, needle.REPORT_FILE)))
  cells = [json.loads(l) for l in open(os.path.join(out, needle.CELLS_FILE))]
  assert len(cells) == len(GRID.cells()) * len(needles)
  for i, n in enumerate(GRID.lengths):
    for j, d in enumerate(GRID.depths):
      found = [c["correct"] for c in cells if c["length"] == n and c["depth"] == d]
      assert len(found) == len(needles)
      assert saved["grid"][i][j] == pytest.approx(np.mean(found))
  assert saved["grid"] == report["grid"]
  # The oracle finds needles in the first half only: depth 0 found, depth 1 missed.
  assert [row[0] for row in saved["grid"]] == [1.0, 1.0]
  assert [row[-1] for row in saved["grid"]] == [0.0, 0.0]
  assert os.path.getsize(os.path.join(out, needle.HEATMAP_FILE)) > 1000
  again = Oracle()
  needle.run_needle(again, TOK, GRID, needles, out, progress=False)
  assert again.calls == 0
  with pytest.raises(ValueError, match="different run"):
    needle.run_needle(Oracle(), TOK, GRID, needles, out, seed=5, progress=False)


@pytest.mark.slow
def test_command_on_tiny_checkpoint(tiny_checkpoint, tmp_path):
  hay = tmp_path / "hay.txt"
  hay.write_text("Rivers run to the sea. Mountains stand still! Cities grow slowly. " * 3)
  out = tmp_path / "needle"
  assert cli(["needle", f"--checkpoint={tiny_checkpoint}", "--lengths=128,192", "--depths=0,1",
              "--num_needles=2", f"--haystack={hay}", f"--out={out}"]) == 0
  report = json.loads((out / needle.REPORT_FILE).read_text())
  assert np.array(report["grid"]).shape == (2, 2)
  assert (out / needle.HEATMAP_FILE).exists()
  assert cli(["needle", f"--checkpoint={tiny_checkpoint}", f"--haystack={tmp_path}/missing.txt",
              f"--out={out}"]) == 2
