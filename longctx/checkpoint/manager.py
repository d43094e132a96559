"""Training checkpoints: orbax CheckpointManager holding train state + data state in one step.

  <stage dir>/checkpoints/<step>/state   the TrainState (orbax StandardSave, sharded arrays)
                                 /data    the data iterators' state, one JSON per logical shard
  <stage dir>/final/                      the stage's final parameters (longctx.checkpoint.params
                                          format: what convert, eval and the next stage read)

Saves are asynchronous (the step loop goes on while arrays are written); restore takes the
abstract state *with the target shardings*, so a run restores onto another mesh shape.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from longctx.checkpoint.params import CONFIG_FILE, PARAMS_DIR, copy_assets
from longctx.model.config import ModelConfig


class DataStateHandler(ocp.CheckpointHandler):
  """The data iterators' state: `shard_<s>.process_<p>.json` per logical shard."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    from longctx.train.data import save_state_files
    save_state_files(directory, args.states)

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
    from longctx.train.data import load_state_files
    return load_state_files(directory)

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  states: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def make_manager(directory: str, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(_absolute(directory), options=options,
                               item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state, data_states: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=DataStateSave(data_states)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  """(state placed as `abstract_state`'s shardings say, data states by logical shard)."""
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore()))
  return out["state"], out["data"]


def save_final_params(path: str, params, cfg: ModelConfig, assets_from: str | None = None) -> None:
  """Sharded params → a longctx params checkpoint (every process writes its shards), with the
  tokenizer files of `assets_from` (the stage's init: an HF directory or the previous final/)."""
  path = epath.Path(_absolute(path))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path / PARAMS_DIR, params, force=True)
    ckpt.wait_until_finished()
  if jax.process_index() == 0 and assets_from:
    copy_assets(assets_from, os.fspath(path))
  if jax.process_index() == 0:  # written last: its presence marks a complete final/
    (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("longctx final params")


def restore_params(path: str, abstract_params):
  """A longctx params checkpoint restored straight into the given shardings."""
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(epath.Path(_absolute(path)) / PARAMS_DIR, abstract_params)


def _absolute(path) -> str:
  """Local paths made absolute (orbax needs that); URLs such as gs://bucket/dir kept."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def is_complete(final_dir) -> bool:
  """A stage's final/ holds its params and (written last) its model config."""
  final = epath.Path(final_dir)
  return (final / CONFIG_FILE).exists() and (final / PARAMS_DIR).exists()
