"""The embedded default: a tiny Llama trained on synthetic long-context data on this machine's CPU.

What:      XVERSE's two-stage schedule in miniature. Stage `short`: 1k-token rows, RoPE base
           10,000. Stage `long`: ABF (base 500,000) at 4k-token rows, from `short`'s final weights
           with a fresh optimizer. Data: LongAlign-like synthetic SFT conversations, byte
           tokenizer, packed rows, LongAlign per-sequence loss weighting.
Hardware:  any CPU; 8 emulated devices are set up automatically, meshed data=2 x seq=4 with
           zigzag ring attention.
Run:       python -m longctx.launch            (same as --config=configs/tiny.py)
           python -m longctx.launch --workdir=/tmp/tiny --config.stages.long.train.steps=40
Expect:    a few minutes; the loss falls from ln(260) = 5.56 to about 2.5 in `short` and keeps
           falling in `long`; a summary per stage (loss first -> last, tokens/s) at the end.
"""
import ml_collections

from longctx.data.config import default_config as default_data_config
from longctx.train.config import default_config as default_train_sections, model_section


def get_config(arg=None):
  del arg
  config = default_train_sections()
  config.model = model_section(
      vocab_size=260, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, max_position_embeddings=4096,
      rope=dict(rope_type="default", theta=10000.0), dtype="float32", remat="none")
  config.mesh.data, config.mesh.seq = 2, 4
  config.attention.impl, config.attention.strategy, config.attention.layout = (
      "context_parallel", "ring", "zigzag")
  config.attention.block_q = config.attention.block_k = 256

  config.data = default_data_config()
  config.data.num_shards = 2           # 2 logical shards x 2 rows = 4 rows per step
  config.data.batch_size = 2
  config.data.num_epochs = 0           # repeat forever; the step budget ends each stage
  config.data.source.num_examples = 64
  config.data.source.min_tokens, config.data.source.max_tokens = 128, 4096

  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 5
  config.train.log_every = 5
  config.checkpoint.every_steps = 20

  config.stages = ml_collections.ConfigDict()
  config.stages.short = ml_collections.ConfigDict(dict(
      train=dict(steps=40), data=dict(max_len=1024)))
  config.stages.long = ml_collections.ConfigDict(dict(
      model=dict(rope=dict(rope_type="default", theta=500000.0)),
      train=dict(steps=20), data=dict(max_len=4096, batch_size=1)))
  config.stage_order = "short,long"
  config.lock()
  return config
