"""configs/tiny.py with overrides (the trainer tests share it), and the fault tests' config:
two stages (8 and 4 steps), a checkpoint every 2."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
    "data.source.num_examples": 24, "data.source.min_tokens": 32, "data.source.max_tokens": 300,
    "data.window": 16, "train.log_every": 1, "checkpoint.every_steps": 2,
    "checkpoint.async_save": True, "checkpoint.max_to_keep": 3,
    "stages.short.data.max_len": 128, "stages.short.train.steps": 8,
    "stages.long.data.max_len": 128, "stages.long.train.steps": 4,
}


def tiny_config_with(overrides: dict):
  """configs/tiny.py with flattened `overrides` applied."""
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def fault_config(overrides=None):
  return tiny_config_with({**OVERRIDES, **(overrides or {})})
