"""The longctx model checkpoint: `model_config.json` plus an orbax `params/` directory.

This is what `python -m longctx.convert from-hf` writes and `longctx.load_pretrained` reads.
Parameters keep the dtype they were saved with (an imported bf16 model stays bf16 on disk).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from longctx.model.config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
# The HF files beside the weights that make a model usable: its tokenizer, chat template and
# generation defaults. They travel HF dir -> checkpoint -> each stage's final/ -> HF export.
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "chat_template.jinja", "generation_config.json")


def is_longctx_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def save_params(path: str, params: dict, cfg: ModelConfig) -> None:
  """Writes `params` (numpy or jax arrays) and the model config under `path` (must not exist)."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, PARAMS_DIR)):
    raise FileExistsError(f"{path}/{PARAMS_DIR} already exists; choose an empty output directory")
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, PARAMS_DIR), params)
    ckpt.wait_until_finished()
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(cfg.to_dict(), f, indent=2)


def copy_assets(src: str, dst: str) -> list[str]:
  """Copies the ASSET_FILES that `src` holds into `dst` (local or remote paths, e.g. gs://);
  returns their names."""
  from etils import epath
  src_dir, dst_dir = epath.Path(src), epath.Path(dst)
  copied = [name for name in ASSET_FILES if (src_dir / name).exists()]
  if copied:
    dst_dir.mkdir(parents=True, exist_ok=True)
  for name in copied:
    (dst_dir / name).write_bytes((src_dir / name).read_bytes())
  return copied


def load_config(path: str) -> ModelConfig:
  from etils import epath
  return ModelConfig.from_dict(json.loads((epath.Path(path) / CONFIG_FILE).read_text()))


def load_params(path: str) -> tuple[ModelConfig, dict]:
  """(config, params as host numpy arrays in their saved dtypes)."""
  path = os.path.abspath(path)
  if not is_longctx_checkpoint(path):
    raise FileNotFoundError(f"{path} is not a longctx checkpoint: expected {CONFIG_FILE} and "
                            f"{PARAMS_DIR}/ inside it")
  with ocp.StandardCheckpointer() as ckpt:
    # A numpy target: restored on the host whatever the saving run's devices (without one,
    # orbax re-creates the saved shardings and refuses a machine with fewer devices).
    saved = ckpt.metadata(os.path.join(path, PARAMS_DIR)).item_metadata
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), saved)
    params = ckpt.restore(os.path.join(path, PARAMS_DIR), target)
  return load_config(path), params
