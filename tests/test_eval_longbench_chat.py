"""LongBench-Chat harness: middle truncation, the judge client against a loopback stub server,
an unreachable judge keeping the generations, resuming."""
import contextlib
import http.server
import json
import socket
import threading

import numpy as np
import pytest

from longctx.data.config import TemplateKind
from longctx.data.tokenizers import ByteTokenizer
from longctx.eval import judge as judge_lib
from longctx.eval import longbench_chat as lbc
from longctx.eval.__main__ import main as cli
from longctx.eval.testing import TINY_CONFIG, make_tiny_checkpoint

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "eval_tiny_checkpoint")


@contextlib.contextmanager
def stub_judge(reply="The answer matches the reference. Rating: [[7]]", status=200):
  """An OpenAI-style /v1/chat/completions on 127.0.0.1; records request bodies; stops itself."""
  requests = []

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      requests.append((self.path, body))
      payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.end_headers()
      self.wfile.write(payload.encode())

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  stopper = threading.Timer(60, server.shutdown)  # bounded even if a test hangs
  stopper.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
  finally:
    stopper.cancel()
    server.shutdown()
    server.server_close()
    thread.join(5)


def closed_port_url():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}"


def write_questions(path, n=2):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"id": f"q{i}", "context": "A long report. " * 20,
                          "query": f"Question {i}: what is it about?", "answer": f"reference {i}",
                          "few_shot": [{"answer": "a poor answer", "score": 2,
                                        "explanation": "misses the point"}]}) + "\n")
  return str(path)


def test_middle_truncation_and_prompt():
  ids = np.arange(10)
  assert lbc.middle_truncate(ids, 5).tolist() == [0, 1, 7, 8, 9]
  assert lbc.middle_truncate(ids, 10).tolist() == list(range(10))
  q = lbc.Question("x", "Q?", "C" * 100 + "\n\nQ?")
  ids, truncated = lbc.encode_prompt(TOK, q, TemplateKind.LLAMA2, 40)
  assert len(ids) == 40 and truncated and ids[0] == TOK.bos_id
  text = TOK.decode(ids)
  assert text.startswith("[INST] CCC") and text.endswith("Q? [/INST]")


def test_judge_prompt_and_parsing():
  prompt = judge_lib.judge_prompt("Q", "REF", "ANS", [judge_lib.FewShot("EX", 3, "why")])
  assert prompt.index("REF") < prompt.index("EX") < prompt.index("ANS")
  assert "[[3]]" in prompt and "[[5]]" in prompt
  assert judge_lib.parse_score("ok [[4]] then Rating: [[8]]") == 8
  assert judge_lib.parse_score("Rating: [[ 6.5 ]]") == 6.5
  assert judge_lib.parse_score("no rating") is None
  assert judge_lib.parse_score("[[11]]") is None
  assert judge_lib.parse_score("Rating: [[Score: 7/10]]") == 7
  assert judge_lib.completions_url("http://h:1") == "http://h:1/v1/chat/completions"
  assert judge_lib.completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
  assert judge_lib.completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_judge_client_against_stub():
  with stub_judge() as (url, requests):
    client = judge_lib.JudgeClient(url, "judge-model", timeout_s=5, retries=0)
    assert client.complete("hello") .endswith("[[7]]")
  path, body = requests[0]
  assert path == "/v1/chat/completions"
  assert body["model"] == "judge-model" and body["temperature"] == 0
  assert [m["role"] for m in body["messages"]] == ["system", "user"]
  assert body["messages"][1]["content"] == "hello"
  with stub_judge(status=500) as (url, requests):
    client = judge_lib.JudgeClient(url, "m", timeout_s=5, retries=1, backoff_s=0.01)
    with pytest.raises(judge_lib.JudgeError, match="HTTP 500"):
      client.complete("x")
    assert len(requests) == 2


def test_command_with_judge_unreachable_then_resumed(tiny_checkpoint, tmp_path, capsys):
  questions = write_questions(tmp_path / "q.jsonl")
  out = tmp_path / "out"
  args = ["longbench-chat", f"--checkpoint={tiny_checkpoint}", f"--questions={questions}",
          "--max_length=96", "--max_new_tokens=4", "--judge_model=m", "--judge_retries=0",
          "--judge_timeout_s=5", f"--out={out}"]
  assert cli(args + [f"--judge_url={closed_port_url()}"]) == 2
  err = capsys.readouterr().err
  assert "judge endpoint" in err and "kept in" in err
  kept = (out / lbc.GENERATIONS_FILE).read_text().splitlines()
  assert len(kept) == 1  # the first answer was generated before the judge failed
  with stub_judge() as (url, requests):
    assert cli(args + [f"--judge_url={url}"]) == 0
  lines = (out / lbc.GENERATIONS_FILE).read_text().splitlines()
  assert lines[0] == kept[0] and len(lines) == 2  # resumed: the first was not redone
  report = json.loads((out / lbc.REPORT_FILE).read_text())
  assert report["scored"] == 2 and report["mean_score"] == 7.0
  prompt = requests[0][1]["messages"][-1]["content"]
  assert "reference 0" in prompt and "a poor answer" in prompt and "Question 0" in prompt
  assert json.loads(lines[0])["generation"] in prompt


def test_command_without_judge(tiny_checkpoint, tmp_path, capsys):
  questions = write_questions(tmp_path / "q.jsonl")
  out = tmp_path / "out"
  assert cli(["longbench-chat", f"--checkpoint={tiny_checkpoint}", f"--questions={questions}",
              "--max_length=64", "--max_new_tokens=3", f"--out={out}"]) == 0
  assert "none scored" in capsys.readouterr().out
  report = json.loads((out / lbc.REPORT_FILE).read_text())
  assert report["scored"] == 0 and "none scored" in report["note"]
  gens = [json.loads(l) for l in (out / lbc.GENERATIONS_FILE).read_text().splitlines()]
  assert [g["id"] for g in gens] == ["q0", "q1"] and all(g["truncated"] for g in gens)
  assert all(g["prompt_tokens"] == 64 for g in gens)
  assert cli(["longbench-chat", f"--checkpoint={tiny_checkpoint}",
              f"--questions={tmp_path}/none.jsonl", f"--out={out}"]) == 2


def test_longbench_chat_file_format(tmp_path):
  """LongBench-Chat's own test cases: `prompt`, `query`, `answer`, `idx`; few_shots.json is a
  list of per-question lists indexed by idx − 1."""
  questions = tmp_path / "cases.jsonl"
  questions.write_text("".join(json.dumps({"idx": i, "prompt": f"doc {i} then question",
                                           "query": f"question {i}", "answer": f"ref {i}"}) + "\n"
                               for i in (2, 1)))
  few = tmp_path / "few_shots.json"
  few.write_text(json.dumps([[{"answer": "one", "score": 1}], [{"answer": "two", "score": 9}]]))
  qs = lbc.load_questions(str(questions), str(few))
  assert [q.id for q in qs] == ["2", "1"]
  assert qs[0].prompt == "doc 2 then question" and qs[0].query == "question 2"
  assert qs[0].few_shot == (judge_lib.FewShot("two", 9.0),)
  assert qs[1].few_shot == (judge_lib.FewShot("one", 1.0),)
  few.write_text(json.dumps([[{"answer": "one", "score": 1}]]))
  with pytest.raises(ValueError, match="cases.jsonl:1: --few_shot has 1 per-question lists"):
    lbc.load_questions(str(questions), str(few))
  questions.write_text(json.dumps({"prompt": "no query"}) + "\n")
  with pytest.raises(ValueError, match="cases.jsonl:1: expected a string field 'query'"):
    lbc.load_questions(str(questions))


class Echo:
  """Answers every prompt with the same tokens (no model needed)."""
  config = TINY_CONFIG

  def generate(self, prompts, max_new_tokens, temperature, eos_token_id):
    return [TOK.encode(" it is about rivers").tolist()[:max_new_tokens] for _ in prompts]


def test_judge_asked_again_without_score_and_runs_not_mixed(tmp_path):
  questions = lbc.load_questions(write_questions(tmp_path / "q.jsonl", n=1))
  out = str(tmp_path / "out")
  with stub_judge(reply="I cannot decide.") as (url, requests):
    client = judge_lib.JudgeClient(url, "m", timeout_s=5, retries=0)
    report = lbc.run_longbench_chat(Echo(), TOK, questions, out, 256, 8, judge=client)
  assert len(requests) == lbc.SCORE_ATTEMPTS
  assert report["scored"] == 0 and report["unparsed"] == 1 and report["mean_score"] is None
  with pytest.raises(ValueError, match="different run"):
    lbc.run_longbench_chat(Echo(), TOK, questions, out, 128, 8)
  unreferenced = [lbc.Question("a", "q", "q")]
  with pytest.raises(ValueError, match="reference 'answer'"):
    lbc.run_longbench_chat(Echo(), TOK, unreferenced, str(tmp_path / "o2"), 256, 8, judge=client)


# The published schema (LongAlign's LongBench_Chat/): test_cases.json is a JSON array of
# {idx, query, prompt, answer}; few_shots.json a list per question of {answer, score}; the judge
# template prompt_fs.txt has positional fields filled by str.format(question, answer,
# example answer 1, score 1, ..., prediction). These are stand-ins of that shape, made here.
PUBLISHED_TEMPLATE = """[Instruction] Rate the answer from 1 to 10 as "Rating: [[5]]".
{{"format": "a literal brace pair survives"}}
[Question] {}
[Reference] {}
[Example 1] {} Rating: [[{}]]
[Example 2] {} Rating: [[{}]]
[Answer to rate] {}"""


def _published_files(tmp_path):
  cases = [{"idx": i, "query": f"question {i}", "prompt": "A long report. " * 20 + f"question {i}",
            "answer": f"ref {i}"} for i in (1, 2)]
  (tmp_path / "test_cases.json").write_text(json.dumps(cases, indent=2))
  few = [[{"answer": f"poor {i}", "score": 2}, {"answer": f"good {i}", "score": 9}]
         for i in (1, 2)]
  (tmp_path / "few_shots.json").write_text(json.dumps(few))
  (tmp_path / "prompt_fs.txt").write_text(PUBLISHED_TEMPLATE)
  return tmp_path / "test_cases.json", tmp_path / "few_shots.json", tmp_path / "prompt_fs.txt"


def test_the_published_files_and_judge_template_through_the_command(tiny_checkpoint, tmp_path):
  cases, few, template = _published_files(tmp_path)
  system = "You're a judge of texts."
  with stub_judge() as (url, requests):
    assert cli(["longbench-chat", f"--checkpoint={tiny_checkpoint}", f"--questions={cases}",
                f"--few_shot={few}", f"--judge_prompt={template}", f"--judge_system={system}",
                "--max_length=96", "--max_new_tokens=4", f"--judge_url={url}",
                "--judge_model=m", f"--out={tmp_path / 'out'}"]) == 0
  gens = [json.loads(line)["generation"]
          for line in (tmp_path / "out" / lbc.GENERATIONS_FILE).read_text().splitlines()]
  for i, (_, body) in enumerate(requests):
    assert body["messages"][0]["content"] == system
    assert body["messages"][1]["content"] == PUBLISHED_TEMPLATE.format(
        f"question {i + 1}", f"ref {i + 1}", f"poor {i + 1}", 2, f"good {i + 1}", 9, gens[i])
  report = json.loads((tmp_path / "out" / lbc.REPORT_FILE).read_text())
  assert report["judge_prompt"] == str(template) and report["judge_system"] == system
  assert report["scored"] == 2 and report["tokenizer"] == "byte"
  with stub_judge() as (url, _):  # another judge prompt never reuses these judgments
    assert cli(["longbench-chat", f"--checkpoint={tiny_checkpoint}", f"--questions={cases}",
                f"--few_shot={few}", "--max_length=96", "--max_new_tokens=4",
                f"--judge_url={url}", "--judge_model=m", f"--out={tmp_path / 'out'}"]) == 2


def test_question_and_template_files_are_checked_by_content(tmp_path):
  cases, few, template = _published_files(tmp_path)
  assert [q.id for q in lbc.load_questions(str(cases), str(few))] == ["1", "2"]
  (tmp_path / "bad.json").write_text('[{"idx": 1, "query": "q"}, 3]')
  with pytest.raises(ValueError, match=r"bad.json\[1\]: expected a question object, found int"):
    lbc.load_questions(str(tmp_path / "bad.json"))
  (tmp_path / "bad.json").write_text("query,answer\nq,a\n")
  with pytest.raises(ValueError, match="bad.json: expected JSONL .* or a JSON array"):
    lbc.load_questions(str(tmp_path / "bad.json"))
  (tmp_path / "bad.json").write_text('[{"query": "q"},')
  with pytest.raises(ValueError, match="bad.json: starts as a JSON array but is not valid JSON"):
    lbc.load_questions(str(tmp_path / "bad.json"))
  prompt = judge_lib.JudgePrompt.from_file(str(template))
  with pytest.raises(ValueError, match="fields for 2 few-shot example.*the question has 1"):
    prompt.render("q", "r", "a", [judge_lib.FewShot("x", 3)])
  for text, match in [("{} {} {} {}", r"3 \+ 2·k positional \{\} fields .* found 4"),
                      ("{question} {} {}", r"only positional \{\} fields, found \['question'\]"),
                      ("{} { {}", "not a str.format template")]:
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
      judge_lib.JudgePrompt.from_file(str(tmp_path / "t.txt"))
