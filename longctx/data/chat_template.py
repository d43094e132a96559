"""The model's own chat template (`data.template = "model"`): the jinja template an HF directory
ships (chat_template.jinja, or `chat_template` in tokenizer_config.json), rendered as
transformers renders it (sandboxed jinja, trim_blocks / lstrip_blocks, `raise_exception`).

The target mask comes from rendering prefixes of the conversation: before each assistant turn
the text up to the generation prompt (`add_generation_prompt=True`) is context, and what the
full turn adds after it (the answer and the template's end-of-turn marker) is the target. A
template that does not render prefixes as prefixes of the whole cannot be masked this way and is
an error that says so.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Sequence

Piece = tuple[str, bool]


def find_chat_template(tokenizer_path: str) -> str | None:
  """The chat template beside `tokenizer_path` (chat_template.jinja first, as transformers
  saves it; then tokenizer_config.json's `chat_template`, its "default" entry if a list)."""
  folder = os.path.dirname(os.path.abspath(tokenizer_path))
  jinja = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  config = os.path.join(folder, "tokenizer_config.json")
  if not os.path.isfile(config):
    return None
  with open(config, encoding="utf-8") as f:
    template = json.load(f).get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) else None


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  from jinja2.ext import loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise ValueError(f"the chat template refused the conversation: {message}")
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[loopcontrols])
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template)


def renderer(template: str, special_tokens: dict[str, str]) -> Callable[..., str]:
  """render(messages, add_generation_prompt) -> text, with bos_token / eos_token / ... bound."""
  compiled = _compiled(template)
  return lambda messages, add_generation_prompt=False: compiled.render(
      messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)


def _suffix(longer: str, prefix: str, what: str) -> str:
  if not longer.startswith(prefix):
    raise ValueError(f"the model's chat template does not render {what} as a continuation of "
                     "the text before it, so its assistant tokens cannot be masked; use "
                     "data.template='chatml', 'llama2' or 'plain'")
  return longer[len(prefix):]


def render_pieces(render: Callable[..., str], turns: Sequence[Any]) -> list[Piece]:
  """(text, is_target) pieces of a conversation (turns with .role / .content)."""
  messages = [{"role": t.role, "content": t.content} for t in turns]
  pieces: list[Piece] = []
  done = ""
  for i, turn in enumerate(turns):
    if turn.role != "assistant":
      continue
    head = render(messages[:i], add_generation_prompt=True)
    full = render(messages[:i + 1])
    pieces.append((_suffix(head, done, f"the generation prompt of turn {i}"), False))
    pieces.append((_suffix(full, head, f"assistant turn {i}"), True))
    done = full
  rest = _suffix(render(messages), done, "the conversation's end")
  if rest:
    pieces.append((rest, False))
  return [p for p in pieces if p[0]]
