"""Model families as data: each HF `model_type` maps to ModelConfig fields and back.

Llama, Mistral, Qwen2, Qwen3 and Phi-3 differ by a short list of fields of `ModelConfig`
(biases per projection, q/k norm, partial rotary embeddings, the sliding window and which
layers slide, fused weights in the HF files). One decoder (model.llama) computes them all; a
family only says how its config.json keys read into those fields and write back out, what its
HF class hard-codes, and which of its HF weights are fused. Adding a family is one file in this
package that calls `register` (the package imports every module in it).

What a family's config.json holds that changes the computation and longctx does not implement is
refused by name (`HfKeys.refuse`); what is not read at all is returned as notes, which
`ModelConfig.from_hf` reports.
"""
from __future__ import annotations

import importlib
import pkgutil

from longctx.model.families.base import (Family, HfKeys, HfReading, families, get, read_hf,
                                         register, write_hf)

for _module in pkgutil.iter_modules(__path__):
  if _module.name != "base":
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Family", "HfKeys", "HfReading", "families", "get", "read_hf", "register", "write_hf"]
