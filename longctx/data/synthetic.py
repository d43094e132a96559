"""Synthetic long-context data: passkey (METHODS.md §6), multi-needle haystacks, and
LongAlign-like SFT conversations with lengths from 1k to 64k.

Lengths are in characters, which is tokens for the byte tokenizer (ASCII text). Everything is a
pure function of (seed, index), so sources are random-access and reproducible on any host.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from longctx.data.config import SyntheticKind

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                  "back again. ")
_WORDS = ("the model reads long documents and answers questions about them with care while "
          "attention spans many thousands of tokens across chapters reports tables and code "
          "river mountain city history science market contract theorem proof garden").split()


@functools.lru_cache(maxsize=1)
def _corpus() -> str:
  """~256k characters of pseudo-prose, built once; documents are slices of it."""
  rng = np.random.default_rng(1234)
  words = rng.choice(np.array(_WORDS), size=48_000)
  sentences = [" ".join(words[i:i + 12]).capitalize() + ". " for i in range(0, len(words), 12)]
  text = "".join(sentences)
  while len(text) < 262_144:
    text += text
  return text


def prose(rng: np.random.Generator, n_chars: int) -> str:
  """n_chars of filler prose starting at a random offset (repeats the corpus if longer)."""
  corpus = _corpus()
  start = int(rng.integers(0, len(corpus) // 2))
  reps = -(-(start + n_chars) // len(corpus))
  return (corpus * reps)[start:start + n_chars] if reps > 1 else corpus[start:start + n_chars]


def longalign_length(rng: np.random.Generator, min_tokens: int, max_tokens: int) -> int:
  """Log-uniform length in [min_tokens, max_tokens]: many short, a long tail up to 64k."""
  return int(np.exp(rng.uniform(np.log(min_tokens), np.log(max_tokens))))


def longalign_conversation(seed: int, index: int, min_tokens: int = 1024,
                           max_tokens: int = 65536) -> dict[str, Any]:
  """A chat record: a long document + question, a short answer; 1–3 turns; ≈ target length.

  The total character count (≈ byte tokens, template overhead aside) is drawn from
  longalign_length; about 5% of it is the answers.
  """
  rng = np.random.default_rng([seed, index])
  total = longalign_length(rng, min_tokens, max_tokens)
  n_turns = int(rng.integers(1, 4))
  answer_chars = max(16, total // (20 * n_turns))
  context_chars = max(16, total - 40 - n_turns * (answer_chars + 60))
  messages = [{"role": "user", "content": prose(rng, context_chars) + "\nQuestion: summarize."}]
  for t in range(n_turns):
    if t:
      messages.append({"role": "user", "content": f"Follow-up question {t}: and then?"})
    messages.append({"role": "assistant", "content": prose(rng, answer_chars)})
  return {"messages": messages}


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
  prompt: str
  answer: str
  passkey: int
  depth: float  # fraction of the haystack before the passkey line


def passkey(rng: np.random.Generator, n_chars: int, depth: float | None = None) -> PasskeyExample:
  """LongLoRA's passkey document of about n_chars; K uniform in 1..50000."""
  key = int(rng.integers(1, 50001))
  depth = float(rng.uniform()) if depth is None else depth
  line = f"The pass key is {key}. Remember it. {key} is the pass key. "
  question = "What is the pass key? The pass key is"
  n_filler = max(0, n_chars - len(PASSKEY_TASK) - len(line) - len(question) - 2)
  reps = n_filler // len(PASSKEY_FILLER) + 1
  before = int(round(depth * (reps - 1)))
  prompt = (PASSKEY_TASK + " " + PASSKEY_FILLER * before + line
            + PASSKEY_FILLER * (reps - 1 - before) + question)
  return PasskeyExample(prompt, f" {key}.", key, depth)


@dataclasses.dataclass(frozen=True)
class NeedleExample:
  prompt: str
  answer: str
  needles: tuple[tuple[str, int], ...]  # (key, value) pairs inserted
  depths: tuple[float, ...]
  asked: str                            # the key the question asks about


def multi_needle(rng: np.random.Generator, n_chars: int, n_needles: int = 4,
                 depths: tuple[float, ...] | None = None) -> NeedleExample:
  """A haystack of about n_chars with needles "The magic number of KEY is V." inserted at
  sentence boundaries at the given depths (random if None); asks about one needle."""
  keys = [f"{w}-{int(rng.integers(100, 999))}" for w in rng.choice(_WORDS, n_needles)]
  values = [int(v) for v in rng.integers(1, 1_000_000, n_needles)]
  depths = tuple(sorted(rng.uniform(size=n_needles))) if depths is None else tuple(depths)
  hay = prose(rng, n_chars)
  pieces, last = [], 0
  for d, k, v in zip(depths, keys, values):
    cut = hay.rfind(". ", 0, max(last, int(d * len(hay)))) + 2  # back up to a sentence end
    cut = max(cut, last)
    pieces += [hay[last:cut], f"The magic number of {k} is {v}. "]
    last = cut
  pieces.append(hay[last:])
  asked = int(rng.integers(0, n_needles))
  prompt = "".join(pieces) + f"\nWhat is the magic number of {keys[asked]}? It is"
  return NeedleExample(prompt, f" {values[asked]}.", tuple(zip(keys, values)), depths,
                       keys[asked])


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Random-access grain data source of (origin, record) pairs."""
  kind: SyntheticKind
  num_examples: int
  seed: int
  min_tokens: int
  max_tokens: int

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]:
    index = int(index)
    origin = f"synthetic-{self.kind.value}:{index}"
    if self.kind is SyntheticKind.LONGALIGN:
      return origin, longalign_conversation(self.seed, index, self.min_tokens, self.max_tokens)
    rng = np.random.default_rng([self.seed, index])
    n = longalign_length(rng, self.min_tokens, self.max_tokens)
    if self.kind is SyntheticKind.NEEDLE:
      ex = multi_needle(rng, n)
    else:
      ex = passkey(rng, n)
      if self.kind is SyntheticKind.PASSKEY_TEXT:
        return origin, {"text": ex.prompt + ex.answer}
    return origin, {"prompt": ex.prompt, "response": ex.answer}
