"""Qwen3-8B to 1M tokens: YaRN x32 and continued training on 1,048,576-token rows over 8 x H100 80GB.

What:      TRL's 1M-token recipe in longctx: Qwen3-8B (32k native context, q/k RMSNorm, 32/8
           heads) with YaRN factor 32 over its 32,768 trained positions (1,048,576 tokens),
           trained on packed long text (plain LM, token-mean loss). One row is split over all 8
           GPUs by the zigzag ring (131,072 tokens per GPU); 4 rows per step through
           micro-batches. The architecture is written out so that `plan` needs no checkpoint;
           at launch it is checked against init.path's config.json.
Memory:    float32 parameters, gradients and Adam state sharded over all 8 devices (16 B x 8.19B
           / 8 = 16.4 GB); bf16 compute, remat keeping only each layer's input, and those 36
           inputs (36 x 131,072 x 4096 x 2 B = 38.7 GB) offloaded to pinned host memory; the
           MLP and the fused lm_head + cross-entropy (151,936-token vocabulary) over chunks of
           8,192 tokens per GPU. `python -m longctx.plan --config=configs/qwen3_8b_1m.py --json`
           (XLA:CPU, 8 emulated devices, 2026-12-07): parameters 4.10 GB + Adam state 8.19 GB,
           temporaries 94.82 GB of which the 38.65 GB stack of layer inputs goes to host memory:
           total_bytes 68,459,992,676 = 68.46 GB on each GPU, fits an H100 80GB at 90% (72 GB).
           TRL reports 56 GB per GPU for the same model and length (ring CP = 8, measured on
           GPUs); this is XLA:CPU's estimate of the same program, not a measurement, and like the
           Llama-2 1M plan it counts buffers a GPU compiler may fuse away.
Hardware:  one node of 8 x H100 80GB (or H200), mesh seq=8; host RAM >= 8 x 38.7 GB for the
           offloaded layer inputs.
Run:       python -m longctx.plan --config=configs/qwen3_8b_1m.py
           python -m longctx.launch --config=configs/qwen3_8b_1m.py --workdir=/ckpt/qwen3-8b-1m \\
               --config.init.path=/models/Qwen3-8B \\
               --config.data.tokenizer_path=/models/Qwen3-8B/tokenizer.json \\
               --config.data.source.paths='/data/long_text/*.jsonl'
           # data: JSONL {"text"} of long documents, packed into 1M rows; documents keep their
           # own positions and never attend to each other.
Expect:    an estimate: attention dominates at 1M (6·L·H·D·layers ≈ 9.3e11 FLOPs per token against
           4.9e10 for the weights), ≈ 4.1e18 FLOPs per step of 4 rows; at 40% MFU on 8 x H100
           that is ≈ 21 min per step. YaRN x32 rescales every RoPE frequency below the
           32k-wavelength band, so the loss starts above the 32k model's and should come back
           within the first tens of steps; check with `python -m longctx.eval passkey` /
           `needle` at 128k-1M.
"""
from longctx.data.config import jsonl_section
from longctx.train.config import default_config as default_train_sections, model_section

LENGTH = 1 << 20  # 1,048,576 tokens per row
TRAINED = 32_768  # Qwen3-8B's native context, YaRN's original_max_position_embeddings

# Qwen3-8B's config.json (model_type qwen3): shapes, q/k norm, special tokens.
QWEN3_8B = dict(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
                qk_norm=True, tie_word_embeddings=False, bos_token_id=151643,
                eos_token_id=151645)


def get_config(arg=None):
  del arg
  config = default_train_sections()
  config.init.kind = "hf"
  config.init.path = ""  # required: --config.init.path=/models/Qwen3-8B
  config.model = model_section(
      **QWEN3_8B, max_position_embeddings=LENGTH,
      rope=dict(rope_type="yarn", theta=1_000_000.0, factor=LENGTH / TRAINED,
                original_max_position_embeddings=TRAINED),
      dtype="bfloat16", remat="full", remat_offload="layer_input", mlp_chunk=8192)
  config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor = 1, 1, 8, 1
  config.attention.impl, config.attention.strategy, config.attention.layout = (
      "context_parallel", "ring", "zigzag")

  config.data = jsonl_section("/data/long_text/*.jsonl", "/models/Qwen3-8B/tokenizer.json",
                              max_len=LENGTH, tokenizer="hf")

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
