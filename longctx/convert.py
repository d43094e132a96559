"""Checkpoint conversion: `python -m longctx.convert {from-gguf,from-hf,to-hf,to-peft} SRC DST`.

  from-gguf FILE HF_DIR      a GGUF file (dequantized by transformers) -> HF directory with
                             float32 safetensors and the tokenizer (needs torch, transformers, gguf)

  from-hf HF_DIR OUT_DIR     HF model of any family in longctx.model.families (llama, mistral,
                             qwen2, qwen3, phi3; safetensors, sharded or not) -> longctx checkpoint
  to-hf   CKPT_DIR HF_DIR    longctx checkpoint -> HF model of its family (config.json +
                             safetensors; Phi-3's fused weights stacked again); a LoRA
                             checkpoint is exported with its adapters merged into the weights,
                             or, with --base_only, as the frozen base without them
  to-peft CKPT_DIR OUT_DIR   LoRA checkpoint -> PEFT adapter (adapter_config.json +
                             adapter_model.safetensors) for the HF export of its base:

    python -m longctx.convert to-hf CKPT base/ --base_only
    python -m longctx.convert to-peft CKPT adapter/ --base_model base/
    # PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base/"), "adapter/")

Tensors keep their dtype unless `--dtype` casts them, so from-hf then to-hf is bit-exact.
"""
from __future__ import annotations

import argparse
import functools
import sys

from longctx.cli import HelpFormatter, old_spellings, respell
from longctx.checkpoint import hf, peft
from longctx.checkpoint.params import copy_assets, load_params, save_params
from longctx.model import lora
from longctx.model.config import ModelConfig


def from_hf(hf_dir: str, out_dir: str, progress: bool = True) -> ModelConfig:
  cfg = ModelConfig.from_hf(hf.read_hf_config(hf_dir))
  params = hf.read_hf_params(hf_dir, cfg, progress=progress)
  save_params(out_dir, params, cfg)
  copy_assets(hf_dir, out_dir)  # tokenizer, chat template, generation defaults
  return cfg


def to_hf(ckpt_dir: str, hf_dir: str, *, dtype: str | None = None,
          max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
          base_only: bool = False) -> ModelConfig:
  """Exports a checkpoint; LoRA adapters are merged (or dropped with `base_only`). Returns the
  exported (base) config."""
  cfg, params = load_params(ckpt_dir)
  if cfg.has_lora:
    params, cfg = (lora.drop_lora if base_only else lora.merge_lora)(params, cfg)
  hf.write_hf(params, cfg, hf_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress)
  if "generation_config.json" not in copy_assets(ckpt_dir, hf_dir):
    hf.write_generation_config(cfg, hf_dir)
  return cfg


def to_peft(ckpt_dir: str, out_dir: str, *, modules_to_save=lora.DEFAULT_TRAINABLE,
            base_model_name_or_path: str | None = None, dtype: str | None = None) -> dict:
  """Exports a LoRA checkpoint's adapters (and its fully trained modules) for PEFT."""
  cfg, params = load_params(ckpt_dir)
  return peft.write_peft(params, cfg, out_dir, modules_to_save=modules_to_save,
                         base_model_name_or_path=base_model_name_or_path, dtype=dtype)


def _parse_size(text: str) -> int:
  units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  upper = text.strip().upper()
  for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
    if upper.endswith(unit):
      return int(float(upper[:-len(unit)]) * mult)
  return int(upper)


def _parser() -> argparse.ArgumentParser:
  """The command line: one subcommand per direction of conversion."""
  parser = argparse.ArgumentParser(prog="python -m longctx.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  add = functools.partial(sub.add_parser, formatter_class=HelpFormatter)
  p = add("from-gguf", help="GGUF file -> HF directory (float32, tokenizer)")
  p.add_argument("gguf_file")
  p.add_argument("hf_dir")
  p = add("from-hf", help="HF directory (any family) -> longctx checkpoint")
  p.add_argument("hf_dir")
  p.add_argument("out_dir")
  p = add("to-hf", help="longctx checkpoint -> HF directory of its family")
  p.add_argument("ckpt_dir")
  p.add_argument("hf_dir")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="cast every tensor (default: keep each tensor's dtype)")
  p.add_argument("--max_shard_size", default="5GB", type=_parse_size,
                 help="shard safetensors above this size, e.g. 5GB, 500MB (default: 5GB)")
  p.add_argument("--base_only", action="store_true",
                 help="LoRA checkpoint: export the frozen base without the adapters (the base a "
                      "to-peft adapter loads onto) instead of merging them")
  p = add("to-peft", help="LoRA longctx checkpoint -> PEFT adapter directory")
  p.add_argument("ckpt_dir")
  p.add_argument("out_dir")
  p.add_argument("--modules_to_save", default=",".join(lora.DEFAULT_TRAINABLE),
                 help="comma-separated fragments of the parameters training updated fully, as "
                      "in the lora config's `trainable` (default %(default)s; '' for none)")
  p.add_argument("--base_model", default=None,
                 help="base_model_name_or_path written into adapter_config.json")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="cast every tensor (default: keep each tensor's dtype)")
  for p in sub.choices.values():
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
  return parser


# The flags' dashed spellings before they were unified (longctx.cli).
_OLD = old_spellings("--max_shard_size", "--base_only", "--modules_to_save", "--base_model",
                     "--no_progress")


def main(argv=None) -> int:
  args = _parser().parse_args(respell(sys.argv[1:] if argv is None else argv, _OLD))
  if args.command == "from-gguf":
    from longctx.checkpoint.gguf import gguf_to_hf
    print(f"wrote HF directory {gguf_to_hf(args.gguf_file, args.hf_dir)}")
  elif args.command == "from-hf":
    cfg = from_hf(args.hf_dir, args.out_dir, progress=not args.no_progress)
    print(f"wrote longctx checkpoint {args.out_dir}: {cfg.num_params():,} parameters, "
          f"rope {cfg.rope.rope_type}")
  elif args.command == "to-peft":
    fragments = tuple(f.strip() for f in args.modules_to_save.split(",") if f.strip())
    config = to_peft(args.ckpt_dir, args.out_dir, modules_to_save=fragments,
                     base_model_name_or_path=args.base_model, dtype=args.dtype)
    print(f"wrote PEFT adapter {args.out_dir}: r={config['r']}, alpha={config['lora_alpha']}, "
          f"targets {config['target_modules']}, modules_to_save {config['modules_to_save']}")
  else:
    cfg = to_hf(args.ckpt_dir, args.hf_dir, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                progress=not args.no_progress, base_only=args.base_only)
    print(f"wrote HF checkpoint {args.hf_dir}: {cfg.num_params():,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
