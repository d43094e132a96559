"""GGUF → HF directory, through transformers' own GGUF reader (torch, transformers, gguf).

transformers dequantizes a GGUF file on load but refuses to `save_pretrained` the result ("not
serializable": the model keeps its `quantization_config`). The weights are already float32, so
a plain model of the same architecture, built from the config without that key, takes the
state dict as is. The tokenizer (tokenizer.json, tokenizer_config.json, chat template) is saved
beside it: the directory is a complete HF model that `from-hf`, `load_pretrained` and the data
pipeline read like any other.
"""
from __future__ import annotations

import os
import shutil
import tempfile


def _require_modules() -> None:
  missing = [m for m in ("torch", "transformers", "gguf") if not _importable(m)]
  if missing:
    raise ImportError(f"converting a GGUF file needs {', '.join(missing)}: pip install "
                      f"{' '.join(missing)} (torch: the CPU build will do)")


def _importable(name: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(name) is not None


def gguf_to_hf(gguf_path: str, out_dir: str) -> str:
  """Writes the HF directory of the GGUF file `gguf_path` to `out_dir` (float32 safetensors,
  config.json, generation_config.json, tokenizer files). Atomic: a kill leaves no `out_dir`.
  Returns `out_dir`."""
  if not os.path.isfile(gguf_path):
    raise FileNotFoundError(f"GGUF file: expected a local file, found nothing at {gguf_path!r}")
  if os.path.exists(out_dir):
    raise FileExistsError(f"output directory {out_dir!r} exists: expected a new path")
  _require_modules()
  import torch
  import transformers
  folder, name = os.path.split(os.path.abspath(gguf_path))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                             dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  fields = loaded.config.to_dict()
  fields.pop("quantization_config", None)
  config = type(loaded.config).from_dict(fields)
  plain = type(loaded)(config)
  plain.load_state_dict(loaded.state_dict(), strict=True)
  plain.generation_config = loaded.generation_config
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".gguf-", dir=parent)
  try:
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
