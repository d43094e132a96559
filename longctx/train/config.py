"""The training sections of a config (DESIGN.md contract 4) and their typed readers.

A training config holds, besides `model` and `data`:
  seed         int
  init         where the first stage's weights come from: kind "random" | "hf" | "checkpoint"
  mesh         data / fsdp / seq / tensor sizes; -1 takes the remaining devices
  attention    impl "dense" | "tiled" | "context_parallel" (old names: "ring", "blockwise");
               context-parallel strategy "ring" | "all_gather" | "ulysses" | "hybrid" (with
               ulysses_devices) and layout
               "contiguous" | "zigzag" | "striped"; inner kernel; tile sizes. Read once into an
               `attention.AttentionSpec` (with LongLoRA's S² group), the stage's `attention`
  lora         LongLoRA (METHODS.md §2): off unless enabled
  train        optimizer, schedule, step budget, accumulation, logging
  checkpoint   orbax CheckpointManager options
  eval         evaluation during training (longctx.train.evaluate): held-out loss and
               perplexity with full attention, passkey accuracy, every `every_steps`
  stages       named sub-configs; each overrides any of model / data / train / lora /
               attention / eval for one stage (a `model.rope` override replaces the whole rope dict)
  stage_order  comma-separated stage names, run in this order

Library code never reads the ConfigDict: `StageSpec.from_config` turns it into the dataclasses
below once, at the boundary, and checks every stage before any compute.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from longctx import schema
from longctx.attention.kernels.base import Kernel
from longctx.attention.layouts import Layout
from longctx.attention.spec import AttentionImpl, AttentionSpec, Tiles
from longctx.attention.strategies import Strategy
from longctx.data.config import DataConfig
from longctx.errors import ConfigError
from longctx.model.config import ModelConfig
from longctx.names import Name


class Schedule(Name):
  COSINE = "cosine"      # linear warm-up, then cosine decay to min_lr_ratio · lr
  CONSTANT = "constant"  # linear warm-up, then constant (LongLoRA's recipe)


class InitKind(Name):
  RANDOM = "random"
  HF = "hf"                  # a HuggingFace directory (safetensors + config.json)
  CHECKPOINT = "checkpoint"  # a longctx params checkpoint (longctx.checkpoint.params)


def default_config() -> ml_collections.ConfigDict:
  """Every training section with its defaults (model, data and stages are the recipe's), derived
  from the dataclasses below (train.schema)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  for name, cls in SECTIONS.items():
    config[name] = schema.defaults(cls)
  return config


# ModelConfig fields a config's `model` section does not hold: LoRA comes from the `lora` section.
_NOT_IN_MODEL_SECTION = ("lora_rank", "lora_alpha", "lora_targets")


# Llama-2-7B's shapes and special tokens, shared by the 7B recipes:
# `model_section(**LLAMA2_7B, ...)`.
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                 num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2)


def model_section(*, from_init: bool = False, **fields) -> ml_collections.ConfigDict:
  """A config's `model` section: every ModelConfig field (defaults, then `fields`), so any of
  them can be overridden from the command line. Tuple fields are comma-separated strings.

  `from_init=True`: the architecture fields not in `fields` stay unset and come from the init
  checkpoint (`longctx.train.architecture`); `fields` and later overrides replace them.
  """
  if from_init:
    from longctx.train.architecture import ARCHITECTURE_FIELDS, unset_architecture
    options = {k: v for k, v in fields.items() if k not in ARCHITECTURE_FIELDS}
    defaults = model_section(**options).to_dict()
    arch = {k: v for k, v in fields.items() if k in ARCHITECTURE_FIELDS}
    if "rope" in arch and not isinstance(arch["rope"], ml_collections.ConfigDict):
      arch["rope"] = ml_collections.ConfigDict(dict(arch["rope"]))
    return ml_collections.ConfigDict({**defaults, **unset_architecture(**arch)})
  values = ModelConfig.from_dict(fields).to_dict()
  section = {k: ",".join(v) if isinstance(v, (tuple, list)) else v for k, v in values.items()
             if k not in _NOT_IN_MODEL_SECTION}
  return ml_collections.ConfigDict(section)


@dataclasses.dataclass(frozen=True)
class InitConfig:
  kind: InitKind = InitKind.RANDOM
  path: str = ""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  seq: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """The `attention` section as written (`attention_spec` turns it into the stage's
  `AttentionSpec`). impl: dense, tiled (one device) or context_parallel (the row split over
  mesh.seq by
  `strategy`: ring, all_gather, ulysses, or hybrid = Ulysses over `ulysses_devices` of the seq
  devices × the ring over mesh.seq / ulysses_devices, in `layout`); block_*: the attention tile sizes,
  forward (block_q × block_k) and backward (None, 0 in a config dict = the defaults of
  `attention.tiles.tile_config`); kernel: the inner kernel (`attention.kernels.Kernel`:
  "xla" (pure JAX); "pallas_gpu" on GPUs, "pallas_tpu" on TPUs, with impl context_parallel only).
  """
  impl: AttentionImpl = AttentionImpl.CONTEXT_PARALLEL
  strategy: Strategy = Strategy.RING
  layout: Layout = Layout.ZIGZAG
  block_q: int | None = None
  block_k: int | None = None
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None
  kernel: Kernel = Kernel.XLA
  ulysses_devices: int = schema.field(0, lambda v: v >= 0, ">= 0")  # hybrid only


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LongLoRA: LoRA on `targets`, `trainable` parameters fully trained, the rest frozen.

  s2_group_fraction: S²-Attn group size as a fraction of the row length in training (LongLoRA
  uses 1/4); 0 trains with full attention. Evaluation always uses full attention.
  """
  enabled: bool = False
  rank: int = schema.field(8, **schema.POSITIVE)
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
  trainable: tuple[str, ...] = ("embed_tokens", "norm")
  s2_group_fraction: float = schema.field(0.25, lambda v: 0 <= v < 1, "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = schema.field(100, **schema.POSITIVE)
  micro_batches: int = schema.field(1, **schema.POSITIVE)
  learning_rate: float = 3e-4
  schedule: Schedule = Schedule.COSINE
  warmup_steps: int = schema.field(10, **schema.NON_NEGATIVE)
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0          # 0: no clipping
  log_every: int = schema.field(10, **schema.POSITIVE)
  peak_tflops_per_device: float = 0.0  # for MFU; 0: from the device kind, if known
  # tokens of each row per device in one chunk of the fused lm_head + cross-entropy
  # (longctx.train.loss); 0: the unchunked reference path (full [tokens, vocab] logits)
  loss_chunk: int = 0
  offload_optimizer: bool = False  # keep the optimizer state in pinned host memory
  # a JAX profiler trace of steps profile_start+1 … +profile_steps in <stage>/profile (0: none)
  profile_start: int = schema.field(0, **schema.NON_NEGATIVE)
  profile_steps: int = schema.field(3, **schema.POSITIVE)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int = schema.field(0, **schema.NON_NEGATIVE)  # 0: no evaluation during training
  batches: int = schema.field(2, **schema.POSITIVE)  # held-out batches for eval_loss / eval_ppl
  passkey_lengths: tuple[int, ...] = schema.field(  # empty: no passkey
      (), lambda v: all(n > 0 for n in v), "positive lengths")
  passkey_trials: int = schema.field(5, **schema.POSITIVE)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = schema.field(100, **schema.POSITIVE)
  max_to_keep: int = schema.field(2, **schema.POSITIVE)
  async_save: bool = True


# The top-level sections a config holds besides model, data and stages, each read by its class.
SECTIONS = {"init": InitConfig, "mesh": MeshConfig, "attention": AttentionConfig,
            "lora": LoraConfig, "train": TrainConfig, "checkpoint": CheckpointConfig,
            "eval": EvalConfig}


def _split(text: str) -> tuple[str, ...]:
  return tuple(t.strip() for t in text.split(",") if t.strip())


def attention_spec(section: ml_collections.ConfigDict, lora: LoraConfig,
                   max_len: int) -> AttentionSpec:
  """The stage's `AttentionSpec` from its `attention` section and LoRA's S² group (round(max_len
  · lora.s2_group_fraction) when LoRA is on); ValueError names the key."""
  a = schema.read(AttentionConfig, section, "attention", kernel=_kernel(section))
  if str(section.get("impl", "")).lower() == "ring" and a.strategy is not Strategy.RING:
    raise ConfigError(f"config attention.impl='ring' with attention.strategy={a.strategy!r}: "
                      "impl 'ring' is the old name of impl 'context_parallel' with the ring; "
                      f"set attention.impl='context_parallel', attention.strategy={a.strategy!r}")
  if (a.strategy is Strategy.HYBRID) != (a.ulysses_devices > 0):
    raise ConfigError(f"config attention.strategy={a.strategy!r} with attention.ulysses_devices="
                      f"{a.ulysses_devices}: the hybrid needs ulysses_devices ≥ 1 (Ulysses over "
                      "that many of the mesh.seq devices, the ring over the rest), and only the "
                      "hybrid takes it")
  s2 = int(round(max_len * lora.s2_group_fraction)) if lora.enabled else 0
  try:
    return AttentionSpec(impl=a.impl, strategy=a.strategy, layout=a.layout, kernel=a.kernel,
                         tiles=Tiles(a.block_q, a.block_k, a.block_q_bwd, a.block_k_bwd),
                         causal=True, s2_group=s2, ulysses_devices=a.ulysses_devices)
  except ValueError as e:  # the spec's messages start with the key: "kernel=... needs ..."
    raise ConfigError(f"config attention.{e}") from None


def _kernel(attention: ml_collections.ConfigDict) -> Kernel:
  """attention.kernel, validated (absent = "xla")."""
  from longctx.attention.kernels import check_kernel
  try:
    return check_kernel(attention.get("kernel", None))
  except (ValueError, NotImplementedError) as e:
    raise ConfigError(f"config attention.kernel: {e}") from None


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """Everything one stage needs, typed."""
  name: str
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  lora: LoraConfig
  attention: AttentionSpec
  eval: EvalConfig = EvalConfig()

  @classmethod
  def from_config(cls, name: str, cd: ml_collections.ConfigDict,
                  init_model: ModelConfig | None = None) -> "StageSpec":
    """From a merged (single-stage) ConfigDict; ValueError names the bad key. `init_model`: the
    init checkpoint's architecture, for the model fields the config leaves unset."""
    from longctx.train.architecture import resolve
    try:
      model = ModelConfig.from_dict(resolve(cd.model.to_dict(), init_model))
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config stages.{name}.model: {e}") from None
    train = schema.read(TrainConfig, cd.train, "train")
    lora = schema.read(LoraConfig, cd.lora, "lora")
    data = DataConfig.from_config_dict(cd.data)
    attention = attention_spec(cd.attention, lora, data.max_len)
    return cls(name=name, model=model, data=data, train=train, lora=lora, attention=attention,
               eval=schema.read(EvalConfig, cd.get("eval"), "eval"))


def mesh_config(cd: ml_collections.ConfigDict) -> MeshConfig:
  return schema.read(MeshConfig, cd.mesh, "mesh")


def checkpoint_config(cd: ml_collections.ConfigDict) -> CheckpointConfig:
  return schema.read(CheckpointConfig, cd.checkpoint, "checkpoint")


def init_config(cd: ml_collections.ConfigDict) -> InitConfig:
  return schema.read(InitConfig, cd.init, "init")


def stage_names(cd: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The stage order; a config without `stages` is one stage named `main`."""
  if "stages" not in cd or not cd.stages:
    return ("main",)
  names = _split(cd.get("stage_order", "")) or tuple(cd.stages.keys())
  unknown = [n for n in names if n not in cd.stages]
  if unknown:
    raise ConfigError(f"config stage_order: expected names among {sorted(cd.stages.keys())}, "
                      f"found {unknown}")
  if len(set(names)) != len(names):
    raise ConfigError(f"config stage_order: expected each stage once, found {names}")
  return names


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if key == "model.rope":  # replaced whole: another rope type has other keys
      out[key] = dict(v)
    elif isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


_STAGE_SECTIONS = ("model", "data", "train", "lora", "attention", "eval")


def stage_config(cd: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The top-level sections with stage `name`'s overrides applied."""
  merged = ml_collections.ConfigDict(cd.to_dict())
  merged.lock()
  if name == "main" and ("stages" not in cd or not cd.stages):
    return merged
  overrides = _flatten(cd.stages[name].to_dict())
  for key, value in overrides.items():
    section = key.split(".")[0]
    if section not in _STAGE_SECTIONS:
      raise ConfigError(f"config stages.{name}.{key}: a stage may override "
                        f"{', '.join(_STAGE_SECTIONS)}; found {section!r}")
    if key == "model.rope":
      with merged.unlocked():
        merged.model.rope = ml_collections.ConfigDict(value)
      continue
    try:
      merged.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError):
      raise ConfigError(f"config stages.{name}.{key}: no such key in the top-level `{section}` "
                        "section (mistyped?)") from None
  return merged


def read_stages(cd: ml_collections.ConfigDict) -> list[StageSpec]:
  """Every stage, typed and checked, in order. Model fields left unset and an empty
  `data.tokenizer_path` come from the init checkpoint (`init.path`)."""
  from longctx.train.architecture import init_defaults
  merged = [stage_config(cd, n) for n in stage_names(cd)]
  init_model = init_defaults(cd, merged)
  return [StageSpec.from_config(n, m, init_model) for n, m in zip(stage_names(cd), merged)]
