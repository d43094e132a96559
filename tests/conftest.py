"""Test environment: 8 emulated CPU devices, strict rank promotion, fixed seeds.

XLA_FLAGS must be set before jax is first imported, so this runs at conftest import time.
"""
import os
import random

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

SEED = 0


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """A `matrix` test keeps its first case in the quick loop; its other cases are marked `slow`
  (before `-m` deselects: tryfirst)."""
  seen = set()
  for item in items:
    if item.get_closest_marker("matrix") is not None:
      key = (str(item.path), item.originalname)
      if key in seen:
        item.add_marker(pytest.mark.slow)
      seen.add(key)


@pytest.fixture(autouse=True)
def _fixed_seeds():
  """Every test starts from the same Python, NumPy and (if present) torch seeds."""
  random.seed(SEED)
  np.random.seed(SEED)
  try:
    import torch
  except ImportError:
    pass
  else:
    torch.manual_seed(SEED)
  yield


@pytest.fixture
def rng():
  return np.random.default_rng(SEED)


@pytest.fixture
def key():
  return jax.random.PRNGKey(SEED)


@pytest.fixture(scope="session")
def smollm2_dir():
  """The HF directory of SmolLM2-135M-Instruct (tests/real_model.py), converted once."""
  from tests import real_model
  return real_model.hf_dir()
