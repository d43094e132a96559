"""LongAlign SFT of Llama-2-7B at 64k tokens (METHODS.md §1; arXiv 2401.18058, THUDM/LongAlign).

What:      full-parameter SFT of a 64k-context Llama-2-7B on long instruction data (LongAlign-10k
           mixed with ShareGPT), Llama-2 `[INST]` template, packed 64k rows with LongAlign's
           per-sequence loss weighting (`data.objective="sequence"`). Numbers from the paper (§4.1)
           and its scripts/llama_pack.sh: 8 packs of 64k per step (~96 sequences), lr 2e-5, cosine,
           3% warm-up, AdamW β=(0.9, 0.95), weight decay 0, bf16, gradient checkpointing, 2 epochs
           (~1500–2000 steps), inputs over 64k truncated from the right.
           RoPE: LongAlign first extends Llama-2 to 64k by raising the RoPE base 200× (10,000 →
           2,000,000) and continuing pre-training on 10B tokens of ≤64k text (paper §4.1, the
           repo's assets/paper.txt); the result is released as THUDM/LongAlign-7B-64k-base, the
           model their SFT script starts from. So `model.rope.theta = 2e6` and `init.path` should
           be that base model (HF Llama format). Starting from plain Llama-2-7b-hf with theta 2e6
           skips the context-extension pre-training and is expected to do clearly worse.
           max_position_embeddings is 65536 (not Llama-2's 4096): with `default` RoPE it does not
           change any number, but the exported config.json then advertises the 64k window to
           servers such as vLLM that read it.
Hardware:  one node of 8×H100 80GB (the paper: 8×A800 80GB with ZeRO-3 + CPU offload). Mesh
           fsdp=4 × seq=2 (zigzag ring inside a pair of GPUs): float32 params + Adam m, v + grads
           = 16 B × 6.74B = 108 GB, sharded over all 8 GPUs (fsdp × seq) = 13.5 GB per GPU; a 64k
           row over 2 GPUs is 32k tokens per GPU: remat keeps 32 layer inputs (32 × 32k × 4096 ×
           2 B = 8.6 GB); the MLP and the lm_head + loss run over 8k-token chunks, so neither the
           [32k, 11008] MLP buffers nor [32k, 32000] float32 logits exist. 4 rows per
           micro-batch × 2 micro-batches = 8 packs per step.
           `python -m longctx.plan --config=configs/llama2_7b_longalign_64k.py` (XLA:CPU,
           2026-12-01): 41.76 GB per GPU (49.92 GB for the bfloat16 program as XLA:CPU compiles
           it; 72.26 GB before the chunked loss and the fsdp × seq sharding).
Run:       # 1. the base model (THUDM/LongAlign-7B-64k-base or your own 64k-extended Llama-2-7B), in
           #    HF format with safetensors (re-save .bin checkpoints with safe_serialization=True)
           python -m longctx.plan --config=configs/llama2_7b_longalign_64k.py \\
               --config.init.path=/models/LongAlign-7B-64k-base
           python -m longctx.launch --config=configs/llama2_7b_longalign_64k.py --workdir=/ckpt/longalign-7b \\
               --config.init.path=/models/LongAlign-7B-64k-base \\
               --config.data.tokenizer_path=/models/LongAlign-7B-64k-base/tokenizer.model \\
               --config.data.source.paths='/data/longalign/*.jsonl'
           # data: JSONL with {"messages": [{"role": "user"|"assistant", "content": ...}, ...]}
           # (LongAlign-10k and ShareGPT converted to that form). Steps: 2 epochs =
           # 2 × rows / 8; `python -m longctx.data inspect --config=...` prints the rows per epoch.
           python -m longctx.convert to-hf /ckpt/longalign-7b/main/final /models/longalign-7b-64k --dtype bfloat16
Expect:    1800 steps × 8 × 64k = 0.94B tokens; at ~1e11 FLOPs per token (remat included) and
           30–40% MFU that is roughly 8–12 h on 8×H100 (an estimate, not a measurement; the paper:
           23.4 h on 8×A800 with ZeRO-3 + CPU offload). The loss falls fastest in the first few
           hundred steps and then flattens (no published curve to compare against). The paper
           reports LongBench-Chat 6.10 for Llama-2-7B-64k with packing + loss weighting (Table 3;
           `python -m longctx.eval longbench-chat`), and the needle test should pass up to 64k.
"""

from longctx.data.config import jsonl_section
from longctx.train.config import LLAMA2_7B, default_config as default_train_sections, model_section

STEPS = 1800  # 2 epochs of LongAlign-10k + ShareGPT at 8 packs/step: ~1500-2000 in the paper


def get_config(arg=None):
  del arg
  config = default_train_sections()
  config.init.kind = "hf"
  config.init.path = ""  # required: --config.init.path=/models/LongAlign-7B-64k-base
  config.model = model_section(
      **LLAMA2_7B, max_position_embeddings=65536,
      rope=dict(rope_type="default", theta=2_000_000.0),  # LongAlign: base 10k x 200
      dtype="bfloat16", remat="full", mlp_chunk=8192)
  config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor = 1, 4, 2, 1
  config.attention.impl, config.attention.strategy, config.attention.layout = (
      "context_parallel", "ring", "zigzag")

  config.data = jsonl_section(
      "/data/longalign/*.jsonl", "/models/LongAlign-7B-64k-base/tokenizer.model", max_len=65536,
      template="llama2",
      objective="sequence",  # LongAlign loss weighting, over the whole step
      num_shards=4)          # 4 rows per micro-batch (= mesh data x fsdp)
  # over_length: truncate_right (jsonl_section's default), as the paper

  config.train.steps = STEPS
  config.train.loss_chunk = 8192              # the fused lm_head + loss over 8k-token chunks
  config.train.micro_batches = 2              # 4 x 2 = 8 packs of 64k per step
  config.train.learning_rate = 2e-5
  config.train.schedule = "cosine"
  config.train.warmup_steps = 54              # warmup_ratio 0.03
  config.train.min_lr_ratio = 0.0             # HF cosine decays to 0
  config.train.b1, config.train.b2 = 0.9, 0.95
  config.train.weight_decay = 0.0
  config.train.clip_norm = 1.0                # HF Trainer's max_grad_norm
  config.train.log_every = 1
  config.checkpoint.every_steps = 200         # their save_steps
  config.lock()
  return config
