"""Tokenizers (byte, HF tokenizer.json, sentencepiece built here) and chat-template target masks."""
import numpy as np
import pytest

from longctx.data import ByteTokenizer, DataError, TemplateKind, TokenizerKind, make_tokenizer
from longctx.data.chat import to_document, tokenize_document
from longctx.data.tokenizers import train_bpe_tokenizer

TEXT = ("the quick brown fox jumps over the lazy dog. long context models read many tokens.\n"
        "[INST] question [/INST] answer. <|im_start|>user hello<|im_end|>\n") * 20


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
  return train_bpe_tokenizer([TEXT], tmp_path_factory.mktemp("bpe") / "tokenizer.json", 400)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  import sentencepiece as spm
  d = tmp_path_factory.mktemp("spm")
  (d / "corpus.txt").write_text(TEXT)
  spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "m"),
                                 vocab_size=60, model_type="bpe", bos_id=1, eos_id=2,
                                 pad_id=0, unk_id=3, minloglevel=2)
  return str(d / "m.model")


def test_byte_tokenizer_round_trip_without_a_file():
  tok = make_tokenizer(TokenizerKind.BYTE)
  ids = tok.encode("héllo ✓")
  assert ids.dtype == np.int32 and ids.min() >= 4 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == "héllo ✓"


@pytest.mark.parametrize("kind", [TokenizerKind.HF, TokenizerKind.SENTENCEPIECE])
def test_file_tokenizers_round_trip_and_special_ids(kind, bpe_path, spm_path):
  tok = make_tokenizer(kind, bpe_path if kind is TokenizerKind.HF else spm_path)
  ids = tok.encode("the lazy dog reads tokens")
  assert ids.dtype == np.int32 and len(ids) > 0
  assert tok.decode(ids).strip() == "the lazy dog reads tokens"
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  import pickle
  assert np.array_equal(pickle.loads(pickle.dumps(tok)).encode("dog"), tok.encode("dog"))


def test_hf_special_tokens_come_from_the_directory_before_names(tmp_path, bpe_path):
  import json
  import shutil
  shutil.copy(bpe_path, tmp_path / "tokenizer.json")
  path = str(tmp_path / "tokenizer.json")
  assert (make_tokenizer(TokenizerKind.HF, path).bos_id, "by name") == (1, "by name")
  # config.json ids win over the names; tokenizer_config.json's tokens win over config.json.
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 3, "eos_token_id": [0, 2]}))
  tok = make_tokenizer(TokenizerKind.HF, path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 0, 0) and "config.json" in tok.specials["bos"]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "</s>"}, "eos_token": "<s>", "pad_token": None}))
  tok = make_tokenizer(TokenizerKind.HF, path)
  assert (tok.bos_id, tok.eos_id) == (2, 1)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
  with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not"):
    make_tokenizer(TokenizerKind.HF, path)


def test_model_template_needs_an_incremental_template(tmp_path, bpe_path):
  import shutil

  from longctx.data.config import TemplateKind
  shutil.copy(bpe_path, tmp_path / "tokenizer.json")
  doc = to_document(CONV, "t:1")
  with pytest.raises(ValueError, match="has no chat template beside it"):
    tokenize_document(doc, TemplateKind.MODEL, make_tokenizer(TokenizerKind.HF,
                                                              str(tmp_path / "tokenizer.json")))
  # A template that writes the turn count first renders no prefix as a prefix of the whole.
  (tmp_path / "chat_template.jinja").write_text(
      "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
  tok = make_tokenizer(TokenizerKind.HF, str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="does not render .* as a continuation"):
    tokenize_document(doc, TemplateKind.MODEL, tok)
  (tmp_path / "chat_template.jinja").write_text(
      "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}")
  tok = make_tokenizer(TokenizerKind.HF, str(tmp_path / "tokenizer.json"))
  ids, mask = tokenize_document(doc, TemplateKind.MODEL, tok)
  assert tok.decode(ids[mask]) == "A1</s>A2</s>"


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="expected a local file"):
    make_tokenizer(TokenizerKind.HF, str(tmp_path / "nope.json"))


CONV = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}


def _targets(template):
  tok = ByteTokenizer()
  ids, mask = tokenize_document(to_document(CONV, "t:1"), template, tok)
  return tok, ids, mask


def test_llama2_template_only_answers_and_eos_carry_loss():
  tok, ids, mask = _targets(TemplateKind.LLAMA2)
  assert ids[0] == tok.bos_id and not mask[0]
  text = tok.decode(ids)
  assert text == ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ1 [/INST] A1 "
                  "[INST] Q2 [/INST] A2 ")
  assert tok.decode(ids[mask]) == " A1  A2 "
  assert list(ids[mask]).count(tok.eos_id) == 2 and list(ids).count(tok.bos_id) == 2


def test_chatml_template_masks_assistant_content_and_end_of_turn():
  tok, ids, mask = _targets(TemplateKind.CHATML)
  assert tok.decode(ids[mask]) == "A1<|im_end|>A2<|im_end|>"
  assert "<|im_start|>assistant\n" in tok.decode(ids) and ids[-1] == tok.eos_id and mask[-1]


def test_plain_text_documents_train_on_every_token_after_bos():
  tok = ByteTokenizer()
  ids, mask = tokenize_document(to_document({"text": "abc"}, "t:1"), TemplateKind.LLAMA2, tok)
  assert list(ids) == [1, 101, 102, 103, 2] and list(mask) == [False, True, True, True, True]


def test_prompt_response_pairs_become_one_turn():
  tok = ByteTokenizer()
  ids, mask = tokenize_document(to_document({"prompt": "hi", "response": "yo"}, "t:1"),
                                TemplateKind.PLAIN, tok)
  assert tok.decode(ids[mask]) == "yo"


@pytest.mark.parametrize("record,match", [
    ({"messages": []}, "non-empty list in 'messages'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "at least one assistant turn"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "role in"),
    ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
    ({"title": "x"}, "keys 'text', 'messages' or 'prompt'\\+'response', found keys \\['title'\\]"),
    ({"text": 3}, "field 'text' to be a string, found int"),
    (b"{not json", "one valid JSON object"),
])
def test_bad_records_name_expected_found_and_where(record, match):
  with pytest.raises(DataError, match=match) as e:
    to_document(record, "data.jsonl:7")
  assert str(e.value).startswith("data.jsonl:7: expected")


def test_pipeline_with_bpe_and_chatml_trains_only_on_answers(bpe_path):
  from longctx.data import DataConfig, default_config, make_iterator
  cd = default_config()
  cd.tokenizer, cd.tokenizer_path, cd.template = "hf", bpe_path, "chatml"
  cd.source.num_examples, cd.source.min_tokens, cd.source.max_tokens = 4, 200, 400
  cd.max_len, cd.window, cd.pad_multiple = 1024, 4, 64
  tok = make_tokenizer(TokenizerKind.HF, bpe_path)
  batches = list(make_iterator(DataConfig.from_config_dict(cd)))
  targets = np.concatenate([b["targets"][b["loss_weights"] > 0] for b in batches])
  inputs = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  assert "<|im_end|>" in tok.decode(targets) and "Question: summarize" not in tok.decode(targets)
  assert "Question: summarize" in tok.decode(inputs)
  assert (targets == tok.eos_id).sum() == 4


def test_bpe_split_digits_gives_one_token_per_digit(tmp_path):
  text = "The pass key is 68281. Remember it. 68281 is the pass key. 1234 5678 " * 50
  merged = make_tokenizer(TokenizerKind.HF, train_bpe_tokenizer([text], tmp_path / "a.json", 300))
  split = make_tokenizer(TokenizerKind.HF, train_bpe_tokenizer([text], tmp_path / "b.json", 300,
                                                               split_digits=True))
  assert len(merged.encode(" 68281")) < 6            # digits merged into pieces
  ids = split.encode(" 68281.")
  assert [split.decode([i]) for i in ids] == [" ", "6", "8", "2", "8", "1", "."]
  assert split.decode(split.encode(text)) == text
