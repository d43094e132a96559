"""Training checkpoints: orbax CheckpointManager holding train state + data state in one step.

  <stage dir>/checkpoints/<step>/state      the TrainState (orbax StandardSave, sharded arrays)
                                 /data       the data iterators' state, one JSON per logical shard
                                 /integrity  a digest of the state (`state_digest`), checked on
                                             restore
  <stage dir>/checkpoints.bad/<step>/        a checkpoint that failed to restore, moved aside
  <stage dir>/final/                      the stage's final parameters (longctx.checkpoint.params
                                          format: what convert, eval and the next stage read)

Saves are asynchronous (the step loop goes on while arrays are written); orbax writes a step
to a temporary directory and renames it when complete, so a kill mid-save leaves no step behind.
Restore takes the abstract state *with the target shardings*, so a run restores onto another
mesh shape. `restore_latest` restores the newest step that restores and passes the integrity
check, moving the bad ones aside with a warning; it never returns garbage and never falls back
to a fresh start when checkpoints exist.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from longctx.checkpoint.params import CONFIG_FILE, PARAMS_DIR, copy_assets
from longctx.model.config import ModelConfig


class DataStateHandler(ocp.CheckpointHandler):
  """The data iterators' state: `shard_<s>.process_<p>.json` per logical shard."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    save_state_files(directory, args.states)

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
    return load_state_files(directory)

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    """Nothing to do: `save` writes every file completely (and orbax renames the step's
    temporary directory only after all handlers finished)."""

  def close(self):
    """Nothing to do: the handler holds no open files or threads."""


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  states: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def save_state_files(directory: str, states: dict[str, Any]) -> None:
  """One JSON file per logical shard; every process writes the shards it ran (same content)."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for shard, state in states.items():
    (directory / f"shard_{shard}.process_{jax.process_index()}.json").write_text(json.dumps(state))


def load_state_files(directory: str) -> dict[str, Any]:
  states = {}
  for path in sorted(epath.Path(directory).iterdir(), key=lambda p: p.name):
    if path.name.startswith("shard_") and path.name.endswith(".json"):
      states.setdefault(path.name.split(".")[0][len("shard_"):], json.loads(path.read_text()))
  return states


ITEMS = ("state", "data", "integrity")


def make_manager(directory: str, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(_absolute(directory), options=options, item_names=ITEMS)


@jax.jit
def _leaf_sums(state):
  return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
          for x in jax.tree.leaves(state)]


def state_digest(state) -> dict:
  """A cheap fingerprint of a train state: every leaf's sum and sum of squares (float32, on the
  devices), and the step. Garbled or truncated array data changes it far beyond the rounding of
  a reduction over another mesh."""
  sums = np.asarray(jax.device_get(_leaf_sums(state)), np.float64)
  return {"step": int(jax.device_get(state.step)), "leaves": sums.tolist()}


def check_digest(saved: dict, restored: dict, where: str, rtol: float = 1e-4) -> None:
  """ValueError naming `where` when a restored state's digest is not the saved one."""
  want, got = np.asarray(saved["leaves"]), np.asarray(restored["leaves"])
  if saved["step"] != restored["step"] or want.shape != got.shape:
    raise ValueError(f"{where}: restored state has step {restored['step']} and {len(got)} "
                     f"leaves; the checkpoint recorded step {saved['step']}, {len(want)} leaves")
  bad = ~np.isclose(got, want, rtol=rtol, atol=rtol * (np.abs(want).max(axis=0) + 1e-30))
  if np.any(bad):
    leaf = int(np.argwhere(bad)[0][0])
    raise ValueError(f"{where}: the arrays read back do not match what was saved (leaf {leaf}: "
                     f"sum, sum of squares {got[leaf].tolist()}, recorded {want[leaf].tolist()})")


def save(manager: ocp.CheckpointManager, step: int, state, data_states: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=DataStateSave(data_states),
                                             integrity=ocp.args.JsonSave(state_digest(state))),
               force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  """(state placed as `abstract_state`'s shardings say, data states by logical shard), after the
  integrity check (ValueError on a mismatch; checkpoints written before it have none)."""
  where = os.path.join(os.fspath(manager.directory), str(step))
  has_digest = (epath.Path(where) / "integrity").exists()
  items = dict(state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore())
  if has_digest:
    items["integrity"] = ocp.args.JsonRestore()
  out = manager.restore(step, args=ocp.args.Composite(**items))
  if has_digest:
    check_digest(out["integrity"], state_digest(out["state"]), where)
  return out["state"], out["data"]


class CheckpointError(RuntimeError):
  pass


def restore_latest(manager: ocp.CheckpointManager, abstract_state,
                   log: Callable[[str], None] = print):
  """(step, state, data states) of the newest checkpoint that restores, or None when there is
  none. A step that fails (an error, or the integrity check) is reported by path and moved to
  checkpoints.bad/; when every one fails, CheckpointError names them all."""
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    path = os.path.join(os.fspath(manager.directory), str(step))
    try:
      return (step, *restore(manager, step, abstract_state))
    except Exception as e:  # noqa: BLE001 — whatever orbax or tensorstore raise, reported
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      failed.append(f"{path} ({reason})")
      # a failed orbax restore leaves reads in flight whose callbacks find its event loop
      # closed; collecting them here keeps that noise (stderr only) at a known point
      gc.collect()
      moved = _move_aside(manager, step)
      log(f"WARNING: checkpoint {path} does not restore ({reason}); moved to {moved}, trying "
          "the previous one")
  if failed:
    raise CheckpointError(
        f"no checkpoint of this stage restores: {'; '.join(failed)}. They were moved to "
        f"{os.fspath(manager.directory)}.bad/; to restart the stage from its start, rerun (the "
        "moved checkpoints are kept for inspection), or restore a backup of them")
  return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves step's directory to <checkpoints>.bad/<step>.<time> (so a later save of that step
  does not collide with it) and reloads the manager's step list."""
  src = epath.Path(os.fspath(manager.directory)) / str(step)
  dst = epath.Path(os.fspath(manager.directory) + ".bad") / f"{step}.{int(time.time())}"
  if jax.process_index() == 0:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(f"longctx move aside {step}")
  manager.reload()
  return os.fspath(dst)


def save_final_params(path: str, params, cfg: ModelConfig, assets_from: str | None = None) -> None:
  """Sharded params → a longctx params checkpoint (every process writes its shards), with the
  tokenizer files of `assets_from` (the stage's init: an HF directory or the previous final/)."""
  path = epath.Path(_absolute(path))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path / PARAMS_DIR, params, force=True)
    ckpt.wait_until_finished()
  if jax.process_index() == 0 and assets_from:
    copy_assets(assets_from, os.fspath(path))
  if jax.process_index() == 0:
    mark_complete(path, cfg)
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("longctx final params")


def mark_complete(final_dir, cfg: ModelConfig) -> None:
  """Written last: the model config's presence marks a complete final/ (`is_complete`)."""
  (epath.Path(final_dir) / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))


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
