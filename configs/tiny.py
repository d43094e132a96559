"""The embedded default: a tiny Llama on synthetic long-context data, on this machine's CPU.

Run:       python -m longctx.launch            (same as --config=configs/tiny.py)
Hardware:  any CPU; 8 emulated devices are set up automatically on CPU.
Expect:    a forward pass over the first packed batch of the data pipeline in well under a
           minute; the loss printed is near ln(vocab_size) for a freshly initialised model.
           (The training issue replaces this job with a full training run.)
"""
import ml_collections

from longctx.data.config import default_config as default_data_config


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=260, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, max_position_embeddings=4096,
      rope=dict(rope_type="default", theta=500000.0), dtype="float32", remat="none"))
  # LongAlign-like synthetic SFT conversations, byte tokenizer, packed into 4k rows.
  config.data = default_data_config()
  config.data.max_len = 4096
  config.data.batch_size = 2
  config.data.source.num_examples = 16
  config.data.source.min_tokens, config.data.source.max_tokens = 256, 4096
  config.lock()
  return config
