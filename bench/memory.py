"""Memory per token: the recipes' plans, and what chunking, remat and offload cost in tokens/s.

  python bench/memory.py plans                  # the recipes' plans (python -m longctx.plan --json)
  python bench/memory.py throughput [--steps 4] [--shapes tiny "big vocab"]  # tokens/s per option

`plans` runs the planner on every recipe (configs/llama2_7b_1m.py, XVERSE at 128 and 16 devices,
LongAlign 64k, LongLoRA 100k) and prints one markdown row per stage: per-device total, state,
saved activations, host bytes, and whether it fits an H100 80GB at 90%.

`throughput` times the real train step (the trainer's compiled step on 8 emulated CPU devices,
mesh data=2 × seq=4, zigzag ring) for each memory option, on two shapes:
  tiny        configs/tiny.py's model (vocab 260) at 4,096-token rows (its `long` stage);
  big vocab   a SmolLM2-135M-shaped head and width (vocab 49,152, hidden 576, 9/3 heads) with 4
              layers, at 2,048-token rows: there the [tokens, vocab] logits are what chunking
              removes (the head is ~90% of the FLOPs; longer rows take minutes per step on a
              2-core CPU).
Each row: the planned per-device bytes (this platform's program, float32 on CPU) and the median
step time of `--steps` steps after one compile step; tokens/s counts every slot of the batch.
Results go in bench/RESULTS.md ("Memory per token").
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RECIPES = (
    ("Llama-2-7B 1M", "configs/llama2_7b_1m.py", []),
    ("XVERSE-13B 256k, 128 devices", "configs/xverse_13b_abf_ntk_256k.py", []),
    ("XVERSE-13B 256k, 16 devices", "configs/xverse_13b_abf_ntk_256k.py:16", []),
    ("LongAlign 7B 64k", "configs/llama2_7b_longalign_64k.py", []),
    ("LongLoRA 7B 100k", "configs/llama2_7b_longlora_100k.py", []),
)

OPTIONS = (
    ("reference (no chunks, no remat)", {}),
    ("loss_chunk", {"train.loss_chunk": 256}),
    ("loss_chunk + mlp_chunk", {"train.loss_chunk": 256, "model.mlp_chunk": 256}),
    ("remat full", {"model.remat": "full"}),
    ("remat full + offload layer inputs", {"model.remat": "full",
                                           "model.remat_offload": "layer_input"}),
    ("offload optimizer state", {"train.offload_optimizer": True}),
    ("all of the above", {"train.loss_chunk": 256, "model.mlp_chunk": 256, "model.remat": "full",
                          "model.remat_offload": "layer_input",
                          "train.offload_optimizer": True}),
)


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _plan_json(config: str, *flags: str) -> list[dict]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "longctx.plan", f"--config={config}", "--json",
                        "--noreport", *flags], capture_output=True, text=True, cwd=ROOT,
                       env=env, check=True).stdout
  return json.loads(out)["stages"]


def plans(_args) -> None:
  """Per recipe and stage: the plan with the float16 stand-in (the estimate for GPU / TPU) and
  the bfloat16 program as XLA:CPU compiles it (what the planner printed before the stand-in)."""
  print("| recipe | stage | mesh | step batch (K, rows, tokens) | state | saved activations | "
        "host | total / device | as bf16 on XLA:CPU | H100 80GB at 90% |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, config, extra in RECIPES:
    as_bf16 = _plan_json(config, "--noaccelerator_estimate", *extra)
    for s, b in zip(_plan_json(config, *extra), as_bf16):
      mesh = " × ".join(f"{a}={n}" for a, n in s["mesh"].items() if n > 1)
      print(f"| {name} | {s['stage']} | {mesh} | {tuple(s['batch_shape'])} | "
            f"{_gb(s['params_bytes'] + s['optimizer_bytes'])} | "
            f"{_gb(s['saved_activation_bytes'])} | {_gb(s['host_bytes'])} | "
            f"{_gb(s['total_bytes'])} | {_gb(b['total_bytes'])} | "
            f"{'fits' if s['fits']['H100 80GB'] else 'does NOT fit'} |", flush=True)


def _tiny_stage(overrides: dict, shape: str):
  from longctx.train.config import read_stages
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  base = {"stage_order": "long", "attention.block_q": 512, "attention.block_k": 512}
  if shape == "big vocab":
    base.update({"model.vocab_size": 49152, "model.hidden_size": 576,
                 "model.intermediate_size": 1536, "model.num_layers": 4, "model.num_heads": 9,
                 "model.num_kv_heads": 3, "model.head_dim": 64, "model.tie_word_embeddings": True,
                 "stages.long.data.max_len": 2048, "data.tokenizer": "byte"})
  config.update_from_flattened_dict({**base, **overrides})
  return read_stages(config)[0]


def _time_steps(stage, steps: int) -> tuple[float, int, float]:
  """(median step seconds, tokens per step, planned device bytes) of the trainer's step."""
  import jax
  from longctx.parallel.mesh import make_mesh
  from longctx.train.data import GlobalBatches
  from longctx.train.memory import plan_stage
  mesh = make_mesh({"data": 2, "seq": 4})
  plan = plan_stage(stage, mesh, residuals=bool(stage.model.remat_offload))
  from longctx.train.runner import StageRunner
  runner = StageRunner(stage, mesh, 0, log=lambda *_: None)
  state = runner.init_state(runner.random_params())
  loader = GlobalBatches(stage.data, mesh, stage.train.micro_batches,
                         stage.attention.layout)
  batches, denominator, shape = next(loader)
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    state, metrics = plan.compiled(state, batches, denominator, runner.first_ok())
    jax.block_until_ready(metrics)
    if i:  # the first call includes loading the executable
      times.append(time.perf_counter() - start)
  return statistics.median(times), shape[0] * shape[1] * shape[2], plan.total_bytes


def throughput(args) -> None:
  import jax
  print(f"# {jax.device_count()} {jax.devices()[0].platform} devices, mesh data=2 × seq=4; "
        f"median of {args.steps} steps")
  print("| shape | option | planned / device | step time | tokens/s |")
  print("|---|---|---|---|---|")
  for shape in args.shapes:
    for name, overrides in OPTIONS:
      stage = _tiny_stage(overrides, shape)
      seconds, tokens, planned = _time_steps(stage, args.steps)
      print(f"| {shape} ({stage.data.max_len:,}-token rows) | {name} | {_gb(planned)} | "
            f"{seconds:.2f} s | {tokens / seconds:,.0f} |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=("plans", "throughput"))
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--shapes", nargs="+", default=["tiny", "big vocab"],
                      choices=["tiny", "big vocab"])
  args = parser.parse_args()
  if args.what == "throughput":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  {"plans": plans, "throughput": throughput}[args.what](args)


if __name__ == "__main__":
  main()
