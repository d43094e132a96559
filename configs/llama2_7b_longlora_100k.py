"""LongLoRA: Llama-2-7B extended to 100k tokens with LoRA+ and S²-Attn (METHODS.md §2).

What:      context extension of Llama-2-7B (4k) by position interpolation and LongLoRA's LoRA+
           (arXiv 2309.12307; dvlab-research/LongLoRA fine-tune.py and README):
           - RoPE `linear` with factor ceil(L/4096): their script computes
             `math.ceil(model_max_length / max_position_embeddings)` = ceil(100000/4096) = 25.
             Rows here are 102400 = 25 × 4096 tokens, exactly the range factor 25 maps onto
             Llama-2's 4096 trained positions. 100000 gives the same factor but is not a
             multiple of pad_multiple (128), and its zigzag chunks (25000) do not tile into
             512-token attention blocks; 102400 splits over seq=2 into 4 zigzag chunks of 25600
             = the S²-Attn group, each 50 blocks of 512.
           - LoRA rank 8, alpha 16, no dropout, on q/k/v/o; embeddings and every RMSNorm fully
             trained; lm_head and the rest frozen.
           - S²-Attn in training with group size 1/4 of the row (25600 tokens, half the heads
             shifted by 12800, no wrap-around); evaluation uses full attention.
           - AdamW lr 2e-5, 20 warm-up steps then constant, β=(0.9, 0.95), weight decay 0; global
             batch 64 rows (their 8 GPUs × 1 × 8 accumulation), 1000 steps.
           Data: plain text, token-mean loss. LongLoRA trained on RedPajama with documents joined
           by EOS and cut into 100k rows, so attention crossed document boundaries; longctx packs
           documents and keeps them apart (contract 1), so a row of short documents teaches
           nothing about long range. Use long documents: PG19 train books (~90k tokens average)
           or RedPajama's book / arXiv subsets filtered to long texts, pre-chunked to <= 102400
           tokens (longer documents are truncated; the count is reported).
           The released Llama-2-7b-longlora-100k-ft was a full fine-tune; the paper's LoRA+ 100k
           7B is this recipe.
Hardware:  one node of 8×H100 80GB (the paper: 8×A100 80GB). Mesh fsdp=4 × seq=2: the frozen
           float32 weights are 27 GB / 4 = 6.7 GB per GPU and the trained ~140M parameters
           (embedding, norms, LoRA) need < 1 GB of Adam state; a 102400-token row over 2 GPUs is
           51200 tokens per GPU: 32 remat layer inputs (32 × 51200 × 4096 × 2 B = 13.4 GB) and
           float32 logits (51200 × 32000 × 4 B = 6.6 GB, ×2–3 with their gradient) → ~45 GB.
           4 rows per micro-batch × 16 micro-batches = 64 rows per step. fsdp=8 × seq=1 would put
           a whole row on one GPU (~75 GB by the same count): too tight.
Run:       python -m longctx.convert from-hf /models/Llama-2-7b-hf /ckpt/llama2-7b   # optional check
           python -m longctx.plan --config=configs/llama2_7b_longlora_100k.py --config.init.path=/models/Llama-2-7b-hf
           python -m longctx.launch --config=configs/llama2_7b_longlora_100k.py --workdir=/ckpt/longlora-100k \\
               --config.init.path=/models/Llama-2-7b-hf \\
               --config.data.tokenizer_path=/models/Llama-2-7b-hf/tokenizer.model \\
               --config.data.source.paths='/data/pg19/train/*.jsonl'
           # data: JSONL {"text": ...}. Export the merged model or the adapter:
           python -m longctx.convert to-hf /ckpt/longlora-100k/main/final /models/llama2-7b-longlora-100k
           python -m longctx.convert to-peft /ckpt/longlora-100k/main/final /models/longlora-100k-adapter \
               --base_model /models/Llama-2-7b-hf
Expect:    1000 × 64 × 102400 = 6.6B tokens at ~7e10 FLOPs per token (frozen weights need no
           weight gradients; S²-Attn cuts attention to 1/4; remat included): roughly 1.5–2 days
           on 8×H100 at 30–40% MFU (an estimate; LongLoRA: 52.4 h for 7B at 64k on 8×A100). The
           loss starts high (the interpolated positions are new to the model) and falls within
           the first ~100 steps. LongLoRA reports LoRA+ close to full fine-tuning (PG19 at 8k:
           8.12 vs 8.08) and perplexity that keeps falling with the evaluation length up to the
           trained length: check with `python -m longctx.eval perplexity --lengths=4096,...,102400`
           and `python -m longctx.eval passkey`.
"""

from longctx.data.config import jsonl_section
from longctx.train.config import LLAMA2_7B, default_config as default_train_sections, model_section

ORIGINAL = 4096            # Llama-2's trained context
FACTOR = 25                # ceil(100000 / 4096), LongLoRA's rule
MAX_LEN = FACTOR * ORIGINAL  # 102400


def get_config(arg=None):
  del arg
  config = default_train_sections()
  config.init.kind = "hf"
  config.init.path = ""  # required: --config.init.path=/models/Llama-2-7b-hf
  config.model = model_section(
      **LLAMA2_7B, max_position_embeddings=ORIGINAL,
      rope=dict(rope_type="linear", theta=10000.0, factor=float(FACTOR)),
      dtype="bfloat16", remat="full", mlp_chunk=10240)
  config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor = 1, 4, 2, 1
  config.train.loss_chunk = 10240             # 51,200 tokens per device in 5 chunks
  config.attention.impl, config.attention.strategy, config.attention.layout = (
      "context_parallel", "ring", "zigzag")

  config.lora.enabled = True
  config.lora.rank, config.lora.alpha = 8, 16.0
  config.lora.targets = "q_proj,k_proj,v_proj,o_proj"
  config.lora.trainable = "embed_tokens,norm"
  config.lora.s2_group_fraction = 0.25

  config.data = jsonl_section("/data/pg19/train/*.jsonl", "/models/Llama-2-7b-hf/tokenizer.model",
                              max_len=MAX_LEN, num_shards=4)  # 4 rows per micro-batch (data x fsdp)

  config.train.steps = 1000
  config.train.micro_batches = 16  # 4 x 16 = 64 rows per step
  config.train.learning_rate = 2e-5
  config.train.schedule = "constant"
  config.train.warmup_steps = 20
  config.train.b1, config.train.b2 = 0.9, 0.95
  config.train.weight_decay = 0.0
  config.train.clip_norm = 1.0   # HF Trainer's max_grad_norm
  config.train.log_every = 1
  config.checkpoint.every_steps = 100
  config.lock()
  return config
