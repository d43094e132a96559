"""Tokenizers behind one small interface: byte-level (no file), HF tokenizer.json, sentencepiece.

All encode to int32 numpy arrays without adding BOS/EOS; chat templates add those explicitly so
the target mask stays exact. Files are local only: nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Protocol

import numpy as np

from longctx.data.chat_template import find_chat_template
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
  chat_template = None  # no file, so no template of its own
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


_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|endoftext|>", "<|im_end|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]")


def _read_json(path: str) -> dict:
  import json
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  return data if isinstance(data, dict) else {}


def _declared_specials(path: str, look: Callable[[str], int | None]) -> dict[str, tuple[int, str]]:
  """The special tokens the files beside `path` declare, as {role: (id, where)}.

  transformers' own order: tokenizer_config.json's `bos_token` / `eos_token` / `pad_token`
  (a string or {"content": ...}), then special_tokens_map.json, then config.json's
  `*_token_id` (the first of a list).
  """
  folder = os.path.dirname(os.path.abspath(path))
  found: dict[str, tuple[int, str]] = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    data, where = _read_json(os.path.join(folder, name)), os.path.join(folder, name)
    for role in ("bos", "eos", "pad"):
      token = data.get(f"{role}_token")
      token = token.get("content") if isinstance(token, dict) else token
      if role not in found and isinstance(token, str):
        i = look(token)
        if i is None:
          raise ValueError(f"{where}: {role}_token {token!r} is not in the vocabulary of {path}")
        found[role] = (int(i), f"{where} {role}_token {token!r}")
  where = os.path.join(folder, "config.json")
  config = _read_json(where)
  for role in ("bos", "eos", "pad"):
    i = config.get(f"{role}_token_id")
    i = i[0] if isinstance(i, list) and i else i
    if role not in found and isinstance(i, int) and i >= 0:
      found[role] = (i, f"{where} {role}_token_id")
  return found


class HFTokenizer:
  """A HuggingFace `tokenizers` tokenizer.json (BPE, unigram, …).

  BOS, EOS and pad are the ones the HF directory declares (`_declared_specials`:
  tokenizer_config.json, special_tokens_map.json, config.json). A bare tokenizer.json falls
  back to the usual names; one without a BOS token (GPT-2, Qwen) uses its EOS token as
  document start, as those models do. No EOS token is an error. `specials` says where each
  id came from.
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
    declared = _declared_specials(path, look)
    if "eos" not in declared:
      declared["eos"] = (_special_id(look, _EOS_NAMES, path, "EOS"), "by name")
    if "bos" not in declared:
      has_bos = any(look(n) is not None for n in _BOS_NAMES)
      declared["bos"] = ((_special_id(look, _BOS_NAMES, path, "BOS"), "by name") if has_bos
                         else (declared["eos"][0], "EOS (no BOS token)"))
    if "pad" not in declared:
      pad = look("<pad>")
      declared["pad"] = (int(pad), "by name") if pad is not None else (0, "default 0")
    self.bos_id, self.eos_id, self.pad_id = (declared[r][0] for r in ("bos", "eos", "pad"))
    self.specials = {role: where for role, (_, where) in declared.items()}
    self.chat_template = find_chat_template(path)
    self.special_text = {f"{r}_token": self._tok.id_to_token(i) for r, i in
                         (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))}

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
    self.chat_template = find_chat_template(path)
    self.special_text = {f"{r}_token": self._sp.id_to_piece(i) for r, i in
                         (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))}

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


TOKENIZER_FILES = {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model"}


def tokenizer_in(directory: str, kind) -> str:
  """The tokenizer file of `kind` (a TokenizerKind or its name) in a model directory, or ""
  when the kind has no file or the directory holds none."""
  name = TOKENIZER_FILES.get(getattr(kind, "value", str(kind)))
  if not name or not directory:
    return ""
  from etils import epath
  path = epath.Path(directory) / name
  return str(path) if path.exists() else ""


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
