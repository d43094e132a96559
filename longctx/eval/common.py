"""What every eval command shares: the model flags (attention, mesh, RoPE), the tokenizer flag,
the memory limit on lengths, output files.

Attention (`EvalAttention`), in the trainer's words (`attention.AttentionImpl`, `Strategy`,
`Layout`): `--attention=tiled` by default (tiles of 1024, memory O(P · tile)); `dense` is the
O(P²) oracle; `context_parallel` splits the prompt over `--seq` devices with `--strategy` (ring,
all_gather or ulysses) in `--layout` (the prefill and its KV cache sharded along the sequence).
The old spellings `--attention=blockwise` and `--attention=ring|all_gather|ulysses` still work,
with a note naming the new ones.

The limit on lengths: an evaluation at prompt length P with T new tokens and batch B holds the
parameters, the KV cache (2 · B · kv_heads · head_dim · slots, where a full layer keeps P+T slots
and a sliding-window layer min(W, P+T): model.kv_cache), the prefill's attention
scores (B · heads · P · keys per tile, float32, scores and probabilities; P keys when dense) and
the logits (B · P · vocab, float32, when scoring; B · vocab for a prefill, which computes only
the last position's); under the ring everything but the parameters and the windowed layers'
rings (whole on every device) is split over the devices. `check_fits` compares that estimate with a `MemoryBudget` (by default
90% of the accelerator's memory, or of the host's RAM on CPU) and, when it does not fit, says the
longest length that would.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Sequence

from longctx.attention.layouts import Layout
from longctx.attention.spec import AttentionImpl, AttentionSpec, Tiles
from longctx.attention.strategies import ONE_AXIS, Strategy
from longctx.data.config import TokenizerKind
from longctx.data.tokenizers import Tokenizer, make_tokenizer
from longctx.model import kv_cache
from longctx.model.config import ModelConfig

_GIB = 1 << 30
_TOKENIZER_SUFFIXES = {".json": TokenizerKind.HF, ".model": TokenizerKind.SENTENCEPIECE}
AUTO_TOKENIZER = "auto"
DIRECTORY_TOKENIZERS = ("tokenizer.json", "tokenizer.model")  # looked for in this order
# The byte tokenizer's 260 ids, padded (configs/tiny_passkey.py has 400); a model with a larger
# vocabulary was trained with another tokenizer, whose text the byte ids would not be.
BYTE_VOCAB_LIMIT = 512


class ContextTooLongError(ValueError):
  """A requested length does not fit in the memory budget."""


def tokenizer_from_flag(value: str) -> Tokenizer:
  """`byte` → the byte tokenizer; a path to tokenizer.json (HF) or *.model (sentencepiece)."""
  if value == TokenizerKind.BYTE.value:
    return make_tokenizer(TokenizerKind.BYTE)
  if not os.path.isfile(value):
    raise FileNotFoundError(f"--tokenizer: expected 'byte' or a local tokenizer file "
                            f"(tokenizer.json or *.model), found nothing at {value!r}")
  kind = _TOKENIZER_SUFFIXES.get(os.path.splitext(value)[1])
  if kind is None:
    raise ValueError(f"--tokenizer {value!r}: expected a file ending in "
                     f"{sorted(_TOKENIZER_SUFFIXES)} or 'byte'")
  return make_tokenizer(kind, value)


def open_tokenizer(flag: str, checkpoint: str) -> Tokenizer:
  """`--tokenizer`: `auto` (the default) takes the checkpoint directory's tokenizer.json or
  tokenizer.model (a longctx checkpoint carries its init's; an HF directory has its own), and
  the byte tokenizer where there is none; says on stderr which it took. Otherwise as
  `tokenizer_from_flag`."""
  if flag != AUTO_TOKENIZER:
    return tokenizer_from_flag(flag)
  for name in DIRECTORY_TOKENIZERS:
    path = os.path.join(checkpoint, name)
    if os.path.isfile(path):
      print(f"tokenizer: {path} (the checkpoint directory's; --tokenizer overrides it)",
            file=sys.stderr)
      return tokenizer_from_flag(path)
  print(f"tokenizer: byte (no {' or '.join(DIRECTORY_TOKENIZERS)} in {checkpoint}; "
        "--tokenizer overrides it)", file=sys.stderr)
  return tokenizer_from_flag(TokenizerKind.BYTE.value)


def tokenizer_name(tokenizer: Tokenizer) -> str:
  """What a report records: the tokenizer file's absolute path, or `byte`."""
  path = getattr(tokenizer, "path", None)
  return os.path.abspath(path) if path else TokenizerKind.BYTE.value


@dataclasses.dataclass(frozen=True)
class EvalAttention:
  """How an evaluation attends over its prompts (see the module docstring). `impl` also takes
  a strategy's name (the old `--attention=ring` form): context parallel with that strategy."""
  impl: AttentionImpl = AttentionImpl.TILED
  seq: int = 1
  strategy: Strategy = Strategy.RING
  layout: Layout = Layout.ZIGZAG
  tile: int = 1024

  def __post_init__(self):
    impl, strategy = self.impl, self.strategy
    if str(impl).lower().replace("-", "_") in Strategy.names() and str(impl).lower() != "ring":
      print(f"note: --attention={impl} is now --attention=context_parallel --strategy={impl}",
            file=sys.stderr)
      impl, strategy = AttentionImpl.CONTEXT_PARALLEL, impl
    object.__setattr__(self, "impl", AttentionImpl.parse(impl, "--attention"))
    object.__setattr__(self, "strategy", Strategy.parse(strategy, "--strategy"))
    object.__setattr__(self, "layout", Layout.parse(self.layout, "--layout"))
    if self.strategy not in ONE_AXIS:
      raise ValueError(f"--strategy: expected one of {[s.value for s in ONE_AXIS]}, found "
                       f"{self.strategy.value!r}")
    if self.seq < 1 or (not self.context_parallel and self.seq != 1):
      raise ValueError(f"--seq={self.seq}: expected 1, or ≥ 1 devices with "
                       f"--attention=context_parallel (found --attention={self.impl})")

  @property
  def context_parallel(self) -> bool:
    return self.impl is AttentionImpl.CONTEXT_PARALLEL

  @property
  def name(self) -> str:
    """What reports record: the strategy when context parallel, else the impl."""
    return (self.strategy if self.context_parallel else self.impl).value

  def spec(self):
    """The `AttentionSpec` of these flags."""
    if self.context_parallel:
      return AttentionSpec(strategy=self.strategy, layout=self.layout)
    return AttentionSpec(impl=self.impl, tiles=Tiles(block_q=self.tile, block_k=self.tile))

  def mesh(self):
    import jax
    import numpy as np
    if self.seq > jax.device_count():
      raise ValueError(f"--seq={self.seq}: expected at most the {jax.device_count()} devices "
                       "here")
    return jax.sharding.Mesh(np.array(jax.devices()[:self.seq]), ("seq",))

  def attention_fn(self):
    return self.spec().function(self.mesh() if self.context_parallel else None)

  def keys_per_query(self, prompt_len: int) -> int:
    return prompt_len if self.impl is AttentionImpl.DENSE else min(prompt_len, self.tile)


def eval_attention(args) -> EvalAttention:
  """The `EvalAttention` of a command's --attention / --seq / --strategy / --layout flags."""
  return EvalAttention(args.attention, args.seq, args.strategy, args.layout)


def parse_rope(text: str) -> dict[str, Any]:
  """`--rope`: "yarn,factor=2" (a new scaling: rope_type first) or "theta=1e6" (keys of the
  model's own scaling), as model.rope.override takes them."""
  out: dict[str, Any] = {}
  for i, item in enumerate(t.strip() for t in text.split(",") if t.strip()):
    key, eq, value = item.partition("=")
    if not eq:
      if i:
        raise ValueError(f"--rope {text!r}: expected rope_type first, then key=value items")
      out["rope_type"] = key
      continue
    out[key.strip()] = _literal(value.strip())
  return out


def _literal(value: str):
  if value.lower() in ("true", "false"):
    return value.lower() == "true"
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return value


def load_model(checkpoint: str, attention: EvalAttention | None = None, rope: str = ""):
  """A `PretrainedModel` from a longctx checkpoint or HF directory (clear missing-path error),
  attending as `attention` says, with `rope` (a `--rope` text) overriding its RoPE."""
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"--checkpoint: expected a directory (longctx checkpoint or HF model), "
                            f"found nothing at {checkpoint!r}")
  from longctx.eval.pretrained import load_pretrained
  from longctx.model import rope as rope_lib
  attention = attention or EvalAttention()
  overrides = {}
  if rope:
    base = ModelConfig.from_directory(checkpoint)
    overrides["rope"] = rope_lib.override(base.rope, base.max_position_embeddings,
                                          parse_rope(rope))
  return load_pretrained(checkpoint, progress=False, attention_fn=attention.attention_fn(),
                         mesh=attention.mesh() if attention.context_parallel else None,
                         attention=attention, **overrides)


def check_vocab(model_config: ModelConfig, tokenizer: Tokenizer) -> None:
  """The tokenizer's ids fit the model, and the byte tokenizer is refused on a model whose
  vocabulary is a subword one (its numbers would be silently wrong)."""
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has "
                     f"{model_config.vocab_size}; use the tokenizer the model was trained with")
  if tokenizer_name(tokenizer) == TokenizerKind.BYTE.value and (
      model_config.vocab_size > BYTE_VOCAB_LIMIT):
    raise ValueError(
        f"--tokenizer: the byte tokenizer ({tokenizer.vocab_size} ids) on a model whose "
        f"vocabulary has {model_config.vocab_size} ids (a byte model has at most "
        f"{BYTE_VOCAB_LIMIT}): the model was trained with another tokenizer; pass "
        "--tokenizer=PATH/tokenizer.json (or *.model), the model's own")


# ---- the memory limit ---------------------------------------------------------------------------
def _detect_memory_bytes() -> int:
  """The first device's memory, or (CPU) the host's physical RAM."""
  from longctx.parallel import devices
  limit = devices.memory_stats().get("bytes_limit")
  return int(limit) if limit else int(devices.host_ram(available=False))


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
  """The bytes an evaluation may use on one device."""
  bytes: int

  @classmethod
  def from_gib(cls, gib: float | None) -> "MemoryBudget":
    """`gib` GiB, or 90% of the device's (or, on CPU, the host's) memory when None."""
    if gib is None:
      return cls(int(0.9 * _detect_memory_bytes()))
    if gib <= 0:
      raise ValueError(f"memory budget must be > 0 GiB, found {gib}")
    return cls(int(gib * _GIB))


def estimate_bytes(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                   attention: EvalAttention | None = None) -> dict[str, int]:
  """The parts of the memory per device an evaluation at this shape needs (see the module
  docstring); `attention` None = dense."""
  attention = attention or EvalAttention("dense")
  act = 2 if cfg.dtype in ("bfloat16", "float16") else 4
  slots, shards = prompt_len + new_tokens, attention.seq
  keys = attention.keys_per_query(prompt_len)
  per_device = {
      "attention_scores": 2 * batch * cfg.num_heads * prompt_len * keys * 4,
      # scoring (no new tokens) needs every position's logits; a prefill only the last one's
      "logits": batch * (prompt_len if new_tokens == 0 else 1) * cfg.vocab_size * 4,
      "activations": 4 * batch * prompt_len * max(cfg.hidden_size, cfg.intermediate_size) * act,
  }
  return {"params": 4 * cfg.num_params(),
          "kv_cache": kv_cache.cache_bytes(cfg, batch, slots, act, shards),
          **{k: -(-v // shards) for k, v in per_device.items()}}


def longest_fitting(cfg: ModelConfig, batch: int, new_tokens: int, budget: MemoryBudget,
                    attention: EvalAttention | None = None) -> int:
  """The largest prompt length whose estimate fits the budget (0 if none)."""
  def fits(n: int) -> bool:
    return sum(estimate_bytes(cfg, batch, n, new_tokens, attention).values()) <= budget.bytes
  lo, hi = 0, 1
  while fits(hi) and hi < 1 << 40:
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def check_fits(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
               budget: MemoryBudget, where: str, attention: EvalAttention | None = None) -> None:
  """Raises ContextTooLongError, naming the parts and the longest length that fits."""
  parts = estimate_bytes(cfg, batch, prompt_len, new_tokens, attention)
  total = sum(parts.values())
  if total <= budget.bytes:
    return
  detail = ", ".join(f"{k} {v / _GIB:.2f}" for k, v in parts.items())
  fit = longest_fitting(cfg, batch, new_tokens, budget, attention)
  raise ContextTooLongError(
      f"{where}: length {prompt_len} (+{new_tokens} new tokens, batch {batch}) needs about "
      f"{total / _GIB:.2f} GiB ({detail} GiB) but the memory budget is "
      f"{budget.bytes / _GIB:.2f} GiB; the longest length that fits is {fit} tokens at batch "
      f"{batch} (lower the length or the batch, or raise --max_memory_gb)")


def validate_lengths(lengths: Sequence[int], what: str) -> list[int]:
  lengths = [int(n) for n in lengths]
  if not lengths or any(n < 1 for n in lengths):
    raise ValueError(f"{what}: expected one or more positive lengths, found {lengths}")
  return lengths


# ---- output -------------------------------------------------------------------------------------
def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def run_info(args, tokenizer: Tokenizer, model) -> dict:
  """What an eval command's results depend on beyond its own flags, recorded in every report and
  by the resumable ones' cache checks: the model, how it is read (the tokenizer taken, the RoPE
  override and the RoPE the model then has) and how it attends."""
  return {"checkpoint": os.path.abspath(args.checkpoint), "tokenizer": tokenizer_name(tokenizer),
          "rope": args.rope, "model_rope": model.config.rope.to_dict(),
          "attention": model.attention.name, "seq": args.seq}


def format_run(info: dict) -> str:
  """The text reports' first line: the same facts as the JSON's run fields."""
  rope = ", ".join(f"{k}={v}" for k, v in info["model_rope"].items() if v is not None)
  rope += f" (--rope {info['rope']})" if info["rope"] else ""
  attention = info["attention"] + (f" over {info['seq']} devices" if info["seq"] > 1 else "")
  return "\n".join([f"checkpoint {info['checkpoint']}", f"tokenizer  {info['tokenizer']}",
                    f"rope       {rope}", f"attention  {attention}"])


def check_run_file(path: str, run: dict) -> None:
  """Writes `run` (what a resumable output directory was made with) to `path`, or, when the file
  exists, checks that this run matches it, so cached results are never mixed across runs. A key
  the file lacks (written by an earlier longctx, which did not record it) is not a difference."""
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous.get("attention") == "blockwise":  # before the renamings (DESIGN.md, "Glossary")
      previous["attention"] = AttentionImpl.TILED.value
    run = json.loads(json.dumps(run))
    changed = sorted(k for k in set(run) | set(previous)
                     if k in previous and previous.get(k) != run.get(k))
    if changed:
      raise ValueError(f"{path}: the cached results beside it are of a different run (differs "
                       f"in {changed}); use another --out or remove them")
    return
  write_json(path, run)


def read_jsonl(path: str) -> list[dict]:
  """Records of a JSONL file; a truncated last line (an interrupted write) is dropped."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        break  # the write was interrupted; that record is redone
      raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from e
  return records


def append_jsonl(path: str, record: dict) -> None:
  """Appends `record` as one line, durably. A partial last line (a write cut off by a kill, which
  `read_jsonl` ignores) is cut off first, so the new record never lands on it."""
  with open(path, "a+b") as f:
    if f.seek(0, os.SEEK_END):
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)
    f.write((json.dumps(record) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table with right-aligned columns."""
  cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def parse_ints(value: str, flag: str) -> list[int]:
  """'1024,2048' → [1024, 2048], with an error naming the flag."""
  try:
    return [int(v) for v in value.split(",") if v.strip()]
  except ValueError as e:
    raise ValueError(f"{flag}: expected comma-separated integers, found {value!r}") from e


def parse_floats(value: str, flag: str) -> list[float]:
  try:
    return [float(v) for v in value.split(",") if v.strip()]
  except ValueError as e:
    raise ValueError(f"{flag}: expected comma-separated numbers, found {value!r}") from e
