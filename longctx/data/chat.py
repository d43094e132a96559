"""Records → conversations → token ids with a target mask, through a chat template.

A record is a dict in one of three shapes (auto-detected, in this order):
  {"text": str}                                     plain LM: every token after BOS is a target
  {"messages": [{"role", "content"}, …]}            chat: only assistant tokens (and the
                                                      end-of-turn / EOS token) are targets
  {"prompt": str, "response": str}                  one user turn, one assistant turn
Roles: system (optional, first), user, assistant. Multi-turn conversations are supported.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

import numpy as np

from longctx.data.config import TemplateKind
from longctx.data.errors import DataError
from longctx.data.tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str
  content: str


@dataclasses.dataclass(frozen=True)
class Document:
  """Either plain `text` or a list of `turns` (exactly one of them is set)."""
  text: str | None = None
  turns: tuple[Turn, ...] = ()


def _string_field(record: Mapping[str, Any], key: str, origin: str) -> str:
  value = record.get(key)
  if not isinstance(value, str):
    raise DataError(origin, f"field {key!r} to be a string", f"{type(value).__name__}")
  return value


def _parse_turns(messages: Any, origin: str) -> tuple[Turn, ...]:
  if not isinstance(messages, list) or not messages:
    raise DataError(origin, "a non-empty list in 'messages'", repr(messages)[:80])
  turns = []
  for k, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise DataError(origin, f"message {k} to have 'role' and 'content'", repr(m)[:80])
    if m["role"] not in ROLES:
      raise DataError(origin, f"message {k} role in {ROLES}", repr(m["role"]))
    turns.append(Turn(m["role"], _string_field(m, "content", f"{origin} message {k}")))
  if not any(t.role == "assistant" for t in turns):
    raise DataError(origin, "at least one assistant turn", f"roles {[t.role for t in turns]}")
  return tuple(turns)


def to_document(record: Any, origin: str) -> Document:
  """Validate one record (a dict, or JSON bytes / str) and return its Document; DataError."""
  if isinstance(record, (bytes, str)):
    try:
      record = json.loads(record)
    except ValueError as e:
      raise DataError(origin, "one valid JSON object", f"invalid JSON ({e})") from None
  if not isinstance(record, Mapping):
    raise DataError(origin, "a JSON object", type(record).__name__)
  if "text" in record:
    return Document(text=_string_field(record, "text", origin))
  if "messages" in record:
    return Document(turns=_parse_turns(record["messages"], origin))
  if "prompt" in record or "response" in record:
    return Document(turns=(Turn("user", _string_field(record, "prompt", origin)),
                           Turn("assistant", _string_field(record, "response", origin))))
  raise DataError(origin, "keys 'text', 'messages' or 'prompt'+'response'",
                  f"keys {sorted(record)}")


# A rendered conversation: (text or token id, is_target) pieces in order.
Piece = tuple[str | int, bool]


def _render_plain(turns: tuple[Turn, ...]) -> list[Piece]:
  pieces: list[Piece] = []
  for t in turns:
    pieces.append((t.content + ("" if t.role == "assistant" else "\n"), t.role == "assistant"))
  return pieces


def _render_llama2(turns: tuple[Turn, ...], eos: int, bos: int) -> list[Piece]:
  """Llama-2 chat: <s>[INST] <<SYS>>…<</SYS>> user [/INST] answer </s><s>[INST] …"""
  system = ""
  if turns[0].role == "system":
    system, turns = f"<<SYS>>\n{turns[0].content}\n<</SYS>>\n\n", turns[1:]
  pieces: list[Piece] = []
  for t in turns:
    if t.role == "user":
      if pieces:
        pieces.append((bos, False))
      pieces.append((f"[INST] {system}{t.content} [/INST]", False))
      system = ""
    elif t.role == "assistant":
      pieces += [(f" {t.content} ", True), (eos, True)]
    else:
      pieces.append((f"{t.content}\n", False))  # a system turn after the first: context
  return pieces


def _render_chatml(turns: tuple[Turn, ...], eos: int) -> list[Piece]:
  pieces: list[Piece] = []
  for t in turns:
    pieces.append((f"<|im_start|>{t.role}\n", False))
    if t.role == "assistant":
      pieces += [(t.content + "<|im_end|>", True), ("\n", False)]
    else:
      pieces.append((t.content + "<|im_end|>\n", False))
  pieces.append((eos, True))
  return pieces


def _render_model(turns: tuple[Turn, ...], tok: Tokenizer) -> list[Piece]:
  from longctx.data import chat_template
  template = getattr(tok, "chat_template", None)
  if not template:
    raise ValueError(f"data.template='model': the tokenizer {getattr(tok, 'path', 'byte')!r} "
                     "has no chat template beside it (chat_template.jinja or tokenizer_config."
                     "json's chat_template); choose chatml, llama2 or plain")
  return chat_template.render_pieces(chat_template.renderer(template, tok.special_text), turns)


def render(doc: Document, template: TemplateKind, tok: Tokenizer) -> list[Piece]:
  """The pieces of one document after its leading BOS."""
  if doc.text is not None:
    return [(doc.text, True), (tok.eos_id, True)]
  renderers: dict[TemplateKind, Callable[[], list[Piece]]] = {
      TemplateKind.PLAIN: lambda: _render_plain(doc.turns) + [(tok.eos_id, True)],
      TemplateKind.LLAMA2: lambda: _render_llama2(doc.turns, tok.eos_id, tok.bos_id),
      TemplateKind.CHATML: lambda: _render_chatml(doc.turns, tok.eos_id),
      TemplateKind.MODEL: lambda: _render_model(doc.turns, tok),
  }
  return renderers[template]()


def tokenize_document(doc: Document, template: TemplateKind,
                      tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [n], target_mask bool [n]); tokens[0] is BOS, never a target. A model's own
  template that starts with the BOS token (SmolLM2's <|im_start|>, Llama-3's
  <|begin_of_text|>) keeps its own: the tokens are the template's, as transformers makes them."""
  ids = [np.asarray([tok.bos_id], np.int32)]
  mask = [np.zeros(1, bool)]
  for piece, is_target in render(doc, template, tok):
    piece_ids = (np.asarray([piece], np.int32) if isinstance(piece, int)
                 else tok.encode(piece))
    ids.append(piece_ids)
    mask.append(np.full(piece_ids.shape, is_target))
  ids_n, mask_n = np.concatenate(ids), np.concatenate(mask)
  if template is TemplateKind.MODEL and len(ids_n) > 1 and ids_n[1] == tok.bos_id:
    ids_n, mask_n = ids_n[1:], mask_n[1:]
  return ids_n, mask_n
