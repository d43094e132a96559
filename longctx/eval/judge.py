"""The LongBench-Chat judge: a 1–10 rating from an OpenAI-compatible chat endpoint (METHODS.md §6).

The prompt follows the structure of LongAlign's GPT-4 judge for LongBench-Chat — the question, a
reference answer, scored example answers (few-shot), then the answer to rate, with the final
rating written as [[score]] — in our own words. `--judge_prompt` takes the benchmark's own
template file instead (`load_judge_template`, `filled_template`), so that scores compare with
published tables. HTTP uses only the standard library.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Sequence

JUDGE_PROMPT = """[Instruction]
You are an impartial judge. Rate the quality of an AI assistant's answer to the user's question
below. Judge above all whether the answer is correct and helpful, and whether it covers what the
reference answer covers; a fluent answer with wrong facts deserves a low score. The reference
answer is known to be correct. Scored example answers to the same question show how the scale is
used. First explain your judgement briefly and objectively, then give a rating from 1 to 10 in
exactly this form: "Rating: [[5]]".

[Question]
{question}

[Reference answer]
{reference}
[End of reference answer]
{examples}
[Assistant's answer]
{answer}
[End of assistant's answer]"""

EXAMPLE_TEMPLATE = """
[Example answer {index}]
{answer}
[End of example answer {index}]
Rating of example answer {index}: [[{score}]]{explanation}
"""

JUDGE_SYSTEM = "You evaluate the quality of texts carefully and fairly."
_BRACKETS = re.compile(r"\[\[([^\]]+)\]\]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class JudgeError(ConnectionError):
  """The judge endpoint could not be reached or answered with something unusable."""


@dataclasses.dataclass(frozen=True)
class FewShot:
  answer: str
  score: float
  explanation: str = ""


def judge_prompt(question: str, reference: str, answer: str,
                 few_shot: Sequence[FewShot] = ()) -> str:
  """The judge's user message for one answer."""
  examples = "".join(
      EXAMPLE_TEMPLATE.format(index=i + 1, answer=ex.answer, score=_fmt(ex.score),
                              explanation=f"\nWhy: {ex.explanation}" if ex.explanation else "")
      for i, ex in enumerate(few_shot))
  return JUDGE_PROMPT.format(question=question, reference=reference, examples=examples,
                             answer=answer)


def load_judge_template(path: str) -> str:
  """A judge prompt file with positional `{}` fields, as LongBench-Chat's prompt_fs.txt: the
  question, the reference answer, then each few-shot example's answer and score, then the answer
  to rate (its eval.py fills them with `str.format` in that order)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--judge_prompt: expected a local text file, found nothing at "
                            f"{path!r}")
  with open(path, encoding="utf-8") as f:
    template = f.read()
  fields = _template_fields(template, path)
  if fields < 3 or fields % 2 == 0:
    raise ValueError(f"--judge_prompt {path}: expected 3 + 2·k positional {{}} fields (question, "
                     f"reference, k example answers and scores, answer), found {fields}")
  return template


def _template_fields(template: str, path: str) -> int:
  import string
  try:
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
  except ValueError as e:
    raise ValueError(f"--judge_prompt {path}: not a str.format template ({e}); a literal brace "
                     "is written {{ or }}") from e
  if any(name for name in names):
    raise ValueError(f"--judge_prompt {path}: expected only positional {{}} fields, found "
                     f"{sorted({n for n in names if n})}")
  return len(names)


def filled_template(template: str, question: str, reference: str, answer: str,
                    few_shot: Sequence[FewShot], where: str = "--judge_prompt") -> str:
  """`template` filled as LongBench-Chat's eval.py fills prompt_fs.txt."""
  k = (_template_fields(template, where) - 3) // 2
  if len(few_shot) != k:
    raise ValueError(f"{where}: the template has fields for {k} few-shot example(s); the "
                     f"question has {len(few_shot)} (--few_shot)")
  pairs = [text for ex in few_shot for text in (ex.answer, _fmt(ex.score))]
  return template.format(question, reference, *pairs, answer)


@dataclasses.dataclass(frozen=True)
class JudgePrompt:
  """The judge's user message: longctx's own wording (`template=None`) or a template file's."""
  template: str | None = None
  source: str = "longctx"   # what the reports record: "longctx" or the file's absolute path

  @classmethod
  def from_file(cls, path: str | None) -> "JudgePrompt":
    return cls(load_judge_template(path), os.path.abspath(path)) if path else cls()

  def render(self, question: str, reference: str, answer: str,
             few_shot: Sequence[FewShot] = ()) -> str:
    if self.template is None:
      return judge_prompt(question, reference, answer, few_shot)
    return filled_template(self.template, question, reference, answer, few_shot,
                           f"--judge_prompt {self.source}")


def _fmt(score: float) -> str:
  return str(int(score)) if float(score).is_integer() else str(score)


def parse_score(text: str) -> float | None:
  """The first number inside the last [[…]] of the judge's reply (as LongBench-Chat's eval.py
  reads it), or None when there is none or it lies outside 1..10."""
  brackets = _BRACKETS.findall(text)
  number = _NUMBER.search(brackets[-1]) if brackets else None
  if number is None:
    return None
  score = float(number.group())
  return score if 1 <= score <= 10 else None


def completions_url(url: str) -> str:
  """A base URL (`http://host:port`, `…/v1`) or the full `…/v1/chat/completions` endpoint."""
  url = url.rstrip("/")
  if url.endswith("/chat/completions"):
    return url
  return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


@dataclasses.dataclass(frozen=True)
class JudgeClient:
  """POSTs chat completions to an OpenAI-compatible endpoint; the key comes from `api_key_env`."""
  url: str
  model: str
  timeout_s: float = 120.0
  retries: int = 2
  backoff_s: float = 2.0
  api_key_env: str = "OPENAI_API_KEY"
  system: str = JUDGE_SYSTEM
  prompt: JudgePrompt = JudgePrompt()

  def complete(self, prompt: str) -> str:
    """The assistant message's text; raises JudgeError after `retries` failed retries."""
    body = json.dumps({"model": self.model, "temperature": 0.0, "max_tokens": 1024,
                       "messages": [{"role": "system", "content": self.system},
                                    {"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(self.api_key_env)
    if key:
      headers["Authorization"] = f"Bearer {key}"
    url = completions_url(self.url)
    last = None
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff_s * attempt)
      try:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          return _message_text(json.loads(response.read()), url)
      except urllib.error.HTTPError as e:
        last = f"HTTP {e.code} {e.reason}"
        if e.code < 500 and e.code != 429:
          break  # a client error will not go away by retrying
      except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        last = str(getattr(e, "reason", e))
    raise JudgeError(f"judge endpoint {url} failed after {self.retries + 1} attempt(s): {last}")


def _message_text(payload: dict, url: str) -> str:
  try:
    return payload["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError) as e:
    raise JudgeError(f"judge endpoint {url}: expected an OpenAI chat completion "
                     f"(choices[0].message.content), found {str(payload)[:200]}") from e
