"""A fast probe for the passkey reproduction's side experiments (bench/PASSKEY_REPRO.md).

A bare training loop on one device, outside the trainer: the same model family, tokenizer
(configs/assets/passkey_bpe.json) and passkey-as-text documents as configs/tiny_passkey.py,
packed into rows, AdamW with warm-up + cosine. Every --eval_every steps it prints the
teacher-forced exact match of the answer (" K." all right given the prompt) on 48 documents of
80–100% of each --eval_lengths, which tracks greedy passkey accuracy closely and costs one
forward pass. --save / --init carry weights between runs (or --init=WORKDIR/STAGE/final).

    python bench/passkey_probe.py --heads=8 --steps=700                       # base sweep point
    python bench/passkey_probe.py --init=/tmp/passkey/base/final --theta=500000 --length=512 \
        --rows=8 --steps=150 --warmup=10 --heads=8 --eval_lengths=256,512    # ABF from a base
"""
import argparse
import os
import pickle
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from longctx.data import synthetic  # noqa: E402
from longctx.data.config import TokenizerKind  # noqa: E402
from longctx.data.tokenizers import make_tokenizer  # noqa: E402
from longctx.model import DefaultRope, Llama, ModelConfig, init_params  # noqa: E402

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "assets",
                         "passkey_bpe.json")
CHARS_PER_TOKEN = 3.5  # passkey text under this tokenizer
MIN_CHARS = 250


def documents(rng, tok, max_tokens, min_tokens=None):
  """Endless (prompt ids with BOS, answer ids with EOS) of up to max_tokens·3.5 characters."""
  hi = int(max_tokens * CHARS_PER_TOKEN)
  lo = MIN_CHARS if min_tokens is None else int(min_tokens * CHARS_PER_TOKEN)
  while True:
    ex = synthetic.passkey(rng, int(rng.integers(lo, max(lo + 1, hi))))
    yield [tok.bos_id] + tok.encode(ex.prompt).tolist(), tok.encode(ex.answer).tolist() + [
        tok.eos_id]


def pack(docs, length, rows, one_per_row=False):
  """Rows of whole documents: tokens, segment ids, positions, loss weights (every target), and
  the answer mask (the targets " K." of each document, EOS excluded)."""
  out = [np.zeros((rows, length), np.int32) for _ in range(3)]
  weights, answer = np.zeros((2, rows, length), np.float32)
  for r in range(rows):
    offset, segment = 0, 1
    while True:
      prompt, ans = next(docs)
      n = len(prompt) + len(ans)
      if n > length - offset:
        if offset == 0:
          continue  # too long for an empty row: draw another
        break
      sl = slice(offset, offset + n)
      out[0][r, sl], out[1][r, sl], out[2][r, sl] = prompt + ans, segment, np.arange(n)
      weights[r, offset:offset + n - 1] = 1  # position t predicts token t + 1
      answer[r, offset + len(prompt) - 1:offset + n - 2] = 1
      offset, segment = offset + n, segment + 1
      if one_per_row:
        break
  return (*out, weights, answer)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser()
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--rows", type=int, default=16)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=50)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=8, help="head_dim = hidden / heads")
  p.add_argument("--theta", type=float, default=10000.0, help="RoPE base")
  p.add_argument("--init", default="", help="a .pkl from --save or a longctx checkpoint")
  p.add_argument("--save", default="", help="write the final params here (.pkl)")
  p.add_argument("--eval_lengths", default="", help="comma-separated (default: --length)")
  p.add_argument("--eval_every", type=int, default=100)
  return p


def _initial_params(cfg, init: str):
  """Params from a .pkl written by --save, a longctx checkpoint, or at random."""
  if init.endswith(".pkl"):
    with open(init, "rb") as f:
      return pickle.load(f)
  if init:
    import longctx
    return longctx.load_pretrained(init, progress=False).params
  return init_params(cfg, jax.random.key(0))


def _compiled(model, opt):
  """(step, exact_match), jitted: one AdamW step on the weighted loss; teacher-forced answer
  accuracy (whole answer, per token)."""
  def predictions(params, tokens, segments, positions):
    logits = model.apply({"params": params}, tokens, positions, segments)
    return logits, jnp.roll(tokens, -1, 1)

  @jax.jit
  def step(params, opt_state, tokens, segments, positions, weights):
    def loss_fn(params):
      logits, targets = predictions(params, tokens, segments, positions)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return (nll * weights).sum() / weights.sum()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def exact_match(params, tokens, segments, positions, answer):
    logits, targets = predictions(params, tokens, segments, positions)
    right = logits.argmax(-1) == targets
    return (right | (answer == 0)).all(1).mean(), (right * answer).sum() / answer.sum()
  return step, exact_match


def main():
  p = _parser()
  a = p.parse_args()
  if a.steps <= a.warmup:
    p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup})")

  tok = make_tokenizer(TokenizerKind.HF, TOKENIZER)
  rng = np.random.default_rng(0)
  cfg = ModelConfig(vocab_size=400, hidden_size=a.hidden, intermediate_size=352 * a.hidden // 128,
                    num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.heads,
                    head_dim=a.hidden // a.heads, max_position_embeddings=a.length,
                    rope=DefaultRope(theta=a.theta))
  params = _initial_params(cfg, a.init)
  schedule = optax.warmup_cosine_decay_schedule(0, a.lr, a.warmup, a.steps, a.lr * 0.1)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(schedule, b2=0.98, weight_decay=0.0))
  opt_state = opt.init(params)
  step, exact_match = _compiled(Llama(cfg), opt)

  eval_lengths = [int(x) for x in a.eval_lengths.split(",")] if a.eval_lengths else [a.length]
  eval_sets = {n: pack(documents(rng, tok, n, int(0.8 * n)), n, 48, one_per_row=True)
               for n in eval_lengths}
  train_docs = documents(rng, tok, a.length)
  print(f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters; {cfg.num_heads} heads x "
        f"{cfg.head_dim}, theta {a.theta:g}, rows {a.rows} x {a.length}", flush=True)
  t0, tokens_seen = time.time(), 0
  for i in range(1, a.steps + 1):
    tokens, segments, positions, weights, _ = pack(train_docs, a.length, a.rows)
    params, opt_state, loss = step(params, opt_state, tokens, segments, positions, weights)
    tokens_seen += tokens.size
    if i % 25 == 0:
      dt = time.time() - t0
      print(f"step {i} loss {float(loss):.3f}  {dt:.0f} s  {tokens_seen / dt:,.0f} tokens/s",
            flush=True)
    if i % a.eval_every == 0 or i == a.steps:
      for n, (tokens, segments, positions, _, answer) in eval_sets.items():
        exact, digit = exact_match(params, tokens, segments, positions, answer)
        print(f"  step {i} length {n}: answer exact {float(exact):.2f}, "
              f"token {float(digit):.2f} (teacher-forced)", flush=True)
  if a.save:
    with open(a.save, "wb") as f:
      pickle.dump(jax.device_get(params), f)


if __name__ == "__main__":
  main()
