"""Llama-2-7B to 1M tokens: continued pre-training on 1,048,576-token rows over 8 × H100 80GB.

What:      a 4k Llama-2-7B extended to a 1M-token context by ABF (a larger RoPE base) and
           continued pre-training on packed long text (plain LM, token-mean loss). RoPE base
           50,000,000, the value the Large World Model used for its 1M-token stage. One row of
           1,048,576 tokens is split over all 8 GPUs (zigzag ring over NVLink, 131,072 tokens per
           GPU); 4 rows per step through micro-batches (4M tokens per step).
Memory:    float32 parameters, gradients and Adam state sharded over all 8 devices (16 B ×
           6.74B / 8 = 13.5 GB); bf16 compute with remat keeping only each layer's input, and
           those 32 inputs (32 × 131,072 × 4096 × 2 B = 34.4 GB) offloaded to pinned host memory
           (`model.remat_offload=layer_input`); the MLP and the fused lm_head + cross-entropy run
           over chunks of 8,192 tokens per GPU, so no [131k, 11008] or [131k, 32000] buffer exists.
           `python -m longctx.plan --config=configs/llama2_7b_1m.py` (XLA:CPU, 8 emulated
           devices, 2026-12-01): parameters 3.37 GB + Adam state 6.74 GB, temporaries 85.72 GB of
           which the 34.36 GB stack of layer inputs goes to host memory: 61.48 GB on each GPU,
           fits an H100 80GB at 90%. `--max_len=H100` finds 1,310,720 tokens (70.94 GB).
Hardware:  one node of 8 × H100 80GB (or H200), mesh seq=8; host RAM ≥ 8 × 34.4 GB for the
           offloaded layer inputs. Without offload (`--config.model.remat_offload=''`) the plan
           is 95.8 GB per GPU: an H200 holds it, an H100 does not.
Run:       python -m longctx.convert from-hf /models/Llama-2-7b-hf /ckpt/llama2-7b   # optional
           python -m longctx.plan --config=configs/llama2_7b_1m.py
           python -m longctx.plan --config=configs/llama2_7b_1m.py --max_len=H100
           python -m longctx.launch --config=configs/llama2_7b_1m.py --workdir=/ckpt/llama2-7b-1m \\
               --config.init.path=/models/Llama-2-7b-hf \\
               --config.data.tokenizer_path=/models/Llama-2-7b-hf/tokenizer.model \\
               --config.data.source.paths='/data/long_text/*.jsonl'
           # data: JSONL {"text"} of long documents (books, code repositories), packed into 1M
           # rows; documents keep their own positions and never attend to each other.
Expect:    an estimate, not a measurement: attention dominates at 1M (6·L·H·D·layers ≈ 8.2e11
           FLOPs per token against 4.0e10 for the weights), ≈ 3.6e18 FLOPs per step of 4 rows;
           at 40% MFU on 8 × H100 that is ≈ 19 min per step, so 200 steps (0.84B tokens) take
           ≈ 2.6 days. The loss starts above the 4k model's (every RoPE frequency moves) and
           should return near it within the first tens of steps; check passkey / needle at
           128k–1M with `python -m longctx.eval`.
"""
from longctx.data.config import jsonl_section
from longctx.train.config import LLAMA2_7B, default_config as default_train_sections, model_section

LENGTH = 1 << 20  # 1,048,576 tokens per row


def get_config(arg=None):
  del arg
  config = default_train_sections()
  config.init.kind = "hf"
  config.init.path = ""  # required: --config.init.path=/models/Llama-2-7b-hf
  config.model = model_section(
      **LLAMA2_7B, max_position_embeddings=LENGTH,
      rope=dict(rope_type="default", theta=50_000_000.0),
      dtype="bfloat16", remat="full", remat_offload="layer_input", mlp_chunk=8192)
  config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor = 1, 1, 8, 1
  config.attention.impl, config.attention.strategy, config.attention.layout = (
      "context_parallel", "ring", "zigzag")

  config.data = jsonl_section("/data/long_text/*.jsonl", "/models/Llama-2-7b-hf/tokenizer.model",
                              max_len=LENGTH)

  config.train.steps = 200
  config.train.micro_batches = 4             # 4 rows of 1M per step
  config.train.loss_chunk = 8192
  config.train.learning_rate = 2e-5
  config.train.schedule = "constant"
  config.train.warmup_steps = 10
  config.train.weight_decay = 0.0
  config.train.log_every = 1
  config.checkpoint.every_steps = 10
  config.lock()
  return config
