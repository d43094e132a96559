"""Host time between steps: the training loop's step time against the compiled step alone.

    python bench/loop_overhead.py [--steps=40] [--log-every=1] [--json]
    python bench/loop_overhead.py --writer-records=10000   # metrics.jsonl write cost only

Runs stage `short` of configs/tiny.py (8 emulated CPU devices, data=2 x seq=4) through
`longctx.train.loop.run`, then times the same compiled step in a tight loop on one batch (on
CPU each step waited for, as the loop does there). Reported, over the steady-state steps (the
first five, which compile, excluded):

  loop step s      median `step_time_s` of metrics.jsonl (log_every steps per record)
  device step s    tight-loop time per step
  host gap s       loop − device: what the loop's host work adds to each step
  tokens/s         of the loop

Run it on another checkout (PYTHONPATH=<checkout>) to compare loops: the script adapts to a
step that takes (state, batches, denominator) or also the previous step's `ok`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps: int, log_every: int):
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict({"stage_order": "short", "stages.short.train.steps": steps,
                                     "train.log_every": log_every,
                                     "checkpoint.every_steps": 10 * steps})
  return config


def loop_step_times(config) -> list[dict]:
  from longctx.train import loop
  from longctx.train.metrics import read_metrics
  with tempfile.TemporaryDirectory() as workdir:
    loop.run(config, workdir, log=lambda *_: None, preflight=False)
    return [r for r in read_metrics(os.path.join(workdir, "short")) if "loss" in r]


def device_step_time(config, steps: int) -> float:
  import jax
  from longctx.parallel.mesh import make_mesh
  from longctx.train.config import mesh_config, read_stages
  from longctx.train.data import GlobalBatches
  from longctx.train.runner import StageRunner
  import dataclasses
  stage = read_stages(config)[0]
  mesh = make_mesh(dataclasses.asdict(mesh_config(config)))
  runner = StageRunner(stage, mesh, 0, log=lambda *_: None)
  state = runner.init_state(runner.random_params())
  batches, denominator, _ = next(GlobalBatches(stage.data, mesh, 1,
                                               stage.attention.layout))
  step = runner.compiled_step()
  extra = (runner.first_ok(),) if hasattr(runner, "first_ok") else ()
  for _ in range(3):  # compile and warm up
    state, metrics = step(state, batches, denominator, *extra)
  jax.block_until_ready(state)
  # one step at a time: XLA:CPU's emulated devices share one thread pool, and two multi-device
  # programs in flight can deadlock in their collectives (train/loop.py waits the same way)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batches, denominator, *extra)
    jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps


def writer_time(records: int) -> float:
  """Seconds per `MetricsWriter.write` once the file holds `records` lines (the loop writes one
  per log_every steps; a rewrite of the whole file costs O(lines) each time)."""
  from longctx.train.metrics import MetricsWriter
  record = {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-4, "tokens_per_s": 1e4,
            "step_time_s": 0.1, "seq_len": 1024}
  with tempfile.TemporaryDirectory() as directory:
    writer = MetricsWriter(directory)
    writer._tb = None  # metrics.jsonl only
    for step in range(records):
      writer.write(step, record)
    start = time.perf_counter()
    for step in range(records, records + 100):
      writer.write(step, record)
    return (time.perf_counter() - start) / 100


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--log-every", type=int, default=1)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--writer-records", type=int, default=0,
                      help="only time metrics.jsonl writes once it holds this many records")
  args = parser.parse_args(argv)
  if args.writer_records:
    seconds = writer_time(args.writer_records)
    print(json.dumps({"writer_records": args.writer_records, "write_s": seconds}) if args.json
          else f"metrics.jsonl write at {args.writer_records:,} records: {seconds * 1e3:.2f} ms")
    return seconds
  config = _config(args.steps, args.log_every)
  records = loop_step_times(config)
  steady = [r for r in records if r["step"] > 5]
  loop_s = statistics.median(r["step_time_s"] for r in steady)
  tokens = statistics.median(r["tokens_per_s"] for r in steady)
  device_s = device_step_time(config, args.steps)
  out = {"loop_step_s": loop_s, "device_step_s": device_s, "host_gap_s": loop_s - device_s,
         "tokens_per_s": tokens, "steps": args.steps, "log_every": args.log_every}
  if args.json:
    print(json.dumps(out))
  else:
    print(f"loop step {loop_s * 1e3:.1f} ms, device step {device_s * 1e3:.1f} ms, host gap "
          f"{(loop_s - device_s) * 1e3:.1f} ms per step, {tokens:,.0f} tokens/s "
          f"({args.steps} steps, log_every {args.log_every})")
  return out


if __name__ == "__main__":
  main()
