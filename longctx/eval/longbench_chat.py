"""The LongBench-Chat harness (METHODS.md §6): generate answers to long questions, optionally judge.

Questions come from a local JSONL file (one record per line) or a JSON array (LongBench-Chat's
test_cases.json), told apart by the first character: `query` (the question the judge
sees), either `prompt` (the whole model input, as in LongBench-Chat's test cases) or an optional
`context` placed before the query, `answer` (the reference answer, needed to judge), optional
`id` (or `idx`) and optional `few_shot` ([{"answer", "score", "explanation"?}], scored example
answers shown to the judge). `--few_shot=FILE.json` holds either one such list for every question
or, as LongBench-Chat's few_shots.json, a list of lists (question `idx` uses entry idx − 1; without
`idx`, the question's line). Inputs longer than `--max_length` tokens are middle-truncated as
LongBench does: the first and the last halves are kept. Answers are generated greedily.

With `--judge_url` and `--judge_model`, each answer is rated 1–10 by the judge prompt in
`longctx.eval.judge` (or the template file of `--judge_prompt`, as LongBench-Chat's
prompt_fs.txt, with `--judge_system`) and the `[[score]]` is parsed; without them the
generations are written and nothing is scored (the report says so). `OUT/generations.jsonl` and
`OUT/judgments.jsonl` grow one line per question, so generations survive a judge failure and a
rerun resumes.

    python -m longctx.eval longbench-chat --checkpoint=DIR \\
        --questions=longbench_chat.jsonl --max_length=65536 --template=llama2 \\
        --judge_url=http://localhost:8000 --judge_model=gpt-4 --out=lbc_out
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from longctx.data.config import TemplateKind
from longctx.data.tokenizers import Tokenizer
from longctx.eval import common
from longctx.eval.judge import (JUDGE_SYSTEM, FewShot, JudgeClient, JudgeError, JudgePrompt,
                                parse_score)

GENERATIONS_FILE = "generations.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
REPORT_FILE = "longbench_chat.json"
RUN_FILE = "run.json"
JUDGE_RUN_FILE = "judge.json"
SCORE_ATTEMPTS = 3  # asks the judge again when its reply has no [[score]] (LongBench-Chat: 5)
NOT_SCORED = "no judge configured (--judge_url, --judge_model): generations written, none scored"

# The text around a user message that asks the model to answer (prompt side only).
_PROMPT_WRAP = {
    TemplateKind.PLAIN: ("", "\n"),
    TemplateKind.LLAMA2: ("[INST] ", " [/INST]"),
    TemplateKind.CHATML: ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
}


@dataclasses.dataclass(frozen=True)
class Question:
  id: str
  query: str               # the question as the judge sees it
  prompt: str              # the model's input before truncation and template
  reference: str | None = None
  few_shot: tuple[FewShot, ...] = ()


def _few_shot(value, where: str) -> tuple[FewShot, ...]:
  if not isinstance(value, list):
    raise ValueError(f"{where}: few_shot must be a list of {{answer, score}}, found {type(value)}")
  try:
    return tuple(FewShot(str(x["answer"]), float(x["score"]), str(x.get("explanation", "")))
                 for x in value)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: each few_shot example needs 'answer' and a numeric 'score' "
                     f"({e})") from e


def _load_few_shot_file(path: str | None):
  """(shared examples, per-question lists) from --few_shot; either may be empty."""
  if not path:
    return (), []
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--few_shot: expected a local JSON file, found nothing at {path!r}")
  with open(path) as f:
    data = json.load(f)
  if isinstance(data, list) and data and all(isinstance(x, list) for x in data):
    return (), [_few_shot(x, f"{path}[{i}]") for i, x in enumerate(data)]
  return _few_shot(data, path), []


def _question(r: dict, line: int, where: str, shared, per_question) -> Question:
  if not isinstance(r.get("query"), str):
    raise ValueError(f"{where}: expected a string field 'query', found keys {sorted(r)}")
  prompt = r.get("prompt")
  if prompt is None:
    prompt = f"{r['context']}\n\n{r['query']}" if r.get("context") else r["query"]
  slot = int(r["idx"]) - 1 if "idx" in r else line
  if "few_shot" in r:
    few_shot = _few_shot(r["few_shot"], where)
  elif per_question:
    if not 0 <= slot < len(per_question):
      raise ValueError(f"{where}: --few_shot has {len(per_question)} per-question lists; this "
                       f"question needs entry {slot}")
    few_shot = per_question[slot]
  else:
    few_shot = shared
  return Question(str(r.get("id", r.get("idx", line))), r["query"], str(prompt), r.get("answer"),
                  few_shot)


def _question_records(path: str) -> list[tuple[dict, str]]:
  """(record, where) of a JSONL file (`file:line`) or of a JSON array, as LongBench-Chat's
  test_cases.json (`file[index]`), told apart by the first character."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  first = text.lstrip()[:1]
  if first == "[":
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: starts as a JSON array but is not valid JSON ({e})") from e
    return [(r, f"{path}[{i}]") for i, r in enumerate(records)]
  if first == "{":
    return [(r, f"{path}:{i + 1}") for i, r in enumerate(common.read_jsonl(path))]
  raise ValueError(f"--questions {path}: expected JSONL (one object per line) or a JSON array of "
                   f"objects, found text starting with {text.lstrip()[:20]!r}")


def load_questions(path: str, few_shot_path: str | None = None) -> list[Question]:
  """Questions of a JSONL file or a JSON array; errors name file:line or file[index]."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--questions: expected a local JSONL or JSON file, found nothing at "
                            f"{path!r}")
  shared, per_question = _load_few_shot_file(few_shot_path)
  questions = []
  for i, (r, where) in enumerate(_question_records(path)):
    if not isinstance(r, dict):
      raise ValueError(f"{where}: expected a question object, found {type(r).__name__}")
    questions.append(_question(r, i, where, shared, per_question))
  if not questions:
    raise ValueError(f"{path}: no questions found")
  ids = [q.id for q in questions]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{path}: question ids must be unique (they key the resumable outputs)")
  return questions


def middle_truncate(ids: np.ndarray, max_length: int) -> np.ndarray:
  """`ids` if it fits, else its first max_length//2 and last max_length − max_length//2 ids."""
  if len(ids) <= max_length:
    return ids
  half = max_length // 2
  return np.concatenate([ids[:half], ids[len(ids) - (max_length - half):]])


def _prompt_wrap(tokenizer: Tokenizer, template: TemplateKind) -> tuple[str, str]:
  if template is not TemplateKind.MODEL:
    return _PROMPT_WRAP[template]
  from longctx.data import chat_template
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("--template=model: the tokenizer has no chat template beside it")
  mark = "\x00question\x00"
  text = chat_template.renderer(tokenizer.chat_template, tokenizer.special_text)(
      [{"role": "user", "content": mark}], add_generation_prompt=True)
  before, after = text.split(mark)
  bos = tokenizer.special_text["bos_token"]
  return (before[len(bos):] if bos and before.startswith(bos) else before), after


def encode_prompt(tokenizer: Tokenizer, question: Question, template: TemplateKind,
                  max_length: int) -> tuple[list[int], bool]:
  """(BOS + template around the middle-truncated question text, whether it was truncated).

  The whole prompt, template and BOS included, is at most `max_length` tokens.
  """
  before, after = (tokenizer.encode(s) for s in _prompt_wrap(tokenizer, template))
  room = max_length - 1 - len(before) - len(after)
  if room < 2:
    raise ValueError(f"--max_length {max_length} leaves no room for the question after the "
                     f"template ({max_length - room} tokens)")
  body = tokenizer.encode(question.prompt)
  kept = middle_truncate(body, room)
  ids = np.concatenate([[tokenizer.bos_id], before, kept, after]).astype(np.int32)
  return ids.tolist(), len(kept) < len(body)


def _judge_one(judge: JudgeClient, q: Question, generation: str) -> dict:
  prompt = judge.prompt.render(q.query, q.reference, generation, q.few_shot)
  for _ in range(SCORE_ATTEMPTS):
    reply = judge.complete(prompt)
    score = parse_score(reply)
    if score is not None:
      break
  return {"id": q.id, "score": score, "judge_reply": reply}


def run_longbench_chat(model, tokenizer: Tokenizer, questions: Sequence[Question], out_dir: str,
                       max_length: int, max_new_tokens: int = 512,
                       template: TemplateKind = TemplateKind.PLAIN,
                       judge: JudgeClient | None = None,
                       budget: common.MemoryBudget | None = None,
                       run_info: dict | None = None) -> dict:
  """Generates (and judges) every question not yet done in `out_dir`; returns the report.

  model: `.config` and `.generate(prompts, max_new_tokens, temperature, eos_token_id)`.
  Raises JudgeError when the judge fails; every generation made so far is on disk by then.
  """
  common.check_vocab(model.config, tokenizer)
  unreferenced = [q.id for q in questions if q.reference is None]
  if judge is not None and unreferenced:
    raise ValueError(f"judging needs a reference 'answer' for every question; missing for ids "
                     f"{unreferenced[:10]}")
  common.check_fits(model.config, 1, max_length, max_new_tokens,
                    budget or common.MemoryBudget.from_gib(None), f"--max_length {max_length}",
                    getattr(model, "attention", None))
  os.makedirs(out_dir, exist_ok=True)
  common.check_run_file(os.path.join(out_dir, RUN_FILE), {
      "max_length": max_length, "max_new_tokens": max_new_tokens, "template": template.value,
      **(run_info or {})})
  if judge is not None:  # judgments are kept per judge: an earlier one's are never mixed in
    common.check_run_file(os.path.join(out_dir, JUDGE_RUN_FILE), judge_info(judge))
  gen_path = os.path.join(out_dir, GENERATIONS_FILE)
  judge_path = os.path.join(out_dir, JUDGMENTS_FILE)
  generations = {r["id"]: r for r in common.read_jsonl(gen_path)}
  judgments = {r["id"]: r for r in common.read_jsonl(judge_path)}
  for q in questions:
    if q.id not in generations:
      generations[q.id] = _generate_one(model, tokenizer, q, template, max_length, max_new_tokens)
      common.append_jsonl(gen_path, generations[q.id])
    if judge is not None and q.id not in judgments:
      try:
        judgments[q.id] = _judge_one(judge, q, generations[q.id]["generation"])
      except JudgeError as e:
        raise JudgeError(f"{e}. The {len(generations)} generation(s) made so far are kept in "
                         f"{gen_path}; rerun with the same --out to resume") from e
      common.append_jsonl(judge_path, judgments[q.id])
  report = _report(questions, generations, judgments if judge else None, gen_path)
  return {**report, **judge_info(judge)} if judge is not None else report


def judge_info(judge: JudgeClient) -> dict:
  """What a report records of its judge, and what its cached judgments must match."""
  return {"judge_model": judge.model, "judge_prompt": judge.prompt.source,
          "judge_system": judge.system}


def _generate_one(model, tokenizer, q, template, max_length, max_new_tokens) -> dict:
  ids, truncated = encode_prompt(tokenizer, q, template, max_length)
  out = model.generate([ids], max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_token_id=tokenizer.eos_id)[0]
  return {"id": q.id, "prompt_tokens": len(ids), "truncated": truncated,
          "generation": tokenizer.decode([t for t in out if t != tokenizer.eos_id])}


def _report(questions, generations, judgments, gen_path) -> dict:
  report = {"task": "longbench-chat", "questions": len(questions), "generations": gen_path}
  if judgments is None:
    report.update(scored=0, mean_score=None, note=NOT_SCORED)
    return report
  scores = [judgments[q.id]["score"] for q in questions]
  valid = [s for s in scores if s is not None]
  report.update(scored=len(valid), unparsed=len(scores) - len(valid),
                mean_score=float(np.mean(valid)) if valid else None,
                scores={q.id: s for q, s in zip(questions, scores)})
  return report


def format_report(report: dict) -> str:
  if report["scored"] == 0 and "note" in report:
    return f"{report['questions']} answers generated; {report['note']}"
  mean = "n/a" if report["mean_score"] is None else f"{report['mean_score']:.2f}"
  return common.format_table(["questions", "scored", "unparsed", "mean score (1-10)"],
                             [(report["questions"], report["scored"], report["unparsed"], mean)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--questions", required=True,
                      help="local JSONL of questions, or a JSON array (LongBench-Chat's "
                           "test_cases.json)")
  parser.add_argument("--few_shot", default=None, help="JSON list of {answer, score, explanation}")
  parser.add_argument("--max_length", type=int, default=65536,
                      help="input tokens (middle-truncated)")
  parser.add_argument("--max_new_tokens", type=int, default=512,
                      help="tokens generated per answer (greedy)")
  parser.add_argument("--template", default=TemplateKind.PLAIN.value,
                      choices=[t.value for t in TemplateKind],
                      help="the chat template around each question ('model': the tokenizer "
                           "directory's own)")
  parser.add_argument("--judge_url", default=None, help="OpenAI-compatible endpoint")
  parser.add_argument("--judge_model", default=None, help="the judge's model name")
  parser.add_argument("--judge_timeout_s", type=float, default=120.0,
                      help="seconds per judge request")
  parser.add_argument("--judge_retries", type=int, default=2,
                      help="retries of a failed judge request (server errors and timeouts)")
  parser.add_argument("--judge_prompt", default=None,
                      help="a template file with positional {} fields, as LongBench-Chat's "
                           "prompt_fs.txt (question, reference, example answer and score pairs, "
                           "answer); default: longctx's own prompt")
  parser.add_argument("--judge_system", default=JUDGE_SYSTEM,
                      help="the judge's system message (default: %(default)r)")
  parser.add_argument("--out", default="longbench_chat_out", help="output directory")


def judge_from_args(args: argparse.Namespace) -> JudgeClient | None:
  if bool(args.judge_url) != bool(args.judge_model):
    raise ValueError("--judge_url and --judge_model go together: give both or neither")
  if not args.judge_url:
    return None
  return JudgeClient(args.judge_url, args.judge_model, args.judge_timeout_s, args.judge_retries,
                     system=args.judge_system, prompt=JudgePrompt.from_file(args.judge_prompt))


def main(args: argparse.Namespace) -> dict:
  tokenizer = common.open_tokenizer(args.tokenizer, args.checkpoint)
  questions = load_questions(args.questions, args.few_shot)
  judge = judge_from_args(args)
  model = common.load_model(args.checkpoint, common.eval_attention(args),
                            args.rope)
  run = common.run_info(args, tokenizer, model)
  report = run_longbench_chat(model, tokenizer, questions, args.out, args.max_length,
                              args.max_new_tokens, TemplateKind(args.template), judge,
                              common.MemoryBudget.from_gib(args.max_memory_gb),
                              run)
  report.update(run)
  common.write_json(os.path.join(args.out, REPORT_FILE), report)
  print(common.format_run(run))
  print(format_report(report))
  print(f"wrote {os.path.join(args.out, REPORT_FILE)}")
  return report
