"""The training sections of a config (DESIGN.md contract 4) and their typed readers.

A training config holds, besides `model` and `data`:
  seed         int
  init         where the first stage's weights come from: kind "random" | "hf" | "checkpoint"
  mesh         data / fsdp / seq / tensor sizes; -1 takes the remaining devices
  attention    impl "dense" | "blockwise" | "ring"; ring layout "contiguous" | "zigzag" |
               "striped"; tile sizes
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
import enum
from typing import Any

import ml_collections

from longctx.data.config import DataConfig, parse_enum
from longctx.model.config import ModelConfig


class Schedule(enum.Enum):
  COSINE = "cosine"      # linear warm-up, then cosine decay to min_lr_ratio · lr
  CONSTANT = "constant"  # linear warm-up, then constant (LongLoRA's recipe)


class AttentionImpl(enum.Enum):
  DENSE = "dense"
  BLOCKWISE = "blockwise"
  RING = "ring"


class InitKind(enum.Enum):
  RANDOM = "random"
  HF = "hf"                  # a HuggingFace directory (safetensors + config.json)
  CHECKPOINT = "checkpoint"  # a longctx params checkpoint (longctx.checkpoint.params)


def default_config() -> ml_collections.ConfigDict:
  """Every training section with its defaults (model, data and stages are the recipe's)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init = ml_collections.ConfigDict(dict(kind="random", path=""))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, seq=1, tensor=1))
  config.attention = ml_collections.ConfigDict(dict(
      impl="ring", layout="zigzag", block_q=0, block_k=0, block_q_bwd=0, block_k_bwd=0,
      kernel="blockwise"))
  config.lora = ml_collections.ConfigDict(dict(
      enabled=False, rank=8, alpha=16.0, targets="q_proj,k_proj,v_proj,o_proj",
      trainable="embed_tokens,norm", s2_group_fraction=0.25))
  config.train = ml_collections.ConfigDict(dict(
      steps=100, micro_batches=1, learning_rate=3e-4, schedule="cosine", warmup_steps=10,
      min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      log_every=10, peak_tflops_per_device=0.0, loss_chunk=0, offload_optimizer=False))
  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=100, max_to_keep=2, async_save=True))
  config.eval = ml_collections.ConfigDict(dict(
      every_steps=0, batches=2, passkey_lengths="", passkey_trials=5))
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
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  seq: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """impl and layout; block_*: the attention tile sizes, forward (block_q × block_k) and
  backward (None, 0 in a config dict = the defaults of `attention.tiles.tile_config`);
  kernel: the inner kernel (`attention.kernels.KERNELS`: "blockwise"; "pallas_gpu" on GPUs,
  "pallas_tpu" on TPUs, with impl "ring" only).
  """
  impl: AttentionImpl = AttentionImpl.RING
  layout: str = "zigzag"
  block_q: int | None = None
  block_k: int | None = None
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None
  kernel: str = "blockwise"

  def blocks(self, kernel: bool = True) -> dict:
    """The tile sizes and (unless kernel=False: the pure-JAX fallback) the kernel as keyword
    arguments of the attention functions."""
    out = dict(block_q=self.block_q, block_k=self.block_k, block_q_bwd=self.block_q_bwd,
               block_k_bwd=self.block_k_bwd)
    return dict(out, kernel=self.kernel) if kernel else out


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LongLoRA: LoRA on `targets`, `trainable` parameters fully trained, the rest frozen.

  s2_group_fraction: S²-Attn group size as a fraction of the row length in training (LongLoRA
  uses 1/4); 0 trains with full attention. Evaluation always uses full attention.
  """
  enabled: bool = False
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
  trainable: tuple[str, ...] = ("embed_tokens", "norm")
  s2_group_fraction: float = 0.25


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  micro_batches: int = 1
  learning_rate: float = 3e-4
  schedule: Schedule = Schedule.COSINE
  warmup_steps: int = 10
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0          # 0: no clipping
  log_every: int = 10
  peak_tflops_per_device: float = 0.0  # for MFU; 0: from the device kind, if known
  # tokens of each row per device in one chunk of the fused lm_head + cross-entropy
  # (longctx.train.loss); 0: the unchunked reference path (full [tokens, vocab] logits)
  loss_chunk: int = 0
  offload_optimizer: bool = False  # keep the optimizer state in pinned host memory


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int = 0                     # 0: no evaluation during training
  batches: int = 2                         # held-out batches for eval_loss / eval_ppl
  passkey_lengths: tuple[int, ...] = ()    # empty: no passkey
  passkey_trials: int = 5

  @classmethod
  def from_config(cls, cd: ml_collections.ConfigDict | None) -> "EvalConfig":
    if cd is None:
      return cls()
    lengths = tuple(int(x) for x in _split(str(cd.passkey_lengths)))
    cfg = cls(int(cd.every_steps), int(cd.batches), lengths, int(cd.passkey_trials))
    if cfg.every_steps < 0 or cfg.batches < 1 or cfg.passkey_trials < 1 or \
        any(n <= 0 for n in lengths):
      raise ValueError(f"config eval: expected every_steps >= 0, batches >= 1, passkey_trials "
                       f">= 1 and positive passkey_lengths, found {cfg}")
    return cfg


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 100
  max_to_keep: int = 2
  async_save: bool = True


def _split(text: str) -> tuple[str, ...]:
  return tuple(t.strip() for t in text.split(",") if t.strip())


def _positive(where: str, value: int) -> int:
  if value <= 0:
    raise ValueError(f"config {where}: expected > 0, found {value}")
  return value


def _block(attention: ml_collections.ConfigDict, name: str) -> int | None:
  """attention.<name>: a tile size, 0 (or absent) = the default."""
  value = int(attention.get(name, 0) or 0)
  if value < 0:
    raise ValueError(f"config attention.{name}: expected a tile size > 0, or 0 for the "
                     f"default; found {value}")
  return value or None


def _kernel(attention: ml_collections.ConfigDict) -> str:
  """attention.kernel, validated (absent = "blockwise")."""
  from longctx.attention.kernels import check_kernel
  try:
    return check_kernel(attention.get("kernel", None))
  except (ValueError, NotImplementedError) as e:
    raise ValueError(f"config attention.kernel: {e}") from None


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """Everything one stage needs, typed."""
  name: str
  model: ModelConfig
  data: DataConfig
  num_shards: int
  train: TrainConfig
  lora: LoraConfig
  attention: AttentionConfig
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
      raise ValueError(f"config stages.{name}.model: {e}") from None
    t = cd.train
    train = TrainConfig(
        steps=_positive("train.steps", int(t.steps)),
        micro_batches=_positive("train.micro_batches", int(t.micro_batches)),
        learning_rate=float(t.learning_rate),
        schedule=parse_enum(Schedule, t.schedule, "train.schedule"),
        warmup_steps=int(t.warmup_steps), min_lr_ratio=float(t.min_lr_ratio), b1=float(t.b1),
        b2=float(t.b2), eps=float(t.eps), weight_decay=float(t.weight_decay),
        clip_norm=float(t.clip_norm), log_every=_positive("train.log_every", int(t.log_every)),
        peak_tflops_per_device=float(t.peak_tflops_per_device),
        loss_chunk=int(t.get("loss_chunk", 0)),
        offload_optimizer=bool(t.get("offload_optimizer", False)))
    lo = cd.lora
    lora = LoraConfig(enabled=bool(lo.enabled), rank=int(lo.rank), alpha=float(lo.alpha),
                      targets=_split(lo.targets), trainable=_split(lo.trainable),
                      s2_group_fraction=float(lo.s2_group_fraction))
    a = cd.attention
    blocks = {name: _block(a, name) for name in ("block_q", "block_k", "block_q_bwd",
                                                 "block_k_bwd")}
    attention = AttentionConfig(impl=parse_enum(AttentionImpl, a.impl, "attention.impl"),
                                layout=str(a.layout), kernel=_kernel(a), **blocks)
    if attention.impl is AttentionImpl.RING:
      from longctx.attention.layouts import Layout
      parse_enum(Layout, attention.layout, "attention.layout")
    elif attention.kernel != "blockwise":
      # under plain jit XLA cannot split a Pallas call over the data / tensor axes: it would
      # gather the global batch onto every device; the ring runs it inside shard_map
      raise ValueError(f"config attention.kernel={attention.kernel!r} needs attention.impl="
                       f"'ring' (found {attention.impl.value!r}); use kernel='blockwise'")
    return cls(name=name, model=model, data=DataConfig.from_config_dict(cd.data),
               num_shards=_positive("data.num_shards", int(cd.data.num_shards)), train=train,
               lora=lora, attention=attention, eval=EvalConfig.from_config(cd.get("eval")))


def mesh_config(cd: ml_collections.ConfigDict) -> MeshConfig:
  m = cd.mesh
  return MeshConfig(data=int(m.data), fsdp=int(m.fsdp), seq=int(m.seq), tensor=int(m.tensor))


def checkpoint_config(cd: ml_collections.ConfigDict) -> CheckpointConfig:
  c = cd.checkpoint
  return CheckpointConfig(every_steps=_positive("checkpoint.every_steps", int(c.every_steps)),
                          max_to_keep=_positive("checkpoint.max_to_keep", int(c.max_to_keep)),
                          async_save=bool(c.async_save))


def stage_names(cd: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The stage order; a config without `stages` is one stage named `main`."""
  if "stages" not in cd or not cd.stages:
    return ("main",)
  names = _split(cd.get("stage_order", "")) or tuple(cd.stages.keys())
  unknown = [n for n in names if n not in cd.stages]
  if unknown:
    raise ValueError(f"config stage_order: expected names among {sorted(cd.stages.keys())}, "
                     f"found {unknown}")
  if len(set(names)) != len(names):
    raise ValueError(f"config stage_order: expected each stage once, found {names}")
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
      raise ValueError(f"config stages.{name}.{key}: a stage may override "
                       f"{', '.join(_STAGE_SECTIONS)}; found {section!r}")
    if key == "model.rope":
      with merged.unlocked():
        merged.model.rope = ml_collections.ConfigDict(value)
      continue
    try:
      merged.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError):
      raise ValueError(f"config stages.{name}.{key}: no such key in the top-level `{section}` "
                       "section (mistyped?)") from None
  return merged


def read_stages(cd: ml_collections.ConfigDict) -> list[StageSpec]:
  """Every stage, typed and checked, in order. Model fields left unset and an empty
  `data.tokenizer_path` come from the init checkpoint (`init.path`)."""
  from longctx.train.architecture import init_defaults
  merged = [stage_config(cd, n) for n in stage_names(cd)]
  init_model = init_defaults(cd, merged)
  return [StageSpec.from_config(n, m, init_model) for n, m in zip(stage_names(cd), merged)]
