"""Rotary position embeddings with every scaling longctx trains or exports (METHODS.md §4).

Each scaling is a small frozen dataclass with `from_hf` / `to_hf`, registered by its HF
`rope_type`. The frequencies are computed exactly as transformers computes them
(`modeling_rope_utils.py`): in float32, in the same order of operations, so that a model exported
to HF produces the same logits there.

Legend: B batch, L sequence, H heads, D head dim, F = D/2 frequencies.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp
import numpy as np

_REGISTRY: dict[str, type["RopeScaling"]] = {}


def _register(cls):
  _REGISTRY[cls.rope_type] = cls
  return cls


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
  """inv_freq_j = 1 / theta^(2j/d) in float32, as HF's default initialiser."""
  exponent_F = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / (np.float32(theta) ** exponent_F)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Base class: theta and the static inverse frequencies; subclasses change the frequencies."""
  theta: float = 10_000.0
  rope_type: ClassVar[str] = ""
  # Whether the frequencies depend on the sequence length (dynamic NTK, LongRoPE's two sets).
  length_dependent: ClassVar[bool] = False

  @property
  def switch_length(self) -> int | None:
    """A length past which every position's frequencies change (LongRoPE's switch from the
    short to the long factors), else None. Generation recomputes its cache when a sequence
    grows past it, as transformers' Phi-3 does (eval.generate)."""
    return None

  def inv_freq(self, dim: int, max_position_BL=None):
    """float32 [dim/2] inverse frequencies. `max_position_BL` is used by length-dependent kinds."""
    del max_position_BL
    return jnp.asarray(self.static_inv_freq(dim))

  def static_inv_freq(self, dim: int) -> np.ndarray:
    return _default_inv_freq(self.theta, dim)

  def attention_scaling(self) -> float:
    """The factor s applied to cos and sin (so q·k scales by s²); 1 except for YaRN."""
    return 1.0

  def hf_scaling_params(self) -> dict[str, Any] | None:
    """The `rope_scaling` dict of an HF 4.x config (None for the default kind)."""
    return None

  def to_hf(self, max_position_embeddings: int) -> dict[str, Any]:
    """Top-level HF config keys (`rope_theta`, `rope_scaling`, `max_position_embeddings`).

    Written in the 4.x style, which transformers 4.x and 5.x both read into the same RoPE.
    """
    return {"rope_theta": float(self.theta), "rope_scaling": self.hf_scaling_params(),
            "max_position_embeddings": int(max_position_embeddings)}

  @classmethod
  def from_params(cls, params: Mapping[str, Any], max_position_embeddings: int) -> "RopeScaling":
    del max_position_embeddings
    return cls(theta=float(params["rope_theta"]))

  @staticmethod
  def from_hf(hf_config: Mapping[str, Any]) -> "RopeScaling":
    """Reads the RoPE of an HF config.json dict, in either the 4.x or the 5.x format.

    4.x: `rope_theta` and `rope_scaling` at the top level; 5.x: `rope_parameters` holding both.
    Raises ValueError for an unsupported type or missing key, naming what was found.
    """
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf_config.get("rope_theta", 10_000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _REGISTRY:
      raise ValueError(f"Unsupported rope_type {rope_type!r} in HF config; expected one of "
                       f"{sorted(_REGISTRY)}")
    max_pos = int(hf_config.get("max_position_embeddings", 2048))
    try:
      return _REGISTRY[rope_type].from_params(params, max_pos)
    except KeyError as e:
      raise ValueError(f"rope_type {rope_type!r} needs key {e} in its parameters; found "
                       f"{sorted(params)}") from None

  def to_dict(self) -> dict[str, Any]:
    return {"rope_type": self.rope_type, **dataclasses.asdict(self)}

  @staticmethod
  def from_dict(d: Mapping[str, Any]) -> "RopeScaling":
    d = dict(d)
    kind = d.pop("rope_type")
    if kind not in _REGISTRY:
      raise ValueError(f"Unknown rope_type {kind!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[kind](**d)


@_register
@dataclasses.dataclass(frozen=True)
class DefaultRope(RopeScaling):
  """Plain RoPE. ABF (adjusted base frequency) is this with a larger theta, e.g. 500000."""
  rope_type: ClassVar[str] = "default"


@_register
@dataclasses.dataclass(frozen=True)
class LinearRope(RopeScaling):
  """Position interpolation: inv_freq / factor."""
  factor: float = 1.0
  rope_type: ClassVar[str] = "linear"

  def static_inv_freq(self, dim):
    return (_default_inv_freq(self.theta, dim) / np.float32(self.factor)).astype(np.float32)

  def hf_scaling_params(self):
    return {"rope_type": "linear", "factor": float(self.factor)}

  @classmethod
  def from_params(cls, params, max_position_embeddings):
    return cls(theta=float(params["rope_theta"]), factor=float(params["factor"]))


def _ntk_theta(theta, factor, seq_len, max_pos, dim, xp=jnp):
  """theta' = theta·(factor·S/max_pos − (factor−1))^(d/(d−2)), S = max(seq_len, max_pos), in float32.

  The order of float32 operations follows HF's `_compute_dynamic_ntk_parameters` at run time.
  `xp` is jax.numpy (traced lengths) or numpy (static lengths).
  """
  seq_len = xp.maximum(xp.asarray(seq_len, xp.int32), max_pos).astype(xp.float32)
  ratio = xp.float32(factor) * seq_len / xp.float32(max_pos) - xp.float32(factor - 1)
  return xp.float32(theta) * ratio ** xp.float32(dim / (dim - 2))


@_register
@dataclasses.dataclass(frozen=True)
class DynamicRope(RopeScaling):
  """HF's dynamic NTK: theta grows with the sequence length once it exceeds max_position_embeddings.

  The length is max(positions) + 1 over the batch, as HF computes it in one forward pass. (HF's
  module also caches the largest length seen across calls; longctx is stateless, see README.)
  """
  factor: float = 1.0
  max_position_embeddings: int = 2048
  rope_type: ClassVar[str] = "dynamic"
  length_dependent: ClassVar[bool] = True

  def inv_freq(self, dim, max_position_BL=None):
    seq_len = self.max_position_embeddings if max_position_BL is None else jnp.max(max_position_BL) + 1
    theta = _ntk_theta(self.theta, self.factor, seq_len, self.max_position_embeddings, dim)
    exponent_F = jnp.arange(0, dim, 2, dtype=jnp.float32) / jnp.float32(dim)
    return jnp.float32(1.0) / theta ** exponent_F

  def hf_scaling_params(self):
    return {"rope_type": "dynamic", "factor": float(self.factor)}

  def to_hf(self, max_position_embeddings):
    del max_position_embeddings  # HF reads the NTK reference length from this key.
    return super().to_hf(self.max_position_embeddings)

  @classmethod
  def from_params(cls, params, max_position_embeddings):
    return cls(theta=float(params["rope_theta"]), factor=float(params["factor"]),
               max_position_embeddings=max_position_embeddings)


@_register
@dataclasses.dataclass(frozen=True)
class FixedNtkRope(RopeScaling):
  """XVERSE's NTK (METHODS.md §3): a fixed base for a target length L over trained length P.

  alpha = L/(P/2) − 1; theta' = theta·alpha^(d/(d−2)). This is HF `dynamic` with factor 2 evaluated
  at L, so it exports as `{"rope_type": "dynamic", "factor": 2.0}` with max_position_embeddings P;
  HF then applies the same base at length L and adapts it to other lengths.
  """
  trained_length: int = 32_768
  target_length: int = 262_144
  factor: float = 2.0
  rope_type: ClassVar[str] = "xverse_ntk"

  def static_inv_freq(self, dim):
    theta = _ntk_theta(self.theta, self.factor, self.target_length, self.trained_length, dim, xp=np)
    return _default_inv_freq(theta, dim)

  def to_hf(self, max_position_embeddings):
    del max_position_embeddings
    return DynamicRope(self.theta, self.factor, self.trained_length).to_hf(self.trained_length)

  @classmethod
  def from_params(cls, params, max_position_embeddings):
    return cls(theta=float(params["rope_theta"]), trained_length=max_position_embeddings,
               target_length=int(params["target_length"]), factor=float(params.get("factor", 2.0)))


@_register
@dataclasses.dataclass(frozen=True)
class YarnRope(RopeScaling):
  """YaRN: interpolate low frequencies, keep high ones, ramp between; scale cos/sin by s."""
  factor: float = 1.0
  original_max_position_embeddings: int = 2048
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True
  rope_type: ClassVar[str] = "yarn"

  def attention_scaling(self):
    if self.attention_factor is not None:
      return float(self.attention_factor)

    def get_mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if self.mscale and self.mscale_all_dim:
      return float(get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim))
    return get_mscale(self.factor)

  def _correction_range(self, dim):
    def corr(rotations):
      return (dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))
              / (2 * math.log(self.theta)))
    low, high = corr(self.beta_fast), corr(self.beta_slow)
    if self.truncate:
      low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)

  def static_inv_freq(self, dim):
    low, high = self._correction_range(dim)
    if low == high:
      high += 0.001  # HF's guard against a zero-width ramp.
    pos_freqs_F = np.float32(self.theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation_F = np.float32(1.0) / pos_freqs_F
    interpolation_F = np.float32(1.0) / (np.float32(self.factor) * pos_freqs_F)
    ramp_F = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                     / np.float32(high - low), 0, 1).astype(np.float32)
    keep_F = np.float32(1.0) - ramp_F
    return (interpolation_F * (np.float32(1.0) - keep_F) + extrapolation_F * keep_F).astype(np.float32)

  def hf_scaling_params(self):
    out = {"rope_type": "yarn", "factor": float(self.factor),
           "original_max_position_embeddings": int(self.original_max_position_embeddings),
           "beta_fast": float(self.beta_fast), "beta_slow": float(self.beta_slow)}
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
      if getattr(self, key) is not None:
        out[key] = float(getattr(self, key))
    if not self.truncate:
      out["truncate"] = False
    return out

  @classmethod
  def from_params(cls, params, max_position_embeddings):
    factor = params.get("factor")
    original = int(params.get("original_max_position_embeddings", max_position_embeddings))
    if factor is None:
      factor = max_position_embeddings / original
    return cls(theta=float(params["rope_theta"]), factor=float(factor),
               original_max_position_embeddings=original,
               beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
               attention_factor=params.get("attention_factor"), mscale=params.get("mscale"),
               mscale_all_dim=params.get("mscale_all_dim"), truncate=bool(params.get("truncate", True)))


@_register
@dataclasses.dataclass(frozen=True)
class Llama3Rope(RopeScaling):
  """Llama 3.1: long wavelengths divided by factor, short kept, smooth blend in between."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  rope_type: ClassVar[str] = "llama3"

  def static_inv_freq(self, dim):
    inv_F = _default_inv_freq(self.theta, dim)
    old = self.original_max_position_embeddings
    low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
    wavelen_F = (np.float32(2 * math.pi) / inv_F).astype(np.float32)
    scaled_F = np.where(wavelen_F > low_wavelen, inv_F / np.float32(self.factor), inv_F).astype(np.float32)
    smooth_F = ((np.float32(old) / wavelen_F - np.float32(self.low_freq_factor))
                / np.float32(self.high_freq_factor - self.low_freq_factor)).astype(np.float32)
    smoothed_F = ((1 - smooth_F) * scaled_F / np.float32(self.factor) + smooth_F * scaled_F)
    medium_F = ~(wavelen_F < high_wavelen) & ~(wavelen_F > low_wavelen)
    return np.where(medium_F, smoothed_F, scaled_F).astype(np.float32)

  def hf_scaling_params(self):
    return {"rope_type": "llama3", "factor": float(self.factor),
            "low_freq_factor": float(self.low_freq_factor),
            "high_freq_factor": float(self.high_freq_factor),
            "original_max_position_embeddings": int(self.original_max_position_embeddings)}

  @classmethod
  def from_params(cls, params, max_position_embeddings):
    return cls(theta=float(params["rope_theta"]), factor=float(params["factor"]),
               low_freq_factor=float(params["low_freq_factor"]),
               high_freq_factor=float(params["high_freq_factor"]),
               original_max_position_embeddings=int(
                   params.get("original_max_position_embeddings", max_position_embeddings)))


def _longrope_attention_factor(factor: float, original: int) -> float:
  """LongRoPE's default scale of cos / sin: sqrt(1 + ln(factor) / ln(original)), 1 if factor <= 1
  (transformers' `_compute_longrope_parameters`)."""
  if factor <= 1.0:
    return 1.0
  return math.sqrt(1 + math.log(factor) / math.log(original))


@_register
@dataclasses.dataclass(frozen=True)
class LongRope(RopeScaling):
  """LongRoPE (Phi-3, Phi-3.5, Phi-4-mini): per-frequency rescale factors, one set for sequences
  up to `original_max_position_embeddings` (short) and one beyond it (long).

  inv_freq_j = 1 / (ext_j · theta^(2j/d)), ext = short_factor or long_factor, chosen once per
  forward pass by the sequence length max(positions) + 1 over the batch, as transformers chooses
  it; under context parallelism that is the global row's length. cos and sin are scaled by
  `attention_factor`, by default sqrt(1 + ln(factor) / ln(original)) with factor =
  max_position_embeddings / original (resolved when the config is read). Both factor lists have
  rotary_dim / 2 entries.
  """
  short_factor: tuple[float, ...] = ()
  long_factor: tuple[float, ...] = ()
  original_max_position_embeddings: int = 4096
  factor: float = 1.0
  attention_factor: float | None = None
  rope_type: ClassVar[str] = "longrope"
  length_dependent: ClassVar[bool] = True

  def __post_init__(self):
    for name in ("short_factor", "long_factor"):  # JSON and configs give lists
      object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
    if len(self.short_factor) != len(self.long_factor) or not self.short_factor:
      raise ValueError(f"longrope: short_factor and long_factor must be non-empty lists of one "
                       f"length; found {len(self.short_factor)} and {len(self.long_factor)}")

  @property
  def switch_length(self) -> int:
    return int(self.original_max_position_embeddings)

  def _inv_freq(self, ext: tuple[float, ...], dim: int) -> np.ndarray:
    if len(ext) != dim // 2:
      raise ValueError(f"longrope: {len(ext)} rescale factors for a rotary dimension of {dim}; "
                       f"expected {dim // 2} (rotary_dim / 2)")
    exponent_F = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pow_F = (np.float32(self.theta) ** exponent_F).astype(np.float32)
    return (np.float32(1.0) / (np.asarray(ext, np.float32) * pow_F)).astype(np.float32)

  def static_inv_freq(self, dim):
    """The short set: what transformers uses when no length is known."""
    return self._inv_freq(self.short_factor, dim)

  def inv_freq(self, dim, max_position_BL=None):
    short_F = jnp.asarray(self._inv_freq(self.short_factor, dim))
    if max_position_BL is None:
      return short_F
    long_F = jnp.asarray(self._inv_freq(self.long_factor, dim))
    seq_len = jnp.max(max_position_BL) + 1
    return jnp.where(seq_len > self.original_max_position_embeddings, long_F, short_F)

  def attention_scaling(self):
    if self.attention_factor is not None:
      return float(self.attention_factor)
    return _longrope_attention_factor(self.factor, self.original_max_position_embeddings)

  def hf_scaling_params(self):
    out = {"rope_type": "longrope", "short_factor": list(self.short_factor),
           "long_factor": list(self.long_factor),
           "original_max_position_embeddings": int(self.original_max_position_embeddings),
           "factor": float(self.factor)}
    if self.attention_factor is not None:
      out["attention_factor"] = float(self.attention_factor)
    return out

  @classmethod
  def from_params(cls, params, max_position_embeddings):
    original = int(params.get("original_max_position_embeddings") or max_position_embeddings)
    factor = params.get("factor")
    if factor is None:  # transformers: the ratio of the two lengths (Phi-3 writes no factor)
      factor = max_position_embeddings / original
    attention = params.get("attention_factor")
    return cls(theta=float(params["rope_theta"]), short_factor=params["short_factor"],
               long_factor=params["long_factor"], original_max_position_embeddings=original,
               factor=float(factor), attention_factor=None if attention is None else float(attention))

  @classmethod
  def from_static(cls, rope: RopeScaling, dim: int, original: int) -> "LongRope":
    """A length-independent scaling (linear, YaRN, llama3, XVERSE's NTK, another theta) written
    as LongRoPE with equal short and long factors ext_j = 1 / (inv_freq_j · theta^(2j/d)) and
    its cos / sin scale: the form a Phi-3 config can hold. Equal to `rope` up to float32
    rounding of the factors (one or two ulps of inv_freq)."""
    if rope.length_dependent:
      raise ValueError(f"rope_type {rope.rope_type!r} depends on the sequence length and has no "
                       "LongRoPE form")
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim
    ext = 1.0 / (rope.static_inv_freq(dim).astype(np.float64) * float(rope.theta) ** exponent)
    factors = tuple(float(x) for x in ext)
    return cls(theta=float(rope.theta), short_factor=factors, long_factor=factors,
               original_max_position_embeddings=int(original), factor=1.0,
               attention_factor=float(rope.attention_scaling()))


def rope_types() -> list[str]:
  return sorted(_REGISTRY)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_BLHD, positions_BL, rope: RopeScaling, max_position_BL=None,
               rotary_dim: int | None = None):
  """Rotates q or k by their positions: x·cos·s + rotate_half(x)·sin·s, computed in float32.

  `max_position_BL` (defaults to `positions_BL`) feeds the length of length-dependent kinds.
  `rotary_dim` < D rotates only the first rotary_dim features and passes the rest through
  (partial rotary embeddings, e.g. Phi-4-mini's 0.75 · D). Returns an array of x's dtype.
  """
  dim = x_BLHD.shape[-1]
  if rotary_dim is not None and rotary_dim < dim:
    rotated_BLHR = apply_rope(x_BLHD[..., :rotary_dim], positions_BL, rope, max_position_BL)
    return jnp.concatenate([rotated_BLHR, x_BLHD[..., rotary_dim:]], axis=-1)
  inv_freq_F = rope.inv_freq(dim, positions_BL if max_position_BL is None else max_position_BL)
  freqs_BLF = positions_BL.astype(jnp.float32)[..., None] * inv_freq_F[None, None, :]
  emb_BLD = jnp.concatenate([freqs_BLF, freqs_BLF], axis=-1)
  scale = jnp.float32(rope.attention_scaling())
  cos_BL1D = (jnp.cos(emb_BLD) * scale)[:, :, None, :]
  sin_BL1D = (jnp.sin(emb_BLD) * scale)[:, :, None, :]
  x32_BLHD = x_BLHD.astype(jnp.float32)
  return (x32_BLHD * cos_BL1D + _rotate_half(x32_BLHD) * sin_BL1D).astype(x_BLHD.dtype)


def registered() -> dict[str, type]:
  """{rope_type: scaling class} of every registered scaling."""
  return dict(_REGISTRY)


# fields of a new scaling that default to the base model's trained context length
_TRAINED_LENGTH_KEYS = ("original_max_position_embeddings", "max_position_embeddings",
                        "trained_length")


def override(base: RopeScaling, trained_length: int, given: Mapping[str, Any]) -> RopeScaling:
  """`base` (a model's RoPE, trained to `trained_length` positions) changed by `given`.

  Keys without `rope_type` (e.g. {"theta": 1e6}, ABF) replace fields of `base`'s scaling; a
  `rope_type` makes a new scaling whose `theta` and trained length default to the base's.
  None values count as not given.
  """
  given = {k: v for k, v in given.items() if v is not None}
  if not given:
    return base
  if "rope_type" not in given:
    try:
      return dataclasses.replace(base, **given)
    except TypeError:
      names = [f.name for f in dataclasses.fields(base)]
      raise ValueError(f"model.rope: the checkpoint's rope_type {base.rope_type!r} has keys "
                       f"{names}; found {sorted(given)} (set rope_type to change the scaling)"
                       ) from None
  cls = _REGISTRY.get(given["rope_type"])
  if cls is None:
    raise ValueError(f"model.rope.rope_type: expected one of {sorted(_REGISTRY)}, found "
                     f"{given['rope_type']!r}")
  names = {f.name for f in dataclasses.fields(cls)}
  extra = sorted(set(given) - names - {"rope_type"})
  if extra:
    raise ValueError(f"model.rope: rope_type {cls.rope_type!r} takes {sorted(names)}; found "
                     f"{extra} as well")
  defaults = {"theta": base.theta, **{k: trained_length for k in _TRAINED_LENGTH_KEYS}}
  return RopeScaling.from_dict({**{k: v for k, v in defaults.items() if k in names}, **given})
