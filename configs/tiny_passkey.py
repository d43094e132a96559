"""A small-scale reproduction of long-context extension: passkey retrieval, ABF then NTK.

What:      a tiny Llama trained from scratch on synthetic passkey documents (LongLoRA's prompt,
           longctx.data.synthetic.passkey; loss on the answer " K."), byte tokenizer, packed
           rows. Stage `base`: 512-token rows, RoPE base 10,000, most of the steps. Stage `abf`:
           1024-token rows, base 500,000 (ABF), from `base`'s final weights with a fresh
           optimizer. Stage `ntk`: 2048-token rows, XVERSE's fixed NTK base for a target length of
           2048 over the trained length 1024 (rope_type "xverse_ntk"), a few steps. Passkey
           accuracy at 512 / 1024 / 2048 tokens (1x, 2x, 4x the first stage's length) at the end
           of every stage. 512 is the shortest useful length: the passkey prompt alone is ~245
           bytes, so at 256 tokens there would be no haystack at all.
Hardware:  any CPU; 8 emulated devices, meshed data=8 with dense attention (fastest for short
           rows on a CPU).
Run:       python bench/passkey_repro.py --workdir=/tmp/passkey
           python -m longctx.launch --config=configs/tiny_passkey.py --workdir=/tmp/passkey
Expect:    ~1.2 s/step for `base` on a shared 2-core CPU (~9 min for 450 steps) plus ~2.5 min
           per passkey evaluation. Measured (bench/PASSKEY_REPRO.md): within this budget the
           model does NOT learn retrieval (loss plateaus at ~1.32, the cost of guessing K;
           passkey 0.00 at 512), so the extension stages show nothing yet.
"""
import ml_collections

from longctx.data.config import default_config as default_data_config
from longctx.train.config import default_config as default_train_sections

L0 = 512


def get_config(arg=None):
  del arg
  config = default_train_sections()
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=260, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
      num_kv_heads=4, head_dim=32, max_position_embeddings=L0,
      rope=dict(rope_type="default", theta=10000.0), dtype="float32", remat="none"))
  config.mesh.data = 8
  config.attention.impl = "dense"
  config.attention.block_q = config.attention.block_k = 256

  config.data = default_data_config()
  config.data.source.synthetic_kind = "passkey"
  config.data.source.num_examples = 200_000   # fresh documents, no repeats within the budget
  config.data.source.min_tokens, config.data.source.max_tokens = L0 // 2, L0 - 16
  config.data.template = "plain"             # prompt "\n", then the answer " K." (the target)
  config.data.objective = "token"
  config.data.num_shards = 8
  config.data.batch_size = 1                 # 8 rows of max_len per step
  config.data.num_epochs = 0
  config.data.max_len = L0

  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 30
  config.train.weight_decay = 0.0
  config.train.log_every = 25
  config.checkpoint.every_steps = 100000
  config.checkpoint.async_save = False

  config.eval.passkey_lengths = f"{L0},{2 * L0},{4 * L0}"
  config.eval.passkey_trials = 10

  config.stages = ml_collections.ConfigDict()
  config.stages.base = ml_collections.ConfigDict(dict(
      train=dict(steps=450), eval=dict(every_steps=450)))
  config.stages.abf = ml_collections.ConfigDict(dict(
      model=dict(max_position_embeddings=2 * L0,
                 rope=dict(rope_type="default", theta=500000.0)),
      train=dict(steps=60, learning_rate=1e-3, warmup_steps=10),
      data=dict(max_len=2 * L0, batch_size=1,
                source=dict(min_tokens=L0 // 2, max_tokens=2 * L0 - 16)),
      eval=dict(every_steps=60)))
  config.stages.ntk = ml_collections.ConfigDict(dict(
      model=dict(max_position_embeddings=4 * L0,
                 rope=dict(rope_type="xverse_ntk", theta=500000.0, trained_length=2 * L0,
                           target_length=4 * L0, factor=2.0)),
      train=dict(steps=20, learning_rate=5e-4, warmup_steps=5),
      data=dict(max_len=4 * L0, batch_size=1,
                source=dict(min_tokens=L0, max_tokens=4 * L0 - 16)),
      eval=dict(every_steps=20)))
  config.stage_order = "base,abf,ntk"
  config.lock()
  return config
