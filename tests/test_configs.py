"""Every config in configs/ loads, is locked, explains itself and passes the stage checks; the
cluster launchers in launch/ parse (DESIGN.md contract 4, STYLE.md 6)."""
import dataclasses
import functools
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from longctx.data.config import DataConfig
from longctx.model.config import ModelConfig
from longctx.train.config import read_stages, stage_config

from tests.helpers import config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
TRAINING = [p for p in CONFIGS if os.path.basename(p) != "data_example.py"]  # data section only
LAUNCH = os.path.join(ROOT, "launch")


def _name(path):
  return os.path.basename(path)[:-3]


_module = config_module


def test_configs_exist():
  names = {_name(p) for p in CONFIGS}
  assert {"tiny", "data_example", "llama2_7b_longalign_64k", "xverse_13b_abf_ntk_256k",
          "llama2_7b_longlora_100k"} <= names, names


@functools.lru_cache(maxsize=1)
def _hf_config_dir() -> str:
  """An HF directory with a config.json and a tokenizer.json, no weights: what a recipe whose
  architecture and tokenizer come from init.path (configs/finetune_hf.py) reads."""
  from longctx.data.tokenizers import train_bpe_tokenizer
  d = tempfile.mkdtemp(prefix="hf-config-")
  train_bpe_tokenizer(["a small corpus for a small tokenizer"], os.path.join(d, "tokenizer.json"),
                      300)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(ModelConfig(num_heads=4, num_kv_heads=2, max_position_embeddings=4096).to_hf(), f)
  return d


def _variants(path):
  """get_config() and, for a config with variants (module ARGS: the args it takes), each one;
  a config that takes its architecture from the init checkpoint gets a small HF directory."""
  module = _module(path)
  configs = [module.get_config()] + [module.get_config(a) for a in getattr(module, "ARGS", ())]
  for config in configs:
    if not config.init.path and None in config.model.to_dict().values():
      config.init.path = _hf_config_dir()
  return configs


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_is_locked_and_documented(path):
  module = _module(path)
  config = module.get_config()
  assert isinstance(config, ml_collections.ConfigDict) and config.is_locked
  if hasattr(module, "ARGS"):  # a config with variants refuses an arg it does not know
    with pytest.raises(ValueError, match="ARG: expected one of"):
      module.get_config("unused-arg")
  else:
    assert module.get_config("unused-arg").to_dict() == config.to_dict()  # get_config(arg)
  doc = module.__doc__ or ""
  for word in ("Run", "Hardware"):
    assert f"{word}:" in doc, f"{_name(path)}: the docstring should say `{word}:`"
  assert "python -m longctx." in doc, f"{_name(path)}: the docstring should give the command"
  if config.data.tokenizer_path or config.data.tokenizer == "byte":  # else: init.path's
    DataConfig.from_config_dict(config.data)


@pytest.mark.parametrize("path", TRAINING, ids=_name)
def test_every_stage_reads(path):
  for config in _variants(path):
    stages = read_stages(config)
    assert stages and all(s.train.steps > 0 for s in stages)


@pytest.mark.parametrize("path", TRAINING, ids=_name)
def test_rows_and_lengths_fit_the_mesh(path):
  """What the trainer checks against the devices, checked here for the axes a config fixes."""
  for config in _variants(path):
    _check_rows_and_lengths(path, config)


def _check_rows_and_lengths(path, config):
  from longctx.model.chunking import check_chunk
  mesh = config.mesh
  for stage in read_stages(config):
    where = f"{_name(path)} stage {stage.name}"
    rows = stage.data.num_shards * stage.data.batch_size
    if mesh.data > 0 and mesh.fsdp > 0:
      assert rows % (mesh.data * mesh.fsdp) == 0, f"{where}: {rows} rows per micro-batch"
    parts = 2 * mesh.seq if stage.attention.layout == "zigzag" else mesh.seq
    assert stage.data.max_len % parts == 0, f"{where}: max_len over seq={mesh.seq}"
    assert stage.data.max_len % stage.data.pad_multiple == 0, where
    if stage.lora.enabled and stage.lora.s2_group_fraction:
      group = stage.data.max_len * stage.lora.s2_group_fraction
      assert group == int(group) and int(group) % 2 == 0, f"{where}: S²-Attn group {group}"
    check_chunk(stage.data.max_len, mesh.seq, stage.train.loss_chunk, f"{where} loss_chunk")
    check_chunk(stage.data.max_len, mesh.seq, stage.model.mlp_chunk, f"{where} mlp_chunk")


def _parse_flags(path, *overrides):
  argv = ["prog", f"--config={path}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("path", TRAINING, ids=_name)
def test_command_line_overrides(path):
  config = _parse_flags(path, "--config.train.steps=7")
  assert config.train.steps == 7 and config.is_locked
  with pytest.raises((AttributeError, KeyError, flags.Error)):
    _parse_flags(path, "--config.train.stepz=7")


@pytest.mark.parametrize("path", TRAINING, ids=_name)
def test_stage_override_of_an_unknown_key_is_named(path):
  config = _module(path).get_config()
  bad = ml_collections.ConfigDict({"train": {"stepz": 1}})
  with config.unlocked():
    if "stages" in config and config.stages:
      config.stages.bad = bad
    else:
      config.stages = ml_collections.ConfigDict({"bad": bad})
  with pytest.raises(ValueError, match=r"stages\.bad\.train\.stepz"):
    stage_config(config, "bad")


def _stages(name):
  config = _module(os.path.join(ROOT, "configs", f"{name}.py")).get_config()
  return config, {s.name: s for s in read_stages(config)}


def test_recipe_numbers():
  """The numbers the recipes take from their papers (METHODS.md §1–§3)."""
  _, s = _stages("llama2_7b_longalign_64k")
  main = s["main"]
  assert main.model.rope.theta == 2e6 and main.data.max_len == 65536
  assert main.data.num_shards * main.data.batch_size * main.train.micro_batches == 8  # packs / step
  assert main.train.learning_rate == 2e-5 and main.data.objective.value == "sequence"

  _, s = _stages("llama2_7b_longlora_100k")
  main = s["main"]
  assert main.model.rope.factor == math.ceil(100_000 / 4096) == 25
  assert main.data.max_len == 25 * main.model.max_position_embeddings
  assert main.data.num_shards * main.data.batch_size * main.train.micro_batches == 64
  assert (main.lora.enabled, main.lora.rank, main.lora.alpha) == (True, 8, 16.0)
  assert main.train.schedule.value == "constant" and main.train.warmup_steps == 20
  assert main.train.steps == 1000 and main.train.weight_decay == 0.0

  config, s = _stages("xverse_13b_abf_ntk_256k")
  assert config.stage_order == "abf,ntk"
  assert s["abf"].model.rope.rope_type == "default" and s["abf"].model.rope.theta == 500_000
  assert s["abf"].data.max_len == 32_768
  ntk = s["ntk"].model.rope
  assert (ntk.rope_type, ntk.theta, ntk.trained_length, ntk.target_length) == (
      "xverse_ntk", 500_000, 32_768, 262_144)
  assert s["ntk"].data.max_len == 262_144


def test_passkey_reproduction_documents_fit_their_rows():
  """configs/tiny_passkey.py: its longest documents fit a row with BOS and EOS (none dropped)
  and come within about three filler sentences of it."""
  import numpy as np
  from longctx.data import synthetic
  from longctx.data.tokenizers import make_tokenizer
  config, s = _stages("tiny_passkey")
  for stage in s.values():
    tok = make_tokenizer(stage.data.tokenizer, stage.data.tokenizer_path)
    assert tok.vocab_size <= stage.model.vocab_size
    longest = max(len(tok.encode(ex.prompt + ex.answer)) + 2 for ex in (
        synthetic.passkey(np.random.default_rng([0, i]), stage.data.source.max_tokens)
        for i in range(20)))
    assert stage.data.max_len - 80 < longest <= stage.data.max_len, (stage.name, longest)
    assert stage.model.max_position_embeddings == stage.data.max_len


# ---- launchers -----------------------------------------------------------------------------------
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) +
                 glob.glob(os.path.join(LAUNCH, "*.sbatch")))


def test_launchers_exist():
  names = {os.path.basename(p) for p in glob.glob(os.path.join(LAUNCH, "*"))}
  assert {"slurm_gpu.sbatch", "tpu_pod.sh", "k8s_jobset.yaml", "README.md"} <= names, names


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_shell_scripts_parse_and_dry_run(path, tmp_path):
  subprocess.run(["bash", "-n", path], check=True, capture_output=True, text=True)
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(DRY_RUN="1", TMPDIR=str(tmp_path))
  result = subprocess.run(["bash", path, "--config.train.steps=5"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert "longctx.launch" in result.stdout and "--config.train.steps=5" in result.stdout


def _jobset():
  yaml = pytest.importorskip("yaml")
  with open(os.path.join(LAUNCH, "k8s_jobset.yaml")) as f:
    return yaml.safe_load(f)


def test_jobset_parses_and_names_every_process():
  jobset = _jobset()
  assert jobset["kind"] == "JobSet"
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
  container = job["template"]["spec"]["containers"][0]
  env = {e["name"]: e.get("value") for e in container["env"]}
  assert int(env["NUM_PROCESSES"]) == job["parallelism"]
  command = " ".join(container["args"])
  for flag in ("--coordinator_address=", "--num_processes=${NUM_PROCESSES}",
               "--process_id=${JOB_COMPLETION_INDEX}"):
    assert flag in command


def _sbatch_xla_flags():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "XLA_FLAGS"}
  out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch")],
                       env={**env, "DRY_RUN": "1"}, cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  line = next(l for l in out.splitlines() if l.startswith("XLA_FLAGS="))
  return line.split("=", 1)[1].split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_xla_flags_are_known_to_this_jaxlib():
  """XLA aborts on an unknown flag; the GPU flags of the launchers must exist in the pinned XLA
  (they parse on any backend, so the CPU build checks them)."""
  xla_flags = _sbatch_xla_flags()
  try:
    jobset = _jobset()
  except pytest.skip.Exception:
    jobset = None
  if jobset is not None:
    container = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]
    xla_flags += next(e["value"] for e in container["env"] if e["name"] == "XLA_FLAGS").split()
  assert xla_flags
  env = {**os.environ, "XLA_FLAGS": " ".join(xla_flags), "JAX_PLATFORMS": "cpu"}
  program = "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready()"
  result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_every_section_is_its_dataclass():
  """One mechanism (longctx.schema): each section's ConfigDict defaults are derived from its
  dataclass and read back to the dataclass's defaults; no section has a hand-kept copy."""
  from longctx import schema
  from longctx.data.config import SourceConfig, default_config
  from longctx.train.config import SECTIONS
  for name, cls in {**SECTIONS, "data": DataConfig}.items():
    assert schema.read(cls, schema.defaults(cls), name) == cls(), name
  section = default_config()
  assert set(section.keys()) == {f.name for f in dataclasses.fields(DataConfig)}
  assert set(section.source.keys()) == {f.name for f in dataclasses.fields(SourceConfig)}
  assert DataConfig.from_config_dict(section).num_shards == 1


@pytest.mark.parametrize("key, value, message", [
    ("num_shards", 0, "config data.num_shards: expected > 0, found 0"),
    ("source.kind", "csv", "config data.source.kind: expected one of 'synthetic', 'jsonl', "
     "'parquet', 'array_record', found 'csv'"),
    ("source.weights", "1,2", "config data.source.weights: expected 0 weights (one per path), "
     "found 2"),
    ("max_len", 1000, "config data.max_len: expected a multiple of pad_multiple=128, found 1000"),
    ("tokenizer", "HF", "config data.tokenizer_path: expected a local file for tokenizer 'hf'"),
])
def test_a_bad_data_value_names_the_key(key, value, message):
  from longctx.data.config import default_config
  from longctx.errors import ConfigError
  section = default_config()
  section.update_from_flattened_dict({key: value})
  with pytest.raises(ConfigError, match=re.escape(message)):
    DataConfig.from_config_dict(section)


def test_old_attention_names_read_as_the_new_ones(capsys, monkeypatch):
  """A config written before the renamings (docs/DESIGN.md, "Glossary") reads the same."""
  from longctx import names
  from longctx.train.config import LoraConfig, attention_spec, default_config
  monkeypatch.setattr(names, "_NOTED", set())  # the note is said once per process
  old, new = default_config().attention, default_config().attention
  old.impl, old.kernel = "blockwise", "blockwise"
  new.impl, new.kernel = "tiled", "xla"
  assert attention_spec(old, LoraConfig(), 256) == attention_spec(new, LoraConfig(), 256)
  assert "'blockwise' is now called 'tiled'" in capsys.readouterr().err
