"""The decoder of every model family, its configuration, the families and RoPE scalings."""
import jax
import flax.linen as nn
import jax.numpy as jnp

from longctx.model.config import ModelConfig, RematPolicy
from longctx.model.llama import Llama
from longctx.model.rope import (DefaultRope, DynamicRope, FixedNtkRope, Llama3Rope, LinearRope,
                                LongRope, RopeScaling, YarnRope, apply_rope, rope_types)


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict:
  """Random float32 parameters (HF's initialisation: normal(initializer_range), norms at 1).

  Returns the plain tree (logical-axis boxes removed); `abstract_params` gives the boxed shapes.
  """
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.meta.unbox(Llama(config).init(rng, tokens)["params"])


__all__ = ["ModelConfig", "RematPolicy", "Llama", "RopeScaling", "DefaultRope", "LinearRope",
           "DynamicRope", "FixedNtkRope", "YarnRope", "Llama3Rope", "LongRope", "apply_rope", "rope_types",
           "init_params"]
