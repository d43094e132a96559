"""Passkey (LongLoRA's protocol): prompts, exact-match scoring, the command on a tiny checkpoint."""
import json

import numpy as np
import pytest

import longctx
from longctx.data.tokenizers import ByteTokenizer, train_bpe_tokenizer
from longctx.eval import passkey
from longctx.eval.__main__ import main as cli
from longctx.eval.testing import TINY_CONFIG as TINY
from longctx.eval.testing import make_tiny_checkpoint

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "eval_tiny_checkpoint")


class Oracle:
  """Reads the key out of the prompt (or a wrong one for odd keys): tests the scoring wiring."""
  config = TINY

  def __init__(self, wrong_when_odd=False, fail_after=None):
    self.wrong_when_odd, self.fail_after = wrong_when_odd, fail_after
    self.calls = self.prompts = 0

  def generate(self, prompts, max_new_tokens, temperature, eos_token_id):
    assert temperature == 0.0  # greedy
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise KeyboardInterrupt("simulated interruption")
    self.calls += 1
    self.prompts += len(prompts)
    out = []
    for p in prompts:
      text = TOK.decode(p)
      key = passkey.first_integer(text[text.index("The pass key is"):])
      if self.wrong_when_odd and key % 2:
        key += 1
      out.append(TOK.encode(f" {key}. The").tolist()[:max_new_tokens])
    return out


def test_prompts_have_the_requested_length_and_contain_the_key():
  for length in (300, 1000):
    examples = passkey.passkey_examples(TOK, length, 3, seed=0)
    for ex in examples:
      n = len(TOK.encode(ex.prompt)) + 1
      assert abs(n - length) <= len(passkey.synthetic.PASSKEY_FILLER)
      assert f"The pass key is {ex.passkey}. Remember it." in ex.prompt
      assert ex.prompt.endswith("What is the pass key? The pass key is")
      assert 1 <= ex.passkey <= 50000
  assert passkey.passkey_examples(TOK, 300, 3, 0) == passkey.passkey_examples(TOK, 300, 3, 0)


class PairTokenizer(ByteTokenizer):
  """Two characters per token: checks that lengths are fitted in tokens, not characters."""

  def encode(self, text):
    return np.full((len(text) + 1) // 2, 7, np.int32)


def test_lengths_are_in_tokens_of_the_tokenizer():
  tok = PairTokenizer()
  for ex in passkey.passkey_examples(tok, 800, 2, seed=0):
    assert abs(len(tok.encode(ex.prompt)) + 1 - 800) <= len(passkey.synthetic.PASSKEY_FILLER) // 2


def test_exact_match_scoring():
  report = passkey.run_passkey(Oracle(), TOK, [300, 600], trials=4, seed=1)
  assert report["accuracy"] == {300: 1.0, 600: 1.0}
  report = passkey.run_passkey(Oracle(wrong_when_odd=True), TOK, [300], trials=6, seed=1)
  expected = np.mean([r["passkey"] % 2 == 0 for r in report["results"]])
  assert report["accuracy"][300] == pytest.approx(expected)
  assert passkey.first_integer(" 123.") == 123 and passkey.first_integer(" 1234") == 1234
  assert passkey.first_integer(" none") is None


def test_command_on_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
  out = tmp_path / "passkey.json"
  rc = cli(["passkey", f"--checkpoint={tiny_checkpoint}", "--lengths=200,400", "--trials=2",
            f"--out={out}"])
  assert rc == 0
  report = json.loads(out.read_text())
  assert set(report["accuracy"]) == {"200", "400"}
  assert len(report["results"]) == 4
  printed = capsys.readouterr()
  assert "accuracy" in printed.out and "tokenizer  byte" in printed.out
  assert f"tokenizer: byte (no tokenizer.json or tokenizer.model in {tiny_checkpoint}" in (
      printed.err)
  assert (report["tokenizer"], report["attention"], report["model_rope"]) == (
      "byte", "tiled", {"rope_type": "default", "theta": 10000.0})
  # The generated text is the model's greedy continuation.
  model = longctx.load_pretrained(tiny_checkpoint)
  r = report["results"][0]
  ex = passkey.passkey_examples(TOK, 200, 2, 0)[0]
  ids = model.generate([[1] + TOK.encode(ex.prompt).tolist()], max_new_tokens=passkey.NEW_TOKENS,
                       eos_token_id=2)[0]
  assert r["generated"] == TOK.decode([t for t in ids if t != 2])


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
  """A small byte-level BPE tokenizer.json trained here on the passkey filler."""
  return train_bpe_tokenizer([passkey.synthetic.PASSKEY_FILLER * 20 + passkey.synthetic.PASSKEY_TASK],
                             tmp_path_factory.mktemp("bpe") / "tokenizer.json", 400)


def test_bpe_tokenizer_lengths_and_vocab_mismatch(bpe_path, tiny_checkpoint, tmp_path, capsys):
  from longctx.eval import common
  tok = common.tokenizer_from_flag(bpe_path)
  for ex in passkey.passkey_examples(tok, 500, 2, seed=0):
    n = len(tok.encode(ex.prompt)) + 1
    assert abs(n - 500) <= 40, n  # one filler repetition is ~25 BPE tokens here
  rc = cli(["passkey", f"--checkpoint={tiny_checkpoint}", f"--tokenizer={bpe_path}",
            "--lengths=200", f"--out={tmp_path}/p.json"])
  assert rc == 2
  err = capsys.readouterr().err
  assert f"tokenizer has {tok.vocab_size} ids but the model's vocabulary has 260" in err


def test_depth_grid_places_the_key_at_each_depth_and_draws_the_heatmap(tmp_path):
  depths = [0.0, 0.5, 1.0]
  for d in depths:
    for ex in passkey.passkey_examples(TOK, 1500, 2, seed=0, depth=d):
      assert ex.depth == d
      at = ex.prompt.index("The pass key is") / len(ex.prompt)
      assert abs(at - d) < 0.2, (d, at)
  report = passkey.run_passkey(Oracle(wrong_when_odd=True), TOK, [400, 800], trials=3, seed=2,
                               depths=depths)
  assert report["depths"] == depths and len(report["results"]) == 2 * 3 * 3
  for i, n in enumerate([400, 800]):
    for j, d in enumerate(depths):
      rows = [r for r in report["results"] if r["length"] == n and r["depth"] == d]
      assert len(rows) == 3
      assert report["grid"][i][j] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert report["accuracy"][n] == pytest.approx(np.mean(report["grid"][i]))
  assert "50%" in passkey.format_report(report)
  passkey.plot_heatmap(report, str(tmp_path / "h.png"))
  assert (tmp_path / "h.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="depths must lie in"):
    passkey.run_passkey(Oracle(), TOK, [400], depths=[1.5])


def test_command_depths_and_heatmap(tiny_checkpoint, tmp_path):
  rc = cli(["passkey", f"--checkpoint={tiny_checkpoint}", "--lengths=200", "--trials=1",
            "--depths=0,1", f"--heatmap={tmp_path}/h.png", f"--out={tmp_path}/p.json"])
  assert rc == 0
  report = json.loads((tmp_path / "p.json").read_text())
  assert np.shape(report["grid"]) == (1, 2) and (tmp_path / "h.png").exists()
  assert cli(["passkey", f"--checkpoint={tiny_checkpoint}", "--lengths=200",
              f"--heatmap={tmp_path}/x.png", f"--out={tmp_path}/q.json"]) == 2


def test_an_interrupted_run_resumes_to_the_uninterrupted_report(tmp_path):
  cache = str(tmp_path / "pk")
  run = dict(lengths=[300, 600], trials=5, seed=3, batch_size=2, cache=cache, run_info={"m": 1})
  with pytest.raises(KeyboardInterrupt):  # killed after 4 of the 6 batches
    passkey.run_passkey(Oracle(wrong_when_odd=True, fail_after=4), TOK, **run)
  assert len(open(cache + ".trials.jsonl").read().splitlines()) == 7  # batches of 2, 2, 1
  with open(cache + ".trials.jsonl", "a") as f:
    f.write('{"length": 600, "tri')  # a write cut off by the kill is redone
  oracle = Oracle(wrong_when_odd=True)
  resumed = passkey.run_passkey(oracle, TOK, **run)
  assert oracle.prompts == 3  # only the three missing trials ran
  whole = passkey.run_passkey(Oracle(wrong_when_odd=True), TOK, **{**run, "cache": None})
  assert resumed["results"] == whole["results"] and resumed["accuracy"] == whole["accuracy"]
  more = Oracle(wrong_when_odd=True)
  passkey.run_passkey(more, TOK, **{**run, "trials": 6})
  assert more.prompts == 2  # one new trial per length
  with pytest.raises(ValueError, match="different run"):
    passkey.run_passkey(Oracle(), TOK, **{**run, "run_info": {"m": 2}})


def test_command_resumes_from_its_trials_file(tiny_checkpoint, tmp_path, capsys):
  out = tmp_path / "pk.json"
  args = ["passkey", f"--checkpoint={tiny_checkpoint}", "--lengths=200", "--trials=2",
          f"--out={out}"]
  assert cli(args) == 0
  first = json.loads(out.read_text())
  assert len((tmp_path / "pk.trials.jsonl").read_text().splitlines()) == 2
  assert cli(args) == 0 and json.loads(out.read_text())["results"] == first["results"]
  assert cli(args + ["--rope=linear,factor=2"]) == 2  # cached trials never mix RoPEs
  assert "different run (differs in ['model_rope', 'rope'])" in capsys.readouterr().err
