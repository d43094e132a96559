"""Tokenizers behind one small interface: byte-level (no file), HF tokenizer.json, sentencepiece.

All encode to int32 numpy arrays without adding BOS/EOS; chat templates add those explicitly so
the target mask stays exact. Files are local only: nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Protocol

import numpy as np

from longctx.data.config import TokenizerKind


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray: ...   # int32 [n], no BOS/EOS
  def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes shifted by 4: 0 pad, 1 BOS, 2 EOS, 3 unused; vocab 260. Needs no file."""
  vocab_size: int = 260
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  offset: int = 4

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64)
    ids = ids[ids >= self.offset] - self.offset
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _require_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: expected a local file, found nothing at {path!r}")


def _special_id(lookup: Callable[[str], int | None], names: tuple[str, ...], path: str,
                role: str) -> int:
  for name in names:
    i = lookup(name)
    if i is not None and i >= 0:
      return int(i)
  raise ValueError(f"tokenizer {path}: expected a {role} token among {names}, found none")


class HFTokenizer:
  """A HuggingFace `tokenizers` tokenizer.json (BPE, unigram, …).

  BOS and EOS are looked up by their usual names; a tokenizer without a BOS token (GPT-2, Qwen)
  uses its EOS token as document start, as those models do. No EOS token is an error.
  """

  def __init__(self, path: str):
    import tokenizers
    _require_file(path, "HF tokenizer")
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._tok.no_padding()
    self._tok.no_truncation()
    look = self._tok.token_to_id
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = _special_id(look, ("</s>", "<|end_of_text|>", "<eos>", "[EOS]",
                                     "<|endoftext|>", "<|im_end|>"), path, "EOS")
    bos_names = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]")
    has_bos = any(look(n) is not None for n in bos_names)
    self.bos_id = _special_id(look, bos_names, path, "BOS") if has_bos else self.eos_id
    pad = look("<pad>")
    self.pad_id = int(pad) if pad is not None else 0

  def __getstate__(self):  # reload from the file in worker processes
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
  """A sentencepiece .model file."""

  def __init__(self, path: str):
    import sentencepiece as spm
    _require_file(path, "sentencepiece model")
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()
    if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
      raise ValueError(f"sentencepiece model {path}: expected BOS and EOS ids, found "
                       f"bos={self._sp.bos_id()} eos={self._sp.eos_id()}")
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

  def __getstate__(self):  # reload from the file in worker processes
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


_REGISTRY: dict[TokenizerKind, Callable[[str], Tokenizer]] = {
    TokenizerKind.BYTE: lambda path: ByteTokenizer(),
    TokenizerKind.HF: HFTokenizer,
    TokenizerKind.SENTENCEPIECE: SentencePieceTokenizer,
}


def make_tokenizer(kind: TokenizerKind, path: str = "") -> Tokenizer:
  """The tokenizer of `kind`, loaded from the local `path` where it needs one."""
  return _REGISTRY[kind](path)


def train_bpe_tokenizer(texts, path: str, vocab_size: int = 32000,
                        split_digits: bool = False) -> str:
  """Trains a byte-level BPE `tokenizer.json` on local `texts` and writes it to `path`.

  Special tokens <pad>, <s>, </s>, <unk> come first (ids 0–3). For tests, benchmarks and users
  without a tokenizer file; nothing is downloaded. `split_digits`: every digit is its own token
  (as in Llama's tokenizer), so numbers are never merged into multi-digit pieces. Returns `path`.
  """
  from tokenizers import Tokenizer as HFTokenizerModel, decoders, models, pre_tokenizers, trainers
  tok = HFTokenizerModel(models.BPE(unk_token="<unk>"))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                byte_level]) if split_digits else byte_level)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(list(texts), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.save(str(path))
  return str(path)
