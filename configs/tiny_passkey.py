"""A small-scale reproduction of long-context extension: passkey retrieval, ABF then NTK.

What:      a tiny Llama trained from scratch on LongLoRA's passkey documents
           (longctx.data.synthetic.passkey, as plain text: every token is a target, so the in-line
           repeat "K. Remember it. K is the pass key" and the final answer both teach copying).
           Tokenizer: a 388-token BPE trained on passkey text with every digit its own token
           (configs/assets/passkey_bpe.json, rebuilt by `bench/passkey_repro.py
           --rebuild_tokenizer`); the prompt's fixed text then costs ~70 tokens instead of ~245
           bytes, so 256-token rows already hold a haystack.
           Stage `base`: 256-token rows, RoPE base 10,000, most of the steps. Stage `abf`: 512-token
           rows, base 500,000 (ABF), from `base`'s final weights with a fresh optimizer. Stage
           `ntk`: 1024-token rows, XVERSE's fixed NTK base for a target length of 1024 over the
           trained length 512 (rope_type "xverse_ntk"). Passkey accuracy at 256 / 512 / 1024 tokens
           (1x, 2x, 4x the first stage's length) at the end of every stage.
Hardware:  any CPU; 8 emulated devices, meshed data=8 with dense attention (fastest for short
           rows on a CPU).
Run:       python bench/passkey_repro.py --workdir=/tmp/passkey      # + table and heatmaps
           python -m longctx.launch --config=configs/tiny_passkey.py --workdir=/tmp/passkey
Expect:    about 18 minutes on a 2-core CPU. Measured (bench/PASSKEY_REPRO.md, history): passkey
           0.85 at 256 after `base`, but ABF at this scale (head_dim 16: every RoPE frequency but
           one moves) breaks the retrieval it learned: 0.25 after `abf`, ~0 after `ntk`. The
           issue's goal (>= 90% at the trained length, a gain beyond it) is not met yet.
"""
import os

import ml_collections

from longctx.data.config import default_config as default_data_config
from longctx.train.config import default_config as default_train_sections, model_section

L0 = 256
TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "passkey_bpe.json")
# Passkey document lengths are in characters (synthetic.passkey); with this tokenizer a document
# of 900 / 1800 / 3600 characters has at most 241 / 481 / 961 tokens: one fits a row of
# L0 / 2·L0 / 4·L0 tokens. 250 characters is the prompt with no filler at all.
MIN_CHARS = 250
MAX_CHARS = {1: 900, 2: 1800, 4: 3600}


def passkey_stages() -> dict:
  """The base at L0, then ABF at 2·L0 and fixed NTK at 4·L0 (the tiny reproduction's stages)."""
  base = dict(
      train=dict(steps=800), eval=dict(every_steps=800))
  abf = dict(
      model=dict(max_position_embeddings=2 * L0,
                 rope=dict(rope_type="default", theta=500000.0)),
      train=dict(steps=150, learning_rate=3e-3, warmup_steps=10),
      data=dict(max_len=2 * L0, batch_size=1, source=dict(max_tokens=MAX_CHARS[2])),
      eval=dict(every_steps=150))
  ntk = dict(
      model=dict(max_position_embeddings=4 * L0,
                 rope=dict(rope_type="xverse_ntk", theta=500000.0, trained_length=2 * L0,
                           target_length=4 * L0, factor=2.0)),
      train=dict(steps=20, learning_rate=1e-3, warmup_steps=5),
      data=dict(max_len=4 * L0, batch_size=1, source=dict(max_tokens=MAX_CHARS[4])),
      eval=dict(every_steps=20))
  return {"base": base, "abf": abf, "ntk": ntk}


def get_config(arg=None):
  del arg
  config = default_train_sections()
  config.model = model_section(
      vocab_size=400, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=8,
      num_kv_heads=8, head_dim=16, max_position_embeddings=L0,
      rope=dict(rope_type="default", theta=10000.0), dtype="float32", remat="none")
  config.mesh.data = 8
  config.attention.impl = "dense"

  config.data = default_data_config()
  config.data.tokenizer = "hf"
  config.data.tokenizer_path = TOKENIZER
  config.data.source.synthetic_kind = "passkey_text"
  config.data.source.num_examples = 1_000_000   # fresh documents, no repeats within the budget
  config.data.source.min_tokens, config.data.source.max_tokens = MIN_CHARS, MAX_CHARS[1]
  config.data.template = "plain"
  config.data.over_length = "drop"             # counted in the data stats, never truncated
  config.data.objective = "token"
  config.data.num_shards = 8
  config.data.batch_size = 2                   # 16 rows of max_len per step
  config.data.num_epochs = 0
  config.data.max_len = L0

  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 50
  config.train.weight_decay = 0.0
  config.train.log_every = 25
  config.checkpoint.every_steps = 100000
  config.checkpoint.async_save = False

  config.eval.passkey_lengths = f"{L0},{2 * L0},{4 * L0}"
  config.eval.passkey_trials = 20

  config.stages = ml_collections.ConfigDict(passkey_stages())
  config.stage_order = "base,abf,ntk"
  config.lock()
  return config
