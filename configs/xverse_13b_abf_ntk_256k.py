"""XVERSE-13B-256K: ABF continued pre-training at 32k, then NTK + SFT at 256k (METHODS.md §3).

What:      XVERSE's two stages, from the 8K XVERSE-13B base (the XVERSE-Long-256K article in
           shared/seeds/001_*.txt):
           `abf`  RoPE base 10,000 → 500,000 (`default` RoPE with a larger theta) and continued
                  pre-training on plain text in 32k rows (token-mean loss). XVERSE used ~20% of the
                  pre-training data (~280B of 1.4T tokens, "one week"); the default budget here is
                  5000 steps × 64 rows × 32k = 10.5B tokens, what LongAlign used for its 64k
                  extension (§4.1, citing Fu et al. that ~10B tokens suffice). Raise
                  `stages.abf.train.steps` to follow XVERSE to the letter.
           `ntk`  XVERSE's NTK scaling (`xverse_ntk`: trained length P = 32k, target L = 256k,
                  theta' = 500000 · (L/(P/2) − 1)^(d/(d−2)) ≈ 7.8M) and SFT on long chat data in
                  256k rows (ChatML template, LongAlign per-sequence loss weights), from `abf`'s
                  final weights with a fresh optimizer. Exports to HF as rope_theta 500000 +
                  rope_scaling {"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings
                  32768, which transformers evaluates to the same base at 256k.
           Architecture (XVERSE-13B): vocab 100534, hidden 5120, MLP 13824, 40 layers, 40 heads
           (no GQA), head_dim 128, untied embeddings, 8192 positions: 13.7B parameters. The
           vocabulary is NOT padded to a multiple of 128: init from the HF checkpoint requires the
           same embedding shape (a padded vocab would need padded weights and a tokenizer that
           never emits the pad ids), and with tensor=1 the vocab axis is not sharded, so padding
           would only align the lm_head matmul tiles (~4% of the FLOPs).
           SFT data: XVERSE built multi-document QA from pre-training text (questions about one
           article inside a mix of articles, 32k–256k tokens). XVERSE-Chat's own "Human:/
           Assistant:" format is not a longctx template; ChatML is used (any template works if
           inference uses the same one).
Hardware:  128 accelerators, mesh fsdp=16 × seq=8: 16 nodes of 8×H100 80GB or 8×H200, or a
           TPU v5p-256 slice (128 chips, 95 GB); or, with `--config=...:16`, 16 devices (two
           nodes of 8×H100 80GB), mesh fsdp=2 × seq=8, the same global batch through 8
           micro-batches per step. Parameters, gradients and Adam state are sharded over all the
           devices (16 B × 13.7B / 16 = 13.7 GB on 16); at 256k a row is split over 8 devices
           (32k tokens each, zigzag ring over NVLink / ICI); remat keeps the 40 layer inputs
           (40 × 32k × 5120 × 2 B = 13.4 GB), the MLP runs over 4k-token chunks and the lm_head
           + loss over 1k-token chunks, so no [32k, 100534] logits buffer exists.
           `python -m longctx.plan --config=configs/xverse_13b_abf_ntk_256k.py[:16]` (XLA:CPU,
           2026-12-01), per device: 128 devices abf 24.74 GB, ntk 33.30 GB; 16 devices abf
           46.15 GB, ntk 54.61 GB: both fit an H100 80GB at 90%. `abf` uses the same mesh (a
           stage cannot change the mesh) with 4 rows of 32k per device.
Run:       # 1. XVERSE-13B from the Hub has model_type "xverse" (remote code) and .bin weights;
           #    longctx.convert reads Llama-family safetensors: set "model_type": "llama" and
           #    "architectures": ["LlamaForCausalLM"] in config.json and re-save the weights with
           #    safe_serialization=True. XVERSE's modeling code follows Llama's layout; check that
           #    the tensor names are Llama's (model.layers.{i}.self_attn.q_proj.weight, ...).
           python -m longctx.plan --config=configs/xverse_13b_abf_ntk_256k.py --config.init.path=/models/XVERSE-13B
           # 2. multi-host: see launch/ (SLURM, TPU pod, Kubernetes); on each host:
           python -m longctx.launch --config=configs/xverse_13b_abf_ntk_256k.py --workdir=gs://BUCKET/xverse-256k \\
               --config.init.path=/models/XVERSE-13B \\
               --config.data.tokenizer_path=/models/XVERSE-13B/tokenizer.json \\
               --config.stages.abf.data.source.paths='/data/pretrain/*.jsonl' \\
               --config.stages.ntk.data.source.paths='/data/sft_256k/*.jsonl'
           # abf data: JSONL {"text"}, pre-chunked to <= 32k tokens (longer texts are truncated
           # and counted); ntk data: JSONL {"messages": [...]} of 32k-256k tokens.
           python -m longctx.convert to-hf gs://BUCKET/xverse-256k/ntk/final /models/XVERSE-13B-256K-longctx
Expect:    estimates, not measurements, at ~40% MFU on 128×H100 (remat included): abf ≈ 1.6e11
           FLOPs/token × 10.5B tokens ≈ 9 h; ntk ≈ 5.4e11 FLOPs/token (attention dominates at
           256k), ≈ 45 s per step of 16 full 256k rows, ≈ 6 h for 500 steps. abf's first losses
           sit above the 8K model's (every rotation frequency changes) and should come back near
           it within the first few hundred steps. XVERSE reports 99.67% on 4 needles × 17 depths
           × 32 lengths (8k–256k) after `ntk` (`python -m longctx.eval needle --lengths=...`).
"""
import ml_collections

from longctx.data.config import default_config as default_data_config
from longctx.train.config import default_config as default_train_sections, model_section

TRAINED, TARGET = 32_768, 262_144  # ABF trains at P = 32k; NTK + SFT target L = 256k

# Per device count: the mesh's fsdp (seq is 8: a 256k row over 8 devices, 32k tokens each) and,
# per stage, (data.num_shards, data.batch_size, train.micro_batches). Rows per micro-batch
# (num_shards × batch_size) must be a multiple of fsdp; the global batch, num_shards ×
# batch_size × micro_batches, is the same on both: 64 rows of 32k for abf, 16 of 256k for ntk.
ARGS = ("128", "16")  # the device counts this config is laid out for (tests/test_configs.py)
LAYOUTS = {
    128: dict(fsdp=16, abf=(16, 4, 1), ntk=(16, 1, 1)),
    16: dict(fsdp=2, abf=(2, 4, 8), ntk=(2, 1, 8)),
}
ABF_DATA = dict(source=dict(paths="/data/pretrain/*.jsonl"), template="plain", max_len=TRAINED,
                over_length="truncate_right", objective="token")


def xverse_stages(layout: dict, abf_data: dict) -> dict:
  """XVERSE's two stages on `layout`: ABF pre-training at 8K, then fixed NTK + SFT at 256K."""
  ntk_shards, ntk_rows, ntk_micro = layout["ntk"]
  abf = dict(model=dict(rope=dict(rope_type="default", theta=500_000.0),
                        max_position_embeddings=TRAINED),
             data=abf_data,
             train=dict(steps=5000, micro_batches=layout["abf"][2], learning_rate=2e-5,
                        schedule="cosine", warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1))
  ntk = dict(model=dict(rope=dict(rope_type="xverse_ntk", theta=500_000.0, trained_length=TRAINED,
                                  target_length=TARGET, factor=2.0),
                        max_position_embeddings=TRAINED),
             data=dict(source=dict(paths="/data/sft_256k/*.jsonl"), template="chatml",
                       max_len=TARGET, over_length="truncate_middle", objective="sequence",
                       num_shards=ntk_shards, batch_size=ntk_rows),
             train=dict(steps=500, micro_batches=ntk_micro, learning_rate=2e-5, schedule="cosine",
                        warmup_steps=20, min_lr_ratio=0.0, weight_decay=0.0))
  return {"abf": abf, "ntk": ntk}


def get_config(arg=None):
  """arg: the number of devices, 128 (default) or 16 (same global batch through
  micro-batches)."""
  text = str(arg) if arg else "128"
  devices = int(text) if text.isdigit() else text
  if devices not in LAYOUTS:
    raise ValueError(f"configs/xverse_13b_abf_ntk_256k.py:ARG: expected one of {sorted(LAYOUTS)} "
                     f"devices, found {arg!r}")
  layout = LAYOUTS[devices]
  config = default_train_sections()
  config.init.kind = "hf"
  config.init.path = ""  # required: --config.init.path=/models/XVERSE-13B (the 8K base)
  config.model = model_section(
      vocab_size=100534, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
      num_kv_heads=40, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=8192,
      rope=dict(rope_type="default", theta=10000.0), tie_word_embeddings=False,
      bos_token_id=2, eos_token_id=3, dtype="bfloat16", remat="full", mlp_chunk=4096)
  config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor = 1, layout["fsdp"], 8, 1
  config.attention.impl, config.attention.strategy, config.attention.layout = (
      "context_parallel", "ring", "zigzag")

  config.data = default_data_config()  # the top level is `abf`'s data (`data inspect` reads it)
  config.data.source.kind = "jsonl"
  config.data.tokenizer = "hf"
  config.data.tokenizer_path = "/models/XVERSE-13B/tokenizer.json"
  config.data.batching = "packed"
  abf_shards, abf_rows, _ = layout["abf"]
  abf_data = dict(ABF_DATA, num_shards=abf_shards, batch_size=abf_rows)
  config.data.update(abf_data)   # recursive: keeps the other data.source keys
  config.data.num_epochs = 0     # repeat; train.steps ends each stage
  config.data.num_workers = 16

  config.train.b1, config.train.b2 = 0.9, 0.95
  config.train.loss_chunk = 1024  # tokens per row and device in one chunk of the loss
  config.train.clip_norm = 1.0
  config.train.log_every = 10
  config.checkpoint.every_steps = 250

  config.stages = ml_collections.ConfigDict(xverse_stages(layout, abf_data))
  config.stage_order = "abf,ntk"
  config.lock()
  return config
