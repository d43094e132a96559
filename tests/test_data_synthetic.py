"""Synthetic long-context generators: passkey, multi-needle, LongAlign-like conversations."""
import numpy as np

from longctx.data.chat import to_document
from longctx.data.config import SyntheticKind, TemplateKind
from longctx.data.synthetic import (PASSKEY_FILLER, SyntheticSource, longalign_conversation,
                                    multi_needle, passkey)


def test_passkey_document_follows_the_longlora_protocol():
  ex = passkey(np.random.default_rng(0), 4000, depth=0.5)
  assert 1 <= ex.passkey <= 50000 and ex.answer == f" {ex.passkey}."
  line = f"The pass key is {ex.passkey}. Remember it. {ex.passkey} is the pass key."
  assert ex.prompt.count(line) == 1 and PASSKEY_FILLER in ex.prompt
  assert ex.prompt.endswith("What is the pass key? The pass key is")
  assert abs(len(ex.prompt) - 4000) < 2 * len(PASSKEY_FILLER)
  assert 0.4 < ex.prompt.index(line) / len(ex.prompt) < 0.6


def test_multi_needle_inserts_every_needle_at_sentence_boundaries():
  ex = multi_needle(np.random.default_rng(1), 6000, n_needles=4, depths=(0.1, 0.4, 0.6, 0.9))
  for key, value in ex.needles:
    sentence = f"The magic number of {key} is {value}. "
    i = ex.prompt.index(sentence)
    assert i == 0 or ex.prompt[i - 2:i] == ". "
  assert ex.asked in ex.prompt.split("\n")[-1]
  assert ex.answer == f" {dict(ex.needles)[ex.asked]}."


def test_longalign_mix_spans_1k_to_64k_and_is_deterministic():
  lengths = []
  for i in range(40):
    conv = longalign_conversation(0, i)
    doc = to_document(conv, f"s:{i}")
    assert doc.turns[-1].role == "assistant"
    lengths.append(sum(len(t.content) for t in doc.turns))
  assert min(lengths) >= 900 and max(lengths) <= 65536
  assert max(lengths) > 16000 and min(lengths) < 4000
  assert longalign_conversation(0, 3) == longalign_conversation(0, 3)
  assert longalign_conversation(0, 3) != longalign_conversation(1, 3)


def test_synthetic_sources_are_random_access_records():
  for kind in SyntheticKind:
    src = SyntheticSource(kind, 5, 0, 512, 2048)
    assert len(src) == 5
    origin, record = src[2]
    assert origin == f"synthetic-{kind.value}:2" and src[2] == (origin, record)
    to_document(record, origin)


def test_passkey_text_is_the_passkey_document_as_plain_text():
  from longctx.data.chat import tokenize_document
  from longctx.data.tokenizers import ByteTokenizer
  src = SyntheticSource(SyntheticKind.PASSKEY_TEXT, 3, 0, 300, 900)
  pair = SyntheticSource(SyntheticKind.PASSKEY, 3, 0, 300, 900)
  origin, record = src[1]
  _, qa = pair[1]
  assert record == {"text": qa["prompt"] + qa["response"]}  # same document, no separator
  tok = ByteTokenizer()
  ids, mask = tokenize_document(to_document(record, origin), TemplateKind.PLAIN, tok)
  assert tok.decode(ids[1:-1]) == record["text"] and ids[-1] == tok.eos_id
  assert not mask[0] and mask[1:].all()  # every token after BOS is a target
