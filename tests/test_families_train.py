"""Every model family through the trainer (configs/finetune_hf.py, `init.kind=hf`: the
architecture from the directory) on 8 emulated devices, mesh data=2 x seq=4, with the chunked
loss and MLP, remat keeping `qkv` and offloading `layer_input`; and through the eval commands
against transformers.

Quick tier: one strategy per family, LoRA + S²-Attn on Phi-3 with its PEFT export. Slow tier
(`-m slow`): every context-parallel strategy the head counts allow on every family, whose losses
must equal each other's, and LoRA + S²-Attn on every family without sliding layers (Gemma 3's
are refused with S²-Attn: tests/test_model_window.py).
"""
import dataclasses
import json

import numpy as np
import peft
import pytest
import torch
import transformers

import longctx
from longctx import convert
from longctx.eval import __main__ as eval_main
from longctx.train import loop
from longctx.train.config import read_stages
from longctx.train.metrics import read_metrics
from tests.hf_models import FAMILIES, FAMILY_TEXT, finetune_config, save_family_dir

# End to end (subprocesses, real model or full training runs): the quick loop skips it.
pytestmark = pytest.mark.slow

STRATEGIES = {"ring": {}, "all_gather": {}, "ulysses": {},
              "hybrid": {"attention.ulysses_devices": 2}}
MEMORY = {"model.remat": "full", "model.remat_save": "qkv", "model.remat_offload": "layer_input"}
LORA = {"lora.enabled": True, "lora.targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj"}
# One representative run per family in the quick tier.
QUICK = {"qwen2": "ring", "qwen3": "ulysses", "mistral": "all_gather", "phi3": "hybrid",
         "gemma3": "ring"}
LOSS_RTOL = 1e-5  # float32: the strategies differ only in the order of sums


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
  """{family: an HF directory of its tiny model, with tokenizer and chat template}."""
  dirs = {name: tmp_path_factory.mktemp(name) for name in FAMILIES}
  for name, path in dirs.items():
    save_family_dir(name, path)
  return dirs


def train(init_path, workdir, overrides) -> list[float]:
  """Two steps of configs/finetune_hf.py from `init_path`; the logged losses."""
  config = finetune_config(init_path, {**MEMORY, **overrides})
  (stage,) = read_stages(config)
  assert stage.model.family == json.loads((init_path / "config.json").read_text())["model_type"]
  loop.run(config, str(workdir), log=lambda *_: None)
  return [r["loss"] for r in read_metrics(str(workdir / "main")) if "loss" in r]


def assert_two_finite_steps(losses):
  assert len(losses) == 2 and all(np.isfinite(losses)), losses


def _strategy(name: str) -> dict:
  return {"attention.strategy": name, **STRATEGIES[name]}


@pytest.fixture(scope="module")
def strategy_losses(family_dirs, tmp_path_factory):
  """losses(family, strategy): the two steps' losses, each run once per module (the quick and
  the slow tier share the representative runs)."""
  cache = {}

  def losses(family, strategy):
    if (family, strategy) not in cache:
      workdir = tmp_path_factory.mktemp(f"{family}_{strategy}")
      cache[family, strategy] = train(family_dirs[family], workdir, _strategy(strategy))
    return cache[family, strategy]
  return losses


@pytest.mark.parametrize("family", sorted(QUICK))
def test_two_steps_on_every_family(family, strategy_losses):
  assert_two_finite_steps(strategy_losses(family, QUICK[family]))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_strategy_gives_the_same_losses(family, strategy_losses):
  reference = strategy_losses(family, QUICK[family])
  assert_two_finite_steps(reference)  # assert_allclose would count NaN equal to NaN
  for strategy in STRATEGIES:
    np.testing.assert_allclose(strategy_losses(family, strategy), reference, rtol=LOSS_RTOL,
                               err_msg=f"{family}: {strategy} against {QUICK[family]}")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"phi3", "gemma3"}))
def test_lora_with_s2_attention_trains(family, family_dirs, tmp_path):
  assert_two_finite_steps(train(family_dirs[family], tmp_path,
                                {**LORA, **_strategy(QUICK[family])}))


def test_phi3_lora_s2_run_exports_to_peft_on_the_fused_modules(family_dirs, tmp_path):
  """LoRA + S²-Attn on Phi-3 under the hybrid strategy; the final checkpoint's adapters, on
  q/k/v and gate/up in separate projections, load into PEFT on qkv_proj / gate_up_proj."""
  path = family_dirs["phi3"]
  assert_two_finite_steps(train(path, tmp_path / "run", {**LORA, **_strategy("hybrid")}))
  final = tmp_path / "run" / "main" / "final"
  assert convert.main(["to-peft", str(final), str(tmp_path / "adapter"), "--no_progress"]) == 0
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert config["target_modules"] == ["gate_up_proj", "o_proj", "qkv_proj"]
  tokens = np.random.default_rng(0).integers(3, 320, size=(1, 48), dtype=np.int32)
  ours = np.asarray(longctx.load_pretrained(str(final), progress=False)(tokens))
  base = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))(
        torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(theirs - ours).max() < 5e-4


# ---- the eval commands -----------------------------------------------------------------------

def _window_nll(model, window) -> float:
  with torch.no_grad():
    logits = model(window[:, :-1]).logits.double()
  return float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_perplexity_command_equals_transformers_nll(family, family_dirs, tmp_path):
  """Windows of 96 tokens: past Phi-3's LongRoPE switch and YaRN's original length."""
  path = family_dirs[family]
  (tmp_path / "doc.txt").write_text(FAMILY_TEXT)
  out = tmp_path / "ppl.json"
  assert eval_main.main(["perplexity", "--checkpoint", str(path), "--tokenizer",
                         str(path / "tokenizer.json"), "--data", str(tmp_path / "doc.txt"),
                         "--lengths", "96", "--stride", "96", "--max_windows", "2",
                         "--out", str(out)]) == 0
  report = json.loads(out.read_text())["results"][0]
  from longctx.data.tokenizers import HFTokenizer
  tok = HFTokenizer(str(path / "tokenizer.json"))
  ids = [tok.bos_id] + tok.encode(FAMILY_TEXT).tolist()
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
  want = [_window_nll(hf_model, torch.as_tensor([ids[s:s + 97]])) for s in (0, 96)]
  np.testing.assert_allclose(report["window_losses"], want, rtol=2e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_passkey_command_generates_transformers_answers(family, family_dirs, tmp_path):
  path = family_dirs[family]
  out = tmp_path / "passkey.json"
  assert eval_main.main(["passkey", "--checkpoint", str(path), "--tokenizer",
                         str(path / "tokenizer.json"), "--lengths", "100", "--trials", "2",
                         "--out", str(out)]) == 0
  report = json.loads(out.read_text())
  from longctx.data.tokenizers import HFTokenizer
  from longctx.eval import passkey
  tok = HFTokenizer(str(path / "tokenizer.json"))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
  for result, example in zip(report["results"], passkey.passkey_examples(tok, 100, 2, 0)):
    prompt = [tok.bos_id] + tok.encode(example.prompt).tolist()
    with torch.no_grad():
      ids = hf_model.generate(torch.as_tensor([prompt]), max_new_tokens=passkey.NEW_TOKENS,
                              do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    new = [t for t in ids[0, len(prompt):].tolist() if t != tok.eos_id]
    assert result["generated"] == tok.decode(new)


def test_the_architecture_comes_from_the_directory_lists_included(family_dirs):
  """init.kind=hf: every architecture field, LongRoPE's factor lists included, comes from
  config.json through model_section(from_init=True); an ABF override keeps the lists."""
  from longctx.model import ModelConfig
  from longctx.train.architecture import ARCHITECTURE_FIELDS
  for family, path in family_dirs.items():
    (stage,) = read_stages(finetune_config(path))
    want = ModelConfig.from_directory(str(path))
    assert {k: getattr(stage.model, k) for k in ARCHITECTURE_FIELDS} == {
        k: getattr(want, k) for k in ARCHITECTURE_FIELDS}, family
  (abf,) = read_stages(finetune_config(family_dirs["phi3"], {"model.rope.theta": 1e5}))
  want = ModelConfig.from_directory(str(family_dirs["phi3"]))
  assert abf.model.rope == dataclasses.replace(want.rope, theta=1e5)
  assert abf.model.rope.long_factor == (2.5, 7.0, 19.0)
