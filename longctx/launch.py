"""`python -m longctx.launch [--config=configs/NAME.py] [--config.key=value ...]`.

With no flags it runs the embedded default, configs/tiny.py. Until the training loop lands this
job initialises the configured model and runs a forward pass over the first packed batch of the
data pipeline (contract 1), reporting contract 2's loss, tokens/s and parameter count.
"""
from __future__ import annotations

import os
import sys
import time

if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
  # On a CPU-only machine, emulate 8 devices so the sharded code paths run (DESIGN.md, tests).
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from longctx.data import DataConfig, Shard, make_iterator, objective  # noqa: E402
from longctx.model import Llama, ModelConfig, init_params  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "ml_collections config file")


def run_default(config) -> dict[str, float]:
  """Initialises the model and scores the data pipeline's first batch (contract 2's objective)."""
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  data_cfg = DataConfig.from_config_dict(config.data)
  params = init_params(model_cfg, jax.random.PRNGKey(config.seed))
  batch = next(make_iterator(data_cfg, Shard.from_jax()))
  model = Llama(model_cfg)

  @jax.jit
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return objective(nll, batch, data_cfg.objective)

  loss_fn(params, batch).block_until_ready()  # compile
  start = time.perf_counter()
  loss = float(loss_fn(params, batch))
  elapsed = time.perf_counter() - start
  return {"loss": loss, "tokens_per_s": batch["inputs"].size / elapsed,
          "params": model_cfg.num_params(), "documents": int(batch["segment_ids"].max(axis=1).sum()),
          "shape": batch["inputs"].shape}


def main(argv):
  del argv
  config = _CONFIG.value
  print(f"longctx: {jax.device_count()} {jax.devices()[0].platform} devices; config "
        f"{config_flags.get_config_filename(flags.FLAGS['config'])}")
  summary = run_default(config)
  rows, length = summary["shape"]
  print(f"model: {summary['params']:,} parameters; batch {rows}x{length} tokens, "
        f"{summary['documents']} packed documents")
  print(f"forward loss {summary['loss']:.4f} (ln vocab = {np.log(config.model.vocab_size):.4f}); "
        f"{summary['tokens_per_s']:,.0f} tokens/s")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
