"""The trainer (exact resume at every kill point: test_faults.py): mesh and layout invariance
of the loss and gradients, micro-batch invariance, two hosts = one host, and clear errors before
any compute."""
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from longctx.parallel.mesh import make_mesh
from longctx.train import checks, loop
from longctx.attention import AttentionSpec, Tiles
from longctx.train.config import read_stages
from longctx.train.data import GlobalBatches
from longctx.train.metrics import read_metrics
from longctx.train.step import make_loss_and_grads
from tests.helpers import ROOT, SMALL_FLAGS, stop_after, tiny_config
from tests.helpers import losses as _losses

def _grads_on(mesh_sizes, attention, micro_batches=1, rows=8, model=()):
  config = tiny_config({"data.num_shards": 2, "data.batch_size": rows // 2,
                        "train.micro_batches": micro_batches, **dict(model)})
  stage = read_stages(config)[0]
  stage = dataclasses.replace(stage, attention=attention)
  mesh = make_mesh(mesh_sizes)
  runner = loop.StageRunner(stage, mesh, seed=0, log=lambda *_: None)
  params = runner.random_params()
  layout = attention.batch_layout
  batches, denominator, _ = next(GlobalBatches(stage.data, mesh,
                                               micro_batches, layout))
  fn = jax.jit(make_loss_and_grads(runner.numerator_fn))
  loss, grads = fn(params, {}, batches, denominator)
  return float(loss), jax.device_get(grads), (batches, denominator, runner, params)


@functools.lru_cache(maxsize=2)
def _reference_grads(model=()):
  """The data=8 mesh with dense attention (model: config overrides, as (key, value) pairs)."""
  return _grads_on({"data": 8}, AttentionSpec(impl="dense"), model=model)[:2]


def _assert_same(loss, grads, ref_loss, ref_grads):
  assert abs(loss - ref_loss) <= 1e-5
  ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    np.testing.assert_allclose(g, ref[path], rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes,layout", [
    ({"data": 2, "seq": 4}, "zigzag"), ({"fsdp": 2, "seq": 4}, "striped"),
    ({"seq": 8}, "contiguous"), ({"tensor": 2, "seq": 4}, "zigzag"),
])
def test_loss_and_grads_do_not_depend_on_mesh_or_layout(mesh_sizes, layout):
  loss, grads, _ = _grads_on(mesh_sizes, AttentionSpec(layout=layout, tiles=Tiles(64, 64)))
  _assert_same(loss, grads, *_reference_grads())


@pytest.mark.matrix
@pytest.mark.parametrize("strategy", ["all_gather", "ulysses", "hybrid"])
@pytest.mark.parametrize("mesh_sizes", [{"data": 2, "seq": 4}, {"seq": 8}], ids=["2x4", "8"])
def test_every_strategy_gives_the_same_loss_and_grads(strategy, mesh_sizes):
  """The ring's invariance above, for the other strategies (Ulysses on seq=8 with an 8-head
  model: it splits the heads over the devices; the hybrid: Ulysses over 2 × ring over 2, and
  Ulysses over 4 × ring over 2 on seq=8)."""
  model = (("model.num_heads", 8),) if strategy == "ulysses" and mesh_sizes.get("seq") == 8 \
      else ()
  spec = AttentionSpec(strategy=strategy, tiles=Tiles(64, 64), ulysses_devices=(
      0 if strategy != "hybrid" else 2 if mesh_sizes.get("seq") == 4 else 4))
  loss, grads, _ = _grads_on(mesh_sizes, spec, model=model)
  _assert_same(loss, grads, *_reference_grads(model))


@pytest.mark.pallas
def test_pallas_kernel_in_the_trainer(monkeypatch):
  """attention.kernel = "pallas_gpu" reaches every ring step of the model (interpreted on CPU;
  the TPU kernel shares the dispatch but needs chunks of ≥ 128, longer than this test's)."""
  from longctx.attention.kernels import pallas_gpu as module
  kernel, block = "pallas_gpu", 16
  calls = []
  for name in ("forward_for", "backward_for"):
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _fn=fn, _n=name, **k: (
        calls.append(_n), _fn(*a, **k))[1])
  ref_loss, ref_grads = _reference_grads()
  with pytest.warns(UserWarning, match="Pallas' interpreter"):
    loss, grads, _ = _grads_on({"data": 2, "seq": 4}, AttentionSpec(
        layout="zigzag", tiles=Tiles(block, block), kernel=kernel))
  assert set(calls) == {"forward_for", "backward_for"}
  _assert_same(loss, grads, ref_loss, ref_grads)


def test_unknown_attention_kernel(tmp_path):
  with pytest.raises(ValueError, match="config attention.kernel: unknown attention kernel"):
    loop.run(tiny_config({"attention.kernel": "flash9000"}), str(tmp_path), log=lambda *_: None)
  with pytest.raises(ValueError, match="attention.kernel='pallas_gpu' needs impl='context_par"):
    loop.run(tiny_config({"attention.kernel": "pallas_gpu", "attention.impl": "tiled"}),
             str(tmp_path), log=lambda *_: None)


@pytest.mark.parametrize("overrides,match", [
    ({"attention.strategy": "ulysses", "mesh.seq": 8, "mesh.data": 1},
     r"attention.strategy='ulysses' with mesh.seq=8: .*model.num_heads=4 = 4\) .* multiple of 8"),
    ({"attention.strategy": "hybrid"},
     "attention.strategy='hybrid' with attention.ulysses_devices=0: the hybrid needs"),
    ({"attention.strategy": "hybrid", "attention.ulysses_devices": 3},
     "attention.ulysses_devices=3 with mesh.seq=4: .* must divide 4"),
    ({"attention.strategy": "zigzag"}, "attention.strategy: expected one of 'ring', "),
    ({"attention.impl": "ring", "attention.strategy": "all_gather"},
     "impl='ring' with attention.strategy='all_gather'"),
])
def test_bad_strategy_names_the_keys(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    loop.run(tiny_config(overrides), str(tmp_path), log=lambda *_: None)


def test_the_strategy_is_chosen_per_stage():
  import ml_collections
  config = tiny_config()
  with config.unlocked():
    config.stages.long.attention = ml_collections.ConfigDict(
        {"strategy": "hybrid", "ulysses_devices": 2})
    config.stages.short.attention = ml_collections.ConfigDict({"strategy": "all_gather"})
  short, long = read_stages(config)
  assert (short.attention.strategy, long.attention.strategy) == ("all_gather", "hybrid")
  assert (short.attention.ulysses_devices, long.attention.ulysses_devices) == (0, 2)


@pytest.mark.slow
def test_micro_batches_do_not_change_loss_or_grads():
  """The same global batch as two micro-batches of 4 rows or one of 8 rows."""
  loss2, grads2, (batches, denominator, runner, params) = _grads_on(
      {"data": 2, "seq": 4}, AttentionSpec(layout="zigzag", tiles=Tiles(64, 64)),
      micro_batches=2, rows=4)
  one = {k: v.reshape((1, -1) + v.shape[2:]) for k, v in batches.items()}
  loss1, grads1 = jax.jit(make_loss_and_grads(runner.numerator_fn))(
      params, {}, one, denominator.reshape(1, -1))
  assert abs(float(loss1) - loss2) <= 1e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), grads1, grads2)


# ---- bad input: clear errors before any compute --------------------------------------------------
def test_mesh_that_does_not_divide_the_devices(tmp_path):
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    loop.run(tiny_config({"mesh.data": 3}), str(tmp_path), log=lambda *_: None)


def test_length_the_layout_cannot_split(tmp_path):
  with pytest.raises(ValueError, match=r"stages.short.data.max_len: the zigzag layout over seq=4 "
                     r"devices needs a multiple of 8, found 100"):
    loop.run(tiny_config({"stages.short.data.max_len": 100, "data.pad_multiple": 4}),
             str(tmp_path), log=lambda *_: None)


def test_mistyped_stage_key(tmp_path):
  config = tiny_config()
  config.unlock()
  config.stages.short.train.stepz = 3
  with pytest.raises(ValueError, match=r"stages.short.train.stepz: no such key"):
    loop.run(config, str(tmp_path), log=lambda *_: None)


def test_mistyped_command_line_key():
  result = subprocess.run([sys.executable, "-m", "longctx.launch", "--config.train.stepz=3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert result.returncode != 0 and "stepz" in result.stderr


def test_workdir_of_another_config(tmp_path):
  workdir = str(tmp_path)
  checks.check_workdir(workdir, tiny_config())
  checks.check_workdir(workdir, tiny_config({"mesh.data": 1, "mesh.seq": 8}))  # mesh may change
  checks.check_workdir(workdir, tiny_config({"train.learning_rate": 1e-4}))  # and so may lr
  with pytest.raises(checks.ConfigMismatchError,
                     match=r"another config: keys \['model.hidden_size'\] differ"):
    loop.run(tiny_config({"model.hidden_size": 32}), workdir, log=lambda *_: None)


def test_init_path_missing(tmp_path):
  with pytest.raises(ValueError, match="init.path: expected a directory"):
    loop.run(tiny_config({"init.kind": "hf"}), str(tmp_path), log=lambda *_: None)


# ---- processes -----------------------------------------------------------------------------------
def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(args, devices, extra_env=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(extra_env or {})
  return subprocess.Popen([sys.executable, "-m", "longctx.launch", *SMALL_FLAGS,
                           "--config.stage_order=short", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  # One after the other: on 2 cores a concurrent 8-device run can starve the gloo handshake.
  one = _launch([f"--workdir={tmp_path / 'one'}"], 8)
  _, err = one.communicate(timeout=600)
  assert one.returncode == 0, err[-3000:]
  port = _free_port()
  procs = [_launch([f"--workdir={tmp_path / 'two'}", f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}"], 4) for i in range(2)]
  results = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  a, b = _losses(tmp_path / "one", "short"), _losses(tmp_path / "two", "short")
  assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
  np.testing.assert_allclose([x for _, x in b], [x for _, x in a], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  import signal
  import time
  workdir = tmp_path / "w"
  proc = _launch([f"--workdir={workdir}", "--config.stages.short.train.steps=200",
                  "--config.checkpoint.every_steps=1000"], 8)
  metrics = workdir / "short" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped at step" in out
  steps = [int(d) for d in os.listdir(workdir / "short" / "checkpoints") if d.isdigit()]
  assert steps and max(steps) >= 2
  config = tiny_config({"stages.short.train.steps": 200, "stage_order": "short",
                        "checkpoint.every_steps": 1000})
  summary = loop.run(config, str(workdir), log=lambda *_: None, hooks=[stop_after(1)])
  assert summary[0].resumed_from == max(steps)
  with open(workdir / "short" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, max(steps) + 2))


@pytest.mark.slow
def test_longlora_trains_only_lora_embedding_and_norms(tmp_path):
  """LongLoRA mode through the whole loop: S²-Attn on the ring in training, and only LoRA,
  embedding and norm parameters move; the final weights export as a PEFT adapter."""
  config = tiny_config({"lora.enabled": True, "stage_order": "short", "train.learning_rate": 1e-2})
  summary = loop.run(config, str(tmp_path), log=lambda *_: None)
  assert summary[0].last_loss is not None
  stage = read_stages(config)[0]
  runner = loop.StageRunner(stage, make_mesh({"data": 2, "seq": 4}), seed=0, log=lambda *_: None)
  before = jax.device_get(runner.random_params())
  from flax import traverse_util
  from longctx.checkpoint.params import load_params
  cfg, after = load_params(str(tmp_path / "short" / "final"))
  assert cfg.lora_rank == 8
  flat_before, flat_after = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
  assert flat_before.keys() == flat_after.keys()
  changed = {"/".join(k) for k in flat_before
             if not np.array_equal(flat_before[k], flat_after[k])}
  trainable = {"/".join(k) for k in flat_before
               if "lora" in "/".join(k) or "embed_tokens" in k[0] or "norm" in "/".join(k)}
  assert changed == trainable, (sorted(changed ^ trainable))
  result = subprocess.run([sys.executable, "-m", "longctx.convert", "to-peft",
                           str(tmp_path / "short" / "final"), str(tmp_path / "adapter")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_evaluation_during_training(tmp_path):
  """eval.every_steps: held-out loss / perplexity (full attention) and passkey in metrics.jsonl."""
  config = tiny_config({"stage_order": "short", "eval.every_steps": 2,
                        "eval.passkey_lengths": "96", "eval.passkey_trials": 2,
                        "lora.enabled": True, "train.profile_start": 1, "train.profile_steps": 1})
  said = []
  loop.run(config, str(tmp_path), log=said.append)
  # and the profiler hook: a trace of step 2
  assert any(f.endswith(".xplane.pb") for _, _, fs in os.walk(tmp_path / "short" / "profile")
             for f in fs), said
  assert any("profile of steps 2-2" in line for line in said), said
  records = read_metrics(str(tmp_path / "short"))
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [2, 3]
  for r in evals:
    assert np.isclose(r["eval_ppl"], np.exp(r["eval_loss"])) and 0 <= r["passkey_96"] <= 1
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
  trained = [r for r in records if "loss" in r]  # a CPU: no peak FLOP/s nor memory statistics
  assert all("mfu" not in r and r["mfu_note"].startswith("no mfu: no peak FLOP/s is known for "
                                                         "device kind 'cpu'") for r in trained)
  assert all(r["memory_note"] == "no memory_gib: the cpu backend reports no memory statistics"
             for r in trained)


@pytest.mark.slow
def test_restore_onto_another_mesh_shape(tmp_path):
  """A checkpoint written on data=2 x seq=4 resumes on fsdp=2 x seq=4 (parameters and optimizer
  state resharded by orbax) and continues with the same losses as the uninterrupted run."""
  overrides = {"stage_order": "short"}
  full, moved = str(tmp_path / "full"), str(tmp_path / "moved")
  loop.run(tiny_config(overrides), full, log=lambda *_: None)
  loop.run(tiny_config(overrides), moved, log=lambda *_: None, hooks=[stop_after(1)])
  resumed = loop.run(tiny_config({**overrides, "mesh.data": 1, "mesh.fsdp": 2}), moved,
                     log=lambda *_: None)
  assert resumed[0].resumed_from == 1
  a, b = _losses(full, "short"), _losses(moved, "short")
  assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
  np.testing.assert_allclose([x for _, x in b], [x for _, x in a], rtol=0, atol=1e-5)
