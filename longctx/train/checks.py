"""Checks before compute: every stage's config, the mesh against the devices, lengths against
the layout, the init path, the workdir, the first batch of every stage still to train, and
(pre-flight) every remaining stage's memory plan.
A run that would fail on any of these fails here, before a parameter is materialised.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from longctx import schema
from longctx.checkpoint import manager as ckpt
from longctx.data.config import DataConfig
from longctx.errors import ConfigError, user_error
from longctx.train.architecture import read_architecture
from longctx.train.config import SECTIONS, InitKind, StageSpec, model_section
from longctx.train.data import GlobalBatches, check_length
from longctx.train.runner import HOST_MEMORY, check_same_architecture, head_axis

# What may change when a run resumes in the same workdir: whole sections, and train keys that
# leave the optimizer state's structure alone (a lower learning rate after a non-finite loss).
RESUMABLE_SECTIONS = ("mesh", "checkpoint", "attention", "eval")
RESUMABLE_TRAIN_KEYS = ("learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay",
                        "clip_norm", "log_every", "peak_tflops_per_device", "profile_start",
                        "profile_steps")


class ConfigMismatchError(ConfigError):
  """A workdir's config.json that this run's config may not resume."""


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def resumable(key: str) -> bool:
  """Whether config key `key` (dotted; `stages.<name>.` prefixes allowed) may change on resume."""
  parts = key.split(".")
  if parts[0] == "stages" and len(parts) > 2:
    parts = parts[2:]
  return parts[0] in RESUMABLE_SECTIONS or (
      len(parts) == 2 and parts[0] == "train" and parts[1] in RESUMABLE_TRAIN_KEYS)


def resumable_changes() -> str:
  return (f"sections {', '.join(RESUMABLE_SECTIONS)} and train."
          f"{{{', '.join(RESUMABLE_TRAIN_KEYS)}}}")


def _same(key: str, a, b) -> bool:
  """Whether a config key's saved and current values mean the same (an enum value under an old
  name and its new one do: docs/DESIGN.md, "Glossary")."""
  parts = key.split(".")
  if parts[0] == "stages" and len(parts) > 2:
    parts = parts[2:]
  cls = {**SECTIONS, "data": DataConfig}.get(parts[0])
  return a == b if cls is None else schema.same_value(cls, ".".join(parts[1:]), a, b)


def _new_model_key_at_default(key: str, saved: dict, current: dict) -> bool:
  """A model key that a config saved before the key existed lacks, now at its default (e.g.
  `model.layer_types` empty, or unset to come from the checkpoint): the same model."""
  parts = key.split(".")
  if parts[0] == "stages" and len(parts) > 2:
    parts = parts[2:]
  if key in saved or len(parts) != 2 or parts[0] != "model":
    return False
  return current.get(key) in (None, model_section().get(parts[1]))


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Write <workdir>/config.json, or refuse a workdir that trains another config."""
  path = epath.Path(workdir) / "config.json"
  current = _flat(json.loads(config.to_json_best_effort()))
  if path.exists():
    saved = _flat(json.loads(path.read_text()))
    diff = sorted(k for k in set(saved) | set(current)
                  if not _same(k, saved.get(k), current.get(k)) and not resumable(k)
                  and not _new_model_key_at_default(k, saved, current))
    if diff:
      raise ConfigMismatchError(
          f"workdir {workdir} holds checkpoints of another config: keys {diff} differ from "
          f"{path}. Use a new --workdir, or restore that config (a resumed run accepts changes "
          f"to {resumable_changes()}).")
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def check_all(config: ml_collections.ConfigDict, stages: list[StageSpec], mesh: Mesh,
              workdir: str) -> None:
  """Every check that needs no compute, for every stage; then the workdir's config.json."""
  from longctx.train.config import init_config
  init_kind = init_config(config).kind
  for i, stage in enumerate(stages):
    check_stage(stage, mesh, i == 0, init_kind, config.init.path)
  check_workdir(workdir, config)
  for stage in stages:
    if not ckpt.is_complete(os.path.join(workdir, stage.name, "final")):
      check_first_batch(stage, mesh)


def check_first_batch(stage: StageSpec, mesh: Mesh) -> None:
  """Reads the stage's first batch, so that bad data (a malformed record, a missing file) is
  reported before the memory plan and the compile, as the error itself rather than the data
  loader's wrapping of it."""
  try:
    next(GlobalBatches(stage.data, mesh, stage.train.micro_batches,
                       stage.attention.batch_layout))
  except Exception as e:  # noqa: BLE001  re-raised: the user's error unwrapped, else as it came
    error = user_error(e)
    if error is None or error is e:
      raise
    raise error from e


def check_stage(stage: StageSpec, mesh: Mesh, first: bool, init_kind: InitKind,
                init_path: str) -> None:
  seq = mesh.shape["seq"]
  layout = stage.attention.batch_layout
  if not stage.attention.context_parallel and seq > 1:
    raise ConfigError(f"config stages.{stage.name}.attention.impl={stage.attention.impl!r} "
                      f"with mesh seq={seq}: only 'context_parallel' splits a row across devices")
  check_length(stage.data.max_len, seq, layout, f"stages.{stage.name}.data.max_len")
  check_memory_options(stage, seq, layout)
  check_ulysses_heads(stage, mesh)
  if stage.attention.s2_group:
    from longctx.attention.shifted_sparse import check_s2
    if any(stage.model.layer_windows):  # the one combination windows do not implement
      raise ConfigError(f"config stages.{stage.name}.lora.s2_group_fraction="
                        f"{stage.lora.s2_group_fraction}: S²-Attn on a model with sliding-window "
                        f"layers (model.sliding_window={stage.model.sliding_window}) is not "
                        "defined; lora.s2_group_fraction=0 trains LoRA with the model's own "
                        "attention")
    try:
      check_s2(stage.data.max_len, stage.model.num_heads, stage.model.num_kv_heads,
               stage.attention.s2_group)
    except ValueError as e:
      raise ConfigError(f"config stages.{stage.name}.lora.s2_group_fraction="
                        f"{stage.lora.s2_group_fraction} (data.max_len={stage.data.max_len}): {e}; "
                        "lora.s2_group_fraction=0 trains LoRA with full attention") from None
  if first and init_kind is not InitKind.RANDOM:
    if not init_path:
      raise ConfigError(f"config init.path: expected a directory for init.kind="
                        f"{init_kind.value!r}, found ''")
    marker = "config.json" if init_kind is InitKind.HF else "model_config.json"
    if not (epath.Path(init_path) / marker).exists():
      raise FileNotFoundError(f"config init.path: expected {marker} in {init_path} "
                              f"(init.kind={init_kind.value!r})")
    check_same_architecture(read_architecture(init_path), stage.model, init_path)


def check_ulysses_heads(stage: StageSpec, mesh: Mesh) -> None:
  """ValueError, naming the keys, when Ulysses cannot split each device's query heads over
  mesh.seq (the heads of one device: model.num_heads / mesh.tensor when the heads are split
  over it, and each S² half on its own when they are not)."""
  from longctx.attention.strategies import Strategy
  spec, seq = stage.attention, mesh.shape["seq"]
  where = f"config stages.{stage.name}.attention"
  if not spec.context_parallel or spec.strategy not in (Strategy.ULYSSES, Strategy.HYBRID):
    return
  hybrid = spec.strategy is Strategy.HYBRID
  size = spec.ulysses_devices if hybrid else seq
  if hybrid and seq % size:
    raise ValueError(f"{where}.ulysses_devices={size} with mesh.seq={seq}: the hybrid splits "
                     f"the seq devices into ring × Ulysses, so ulysses_devices must divide {seq}")
  tensor = mesh.shape["tensor"] if head_axis(stage, mesh) else 1
  halves = bool(spec.s2_group) and tensor == 1
  from longctx.attention.shifted_sparse import s2_ulysses_heads
  m = stage.model
  local = s2_ulysses_heads(m.num_heads, m.num_kv_heads) if halves else m.num_heads // tensor
  if local % size:
    how = (f" / mesh.tensor={tensor}" if tensor > 1 else "") + (
        " split into S²-Attn's plain and shifted heads, each run by Ulysses" if halves else "")
    over = f"ulysses_devices={size}" if hybrid else f"mesh.seq={seq}"
    raise ValueError(f"{where}.strategy={spec.strategy!r} with {over}: Ulysses splits each "
                     f"device's query heads (model.num_heads={stage.model.num_heads}{how} = "
                     f"{local}) over {size} devices, which needs a multiple of {size}; use "
                     f"strategy 'ring' or 'all_gather', or Ulysses over a divisor of {local}")


def check_memory_options(stage: StageSpec, seq: int, layout: str | None) -> None:
  """Token chunks that tile every row length the stage can see; host memory for offload."""
  from longctx.data.config import BatchingKind
  from longctx.model.chunking import check_chunk
  from longctx.train.data import row_parts
  from longctx.train.runner import has_host_memory
  if stage.data.batching is BatchingKind.PACKED:
    length = stage.data.max_len
  else:  # sorted batches are padded to multiples of this, so a chunk must tile it
    length = int(np.lcm(row_parts(seq, layout), stage.data.pad_multiple))
  where = f"stages.{stage.name}."
  check_chunk(length, seq, stage.train.loss_chunk, where + "train.loss_chunk")
  check_chunk(length, seq, stage.model.mlp_chunk, where + "model.mlp_chunk")
  offload = [key for key, on in (("model.remat_offload", stage.model.remat_offload),
                                 ("train.offload_optimizer", stage.train.offload_optimizer)) if on]
  if offload and not has_host_memory():
    kinds = sorted({m.kind for m in jax.devices()[0].addressable_memories()})
    raise ConfigError(f"config {where}{offload[0]}: offloading needs a '{HOST_MEMORY}' memory "
                      f"on the {jax.devices()[0].platform} devices, found memories {kinds}")



def preflight(config, stages: list[StageSpec], mesh: Mesh, workdir: str, log) -> dict:
  """{stage name: its plan} for the stages still to run; MemoryPlanError if one does not fit."""
  from longctx.train import memory
  capacity, where = memory.device_capacity()
  plans = {}
  for stage in stages:
    if ckpt.is_complete(os.path.join(workdir, stage.name, "final")):
      continue
    plan = memory.plan_stage(stage, mesh, int(config.seed), residuals=False)
    log(f"[{stage.name}] memory plan: {memory.gb(plan.total_bytes)} per device"
        + (f" (+ {memory.gb(plan.host_bytes)} in host memory)" if plan.host_bytes else "")
        + f"; {where}")
    memory.check_fits(stage, plan, mesh, capacity, where, seed=int(config.seed), log=log,
                      flag=lambda key, name=stage.name: flag(config, name, key))
    plans[stage.name] = plan
  return plans


def flag(config, stage_name: str, key: str) -> str:
  """The command-line spelling of a config key for one stage: the stage's own override when it
  has one, else the top-level key (which every stage inherits)."""
  stage_cd = config.stages.get(stage_name) if "stages" in config and config.stages else None
  if stage_cd is not None:
    node = stage_cd
    for part in key.split("."):
      node = node.get(part) if hasattr(node, "get") else None
      if node is None:
        break
    else:
      return f"--config.stages.{stage_name}.{key}"
  return f"--config.{key}"


