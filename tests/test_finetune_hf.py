"""Fine-tuning a local HF directory (configs/finetune_hf.py): the architecture, RoPE, special
tokens and tokenizer come from the directory; config.model only overrides."""
import json
import os

import numpy as np
import pytest
import transformers

from longctx.data.tokenizers import train_bpe_tokenizer
from longctx.model.config import ModelConfig
from longctx.model.rope import LinearRope, YarnRope
from longctx.train import loop
from longctx.train.architecture import ARCHITECTURE_FIELDS
from longctx.train.config import read_stages
from longctx.train.metrics import read_metrics
from tests.hf_models import ROOT, finetune_config

TEXT = "the quick brown fox jumps over the lazy dog; long context models read many tokens. " * 40


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A random HF Llama with GQA, linear rope_scaling and a tied head, and its own tokenizer."""
  d = tmp_path_factory.mktemp("hf")
  config = transformers.LlamaConfig(
      vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0})
  transformers.LlamaForCausalLM(config).save_pretrained(d)
  train_bpe_tokenizer([TEXT], d / "tokenizer.json", 320)
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template":
       "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
       "{% if add_generation_prompt %}assistant: {% endif %}"}))
  return d


def _architecture(cfg: ModelConfig) -> dict:
  return {k: v for k, v in cfg.to_dict().items() if k in ARCHITECTURE_FIELDS}


@pytest.mark.slow
def test_the_architecture_and_tokenizer_come_from_the_directory(hf_dir, tmp_path):
  want = ModelConfig.from_hf(json.loads((hf_dir / "config.json").read_text()))
  config = finetune_config(hf_dir)
  (stage,) = read_stages(config)
  assert _architecture(stage.model) == _architecture(want)
  assert stage.model.rope == LinearRope(theta=20000.0, factor=2.0)
  assert stage.data.tokenizer_path == str(hf_dir / "tokenizer.json")
  summaries = loop.run(config, str(tmp_path / "run"), log=lambda *_: None)
  assert summaries[0].last_loss is not None and np.isfinite(summaries[0].last_loss)
  assert len([r for r in read_metrics(str(tmp_path / "run" / "main")) if "loss" in r]) == 2
  final = tmp_path / "run" / "main" / "final"
  assert (final / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
  assert (final / "tokenizer_config.json").exists()


def test_config_model_overrides_the_checkpoint(hf_dir):
  (abf,) = read_stages(finetune_config(hf_dir, {"model.rope.theta": 1e6}))
  assert abf.model.rope == LinearRope(theta=1e6, factor=2.0)
  (yarn,) = read_stages(finetune_config(hf_dir, {
      "model.rope.rope_type": "yarn", "model.rope.factor": 4.0,
      "model.max_position_embeddings": 1024}))
  assert yarn.model.rope == YarnRope(theta=20000.0, factor=4.0,
                                     original_max_position_embeddings=256)
  assert yarn.model.max_position_embeddings == 1024 and yarn.model.num_layers == 2
  with pytest.raises(ValueError, match=r"rope_type 'linear' has keys \['theta', 'factor'\]"):
    read_stages(finetune_config(hf_dir, {"model.rope.beta_fast": 8.0}))


def test_an_override_the_checkpoint_cannot_take_names_both(hf_dir, tmp_path):
  config = finetune_config(hf_dir, {"model.num_layers": 3})
  with pytest.raises(ValueError, match=r"'num_layers': \(3, 2\)"):
    loop.run(config, str(tmp_path / "run"), log=lambda *_: None)


def test_unset_architecture_without_an_init_checkpoint_is_an_error(hf_dir):
  with pytest.raises(ValueError, match=r"stages.main.model: \[.*'num_layers'.*\] unset; they "
                                       r"come from the init checkpoint"):
    read_stages(finetune_config(hf_dir, {"init.kind": "random"}))


@pytest.mark.slow
def test_data_inspect_takes_the_tokenizer_of_the_init_directory(hf_dir):
  """`python -m longctx.data inspect` on configs/finetune_hf.py with only init.path: the
  tokenizer (and the model's chat template beside it) come from the directory, as in training."""
  import subprocess
  import sys
  cmd = [sys.executable, "-m", "longctx.data", "inspect", "--config=configs/finetune_hf.py",
         f"--config.init.path={hf_dir}", "--config.data.source.num_examples=4",
         "--config.data.source.max_tokens=512", "--config.data.max_len=512", "--json",
         "--max_batches=1"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["counts"]["kept"] > 0
