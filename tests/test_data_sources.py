"""Sources (JSONL, Parquet, ArrayRecord, mixing), over-length policies, config errors."""
import json

import numpy as np
import pytest

from longctx.data import DataConfig, DataError, default_config, find_stats, make_iterator
from longctx.data.config import BadExamplePolicy, OverLengthPolicy, TemplateKind
from longctx.data.examples import ExampleBuilder
from longctx.data.objective import ObjectiveMode
from longctx.data.tokenizers import ByteTokenizer

RECORDS = [{"text": "plain text one"},
           {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
           {"prompt": "p", "response": "r"},
           {"text": "plain text four"}]


def file_config(kind, paths, **overrides):
  cd = default_config()
  cd.source.kind, cd.source.paths = kind, paths
  cd.max_len, cd.window, cd.batch_size, cd.pad_multiple = 64, 4, 2, 16
  for k, v in overrides.items():
    cd[k] = v
  return DataConfig.from_config_dict(cd)


def _write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _sequences(cfg):
  it = make_iterator(cfg)
  batches = list(it)
  return sum(len(np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]))
             for b in batches for r in range(len(b["inputs"]))), find_stats(it)


def test_jsonl_all_three_shapes_and_blank_lines(tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in RECORDS] + [""])
  n, stats = _sequences(file_config("jsonl", path))
  assert n == 4 and stats["kept"] == 4


def test_malformed_jsonl_names_file_and_line(tmp_path):
  lines = [json.dumps(RECORDS[0]), "{oops", json.dumps(RECORDS[1])]
  path = _write_jsonl(tmp_path / "bad.jsonl", lines)
  with pytest.raises(DataError, match=r"bad\.jsonl:2: expected one valid JSON object"):
    list(make_iterator(file_config("jsonl", path)))
  n, stats = _sequences(file_config("jsonl", path, bad_example="skip"))
  assert n == 2 and stats["skipped"] == 1 and stats["examples"] == 3


def test_parquet_and_globs(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  for i in range(2):
    pq.write_table(pa.table({"text": [f"doc {i} {j}" for j in range(3)]}),
                   str(tmp_path / f"part{i}.parquet"))
  n, stats = _sequences(file_config("parquet", str(tmp_path / "part*.parquet")))
  assert n == 6 and stats["kept"] == 6


def test_array_record(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  path = str(tmp_path / "x.array_record")
  w = ArrayRecordWriter(path, "group_size:1")
  for r in RECORDS:
    w.write(json.dumps(r).encode())
  w.close()
  n, _ = _sequences(file_config("array_record", path))
  assert n == 4


def test_mixing_two_sources_with_weights(tmp_path):
  a = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "aaaa"})] * 8)
  b = _write_jsonl(tmp_path / "b.jsonl", [json.dumps({"text": "bbbb"})] * 8)
  cd = default_config()
  cd.source.kind, cd.source.paths, cd.source.weights = "jsonl", f"{a},{b}", "3,1"
  cd.max_len, cd.window, cd.pad_multiple = 64, 4, 16
  toks = np.concatenate([b["inputs"].ravel() for b in make_iterator(
      DataConfig.from_config_dict(cd))])
  n_a, n_b = int((toks == ord("a") + 4).sum()), int((toks == ord("b") + 4).sum())
  assert n_a > n_b > 0


def test_missing_files_are_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="expected files matching"):
    make_iterator(file_config("jsonl", str(tmp_path / "none*.jsonl")))


def _builder(policy):
  return ExampleBuilder(ByteTokenizer(), TemplateKind.PLAIN, 8, policy, BadExamplePolicy.ERROR,
                        ObjectiveMode.TOKEN)


def test_over_length_policies():
  tokens, mask = np.arange(20, dtype=np.int32), np.ones(20, bool)
  with pytest.raises(DataError, match="x:1: expected at most max_len=8 tokens .* found 19"):
    _builder(OverLengthPolicy.ERROR).from_tokens(tokens, mask, "x:1")
  dropped = _builder(OverLengthPolicy.DROP).from_tokens(tokens, mask, "x:1")
  assert dropped["status"] == 2 and len(dropped["inputs"]) == 0
  right = _builder(OverLengthPolicy.TRUNCATE_RIGHT).from_tokens(tokens, mask, "x:1")
  assert list(right["inputs"]) == list(range(8)) and right["status"] == 1
  mid = _builder(OverLengthPolicy.TRUNCATE_MIDDLE).from_tokens(tokens, mask, "x:1")
  assert list(mid["inputs"]) + [mid["targets"][-1]] == [0, 1, 2, 3, 15, 16, 17, 18, 19]


def test_dropped_examples_are_counted_not_silent():
  cd = default_config()
  cd.source.num_examples, cd.source.min_tokens, cd.source.max_tokens = 12, 64, 1024
  cd.max_len, cd.window, cd.over_length = 256, 4, "drop"
  it = make_iterator(DataConfig.from_config_dict(cd))
  list(it)
  stats = find_stats(it)
  assert stats["dropped"] > 0 and stats["dropped"] + stats["kept"] == stats["examples"] == 12


@pytest.mark.parametrize("key,value,match", [
    ("template", "vicuna", "data.template: expected one of 'plain', 'llama2', 'chatml', "
                           "'model', found 'vicuna'"),
    ("objective", "mean", "data.objective: expected one of 'token', 'sequence'"),
    ("max_len", 100, "multiple of pad_multiple=128"),
])
def test_config_errors_list_what_is_allowed(key, value, match):
  cd = default_config()
  cd[key] = value
  with pytest.raises(ValueError, match=match):
    DataConfig.from_config_dict(cd)


def test_jsonl_index_handles_whitespace_lines_and_no_trailing_newline(tmp_path):
  from longctx.data.sources import JsonlSource
  path = tmp_path / "w.jsonl"
  path.write_bytes(b'{"text": "a"}\n   \n\n  {"text": "b"}\n{"text": "c"}')
  src = JsonlSource(str(path))
  assert len(src) == 3 and src.blank_lines == 2
  assert [src[i][0].rsplit(":", 1)[1] for i in range(3)] == ["1", "4", "5"]
  assert json.loads(src[2][1]) == {"text": "c"} and json.loads(src[1][1]) == {"text": "b"}
