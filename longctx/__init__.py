"""longctx: training long-context language models on JAX.

The public entry point for inference is `load_pretrained`:

    import longctx
    model = longctx.load_pretrained(path)   # an HF directory or a longctx checkpoint
    logits = model(tokens)                  # int32 [B, L] -> float32 [B, L, vocab]
"""

__version__ = "0.1.0"


def load_pretrained(path, **kwargs):
  """Loads an HF directory of any registered family (Llama, Mistral, Qwen2, Qwen3, Phi-3) or a
  longctx checkpoint; see `longctx.eval.pretrained`."""
  from longctx.eval.pretrained import load_pretrained as _load
  return _load(path, **kwargs)


__all__ = ["load_pretrained", "__version__"]
