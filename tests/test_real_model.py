"""SmolLM2-135M-Instruct (a real pre-trained model, tests/real_model.py) against transformers.

Real English text, the model's own tokenizer and chat template. Short inputs and one shared
conversion keep this file to about a minute.
"""
import json
import os

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import longctx
from longctx import convert
from longctx.checkpoint.params import load_params, save_params
from longctx.data.tokenizers import HFTokenizer
from longctx.eval import __main__ as eval_main
from longctx.model import lora
from longctx.model.lora_params import add_lora_params
from tests.real_model import real_text

# End to end (subprocesses, real model or full training runs): the quick loop skips it.
pytestmark = pytest.mark.slow

LOGIT_TOL = 5e-4     # float32 both sides, 30 layers, logits up to ~41
NLL_RTOL = 2e-5      # the bound for perplexity on the same windows


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
  return transformers.LlamaForCausalLM.from_pretrained(smollm2_dir).float().eval()


@pytest.fixture(scope="module")
def ours(smollm2_dir):
  return longctx.load_pretrained(smollm2_dir, progress=False)


def _torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def test_special_tokens_and_encoding_come_from_the_hf_directory(smollm2_dir):
  reference = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  tok = HFTokenizer(f"{smollm2_dir}/tokenizer.json")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
      reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (1, 2, 2)
  assert "tokenizer_config.json" in tok.specials["bos"]
  text = real_text(2000)
  assert tok.encode(text).tolist() == reference(text, add_special_tokens=False).input_ids
  assert tok.decode(tok.encode(text)) == text


def test_logits_equal_transformers_on_real_text(smollm2_dir, hf_model, ours):
  tok = HFTokenizer(f"{smollm2_dir}/tokenizer.json")
  tokens = np.concatenate([[tok.bos_id], tok.encode(real_text(3000))])[:256][None]
  got, want = np.asarray(ours(tokens)), _torch_logits(hf_model, tokens)
  assert np.abs(want).max() > 10  # real logits, not a random model's
  assert np.abs(got - want).max() < LOGIT_TOL
  assert (got.argmax(-1) == want.argmax(-1)).all()


def test_greedy_chatml_generation_is_token_for_token_equal(smollm2_dir, hf_model, ours):
  reference = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  messages = [{"role": "user", "content": "Name three primary colours, separated by commas."}]
  prompt = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
  eos = HFTokenizer(f"{smollm2_dir}/tokenizer.json").eos_id
  with torch.no_grad():
    out = hf_model.generate(torch.as_tensor([prompt]), do_sample=False, max_new_tokens=24,
                            eos_token_id=eos, pad_token_id=eos)
  want = out[0, len(prompt):].tolist()
  got = ours.generate([prompt], max_new_tokens=24, eos_token_id=eos)[0]
  assert got == want, (reference.decode(got), reference.decode(want))
  assert len(want) > 4


@pytest.mark.parametrize("flags", [[], ["--attention=context_parallel", "--seq=4"],
                                   ["--rope=yarn,factor=2"]], ids=["tiled", "ring", "yarn"])
def test_the_perplexity_command_equals_transformers_nll(smollm2_dir, hf_model, tmp_path, flags,
                                                        capsys):
  """Without --tokenizer (as a newcomer types it) the model directory's tokenizer is taken, said
  and recorded; the other cases name it."""
  text = real_text(4000, offset=10_000)
  (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
  out = tmp_path / "ppl.json"
  tokenizer = ["--tokenizer", f"{smollm2_dir}/tokenizer.json"] if flags else []
  assert eval_main.main(["perplexity", "--checkpoint", smollm2_dir, *tokenizer, "--data",
                         str(tmp_path / "doc.txt"), "--lengths", "256", "--stride", "256",
                         "--max_windows", "2", "--out", str(out), *flags]) == 0
  full = json.loads(out.read_text())
  report = full["results"][0]
  path = os.path.abspath(f"{smollm2_dir}/tokenizer.json")
  assert (full["tokenizer"], full["checkpoint"]) == (path, os.path.abspath(smollm2_dir))
  assert full["attention"] == ("ring" if "--seq=4" in flags else "tiled")
  assert full["model_rope"]["rope_type"] == ("yarn" if "--rope=yarn,factor=2" in flags
                                             else "default")
  printed = capsys.readouterr()
  assert f"tokenizer  {path}" in printed.out
  assert (f"tokenizer: {smollm2_dir}/tokenizer.json (the checkpoint directory's" in printed.err
          ) == (not flags)
  if flags and flags[0].startswith("--rope"):  # the oracle: transformers' own YaRN
    config = transformers.AutoConfig.from_pretrained(smollm2_dir)
    config.rope_parameters = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 100000.0,
                              "original_max_position_embeddings": 8192}
    hf_model = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, config=config).eval()
  reference = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  ids = [reference.bos_token_id] + reference(text, add_special_tokens=False).input_ids
  losses = []
  for start in (0, 256):  # the command's windows: stride 256, 257 tokens each
    losses.append(_window_nll(hf_model, torch.as_tensor([ids[start:start + 257]])))
  assert report["windows"] == 2
  np.testing.assert_allclose(report["window_losses"], losses, rtol=NLL_RTOL)


def test_the_byte_tokenizer_on_a_subword_model_is_refused_with_the_fix(smollm2_dir, tmp_path,
                                                                       capsys):
  (tmp_path / "doc.txt").write_text(real_text(2000), encoding="utf-8")
  assert eval_main.main(["perplexity", "--checkpoint", smollm2_dir, "--tokenizer=byte",
                         "--data", str(tmp_path / "doc.txt"), "--lengths", "256",
                         "--out", str(tmp_path / "ppl.json")]) == 2
  err = capsys.readouterr().err
  assert "the byte tokenizer (260 ids) on a model whose vocabulary has 49152 ids" in err
  assert "pass --tokenizer=PATH/tokenizer.json" in err
  assert not (tmp_path / "ppl.json").exists()


def _window_nll(model, window) -> float:
  with torch.no_grad():
    logits = model(window[:, :-1]).logits.double()
  return float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:]))


def test_lora_peft_export_loads_onto_the_real_base(smollm2_dir, tmp_path):
  assert convert.main(["from-hf", smollm2_dir, str(tmp_path / "base"), "--no_progress"]) == 0
  cfg, base = load_params(str(tmp_path / "base"))
  lcfg = lora.with_lora(cfg, 4, 8.0, ("q_proj", "v_proj"))
  params = add_lora_params(base, lcfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)  # a trained adapter: B ≠ 0
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.asarray(x) + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)
      if "lora_b" in jax.tree_util.keystr(path) else np.asarray(x), params)
  save_params(str(tmp_path / "ckpt"), params, lcfg)
  assert convert.main(["to-peft", str(tmp_path / "ckpt"), str(tmp_path / "adapter"),
                       "--modules_to_save", "", "--no_progress"]) == 0
  tok = HFTokenizer(f"{smollm2_dir}/tokenizer.json")
  tokens = np.concatenate([[tok.bos_id], tok.encode(real_text(800))])[:48][None]
  got = np.asarray(longctx.load_pretrained(str(tmp_path / "ckpt"), progress=False)(tokens))
  model = peft.PeftModel.from_pretrained(
      transformers.LlamaForCausalLM.from_pretrained(smollm2_dir), str(tmp_path / "adapter"))
  want = _torch_logits(model.float().eval(), tokens)
  assert np.abs(got - want).max() < LOGIT_TOL
  assert np.abs(got - _torch_logits(
      transformers.LlamaForCausalLM.from_pretrained(smollm2_dir).eval(), tokens)).max() > 1e-2


def test_from_gguf_errors_name_the_path(tmp_path, smollm2_dir):
  with pytest.raises(FileNotFoundError, match="GGUF file"):
    convert.main(["from-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "out")])
  from tests.real_model import gguf_path
  with pytest.raises(FileExistsError, match="expected a new path"):
    convert.main(["from-gguf", gguf_path(), smollm2_dir])


def test_the_export_is_a_complete_hf_model(smollm2_dir, tmp_path):
  """from-hf then to-hf keeps the tokenizer, the chat template and the generation defaults."""
  assert convert.main(["from-hf", smollm2_dir, str(tmp_path / "ckpt"), "--no_progress"]) == 0
  assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--no_progress"]) == 0
  messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
  source, exported = (transformers.AutoTokenizer.from_pretrained(d)
                      for d in (smollm2_dir, tmp_path / "hf"))
  assert (exported.apply_chat_template(messages, tokenize=False)
          == source.apply_chat_template(messages, tokenize=False))
  assert exported(real_text(500)).input_ids == source(real_text(500)).input_ids
  generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
  assert generation.eos_token_id == transformers.GenerationConfig.from_pretrained(
      smollm2_dir).eos_token_id


def test_finetuning_smollm2_needs_no_retyped_architecture(smollm2_dir, tmp_path):
  from longctx.attention.shifted_sparse import s2_head_split
  from longctx.train.checks import check_stage
  from longctx.train.config import InitKind, read_stages
  from tests.hf_models import finetune_config
  (stage,) = read_stages(finetune_config(smollm2_dir))
  m = stage.model
  assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.vocab_size) == (
      30, 576, 9, 3, 49152)
  assert (m.rope.theta, m.tie_word_embeddings, m.bos_token_id, m.eos_token_id) == (
      100000.0, True, 1, 2)
  assert stage.data.tokenizer_path == f"{smollm2_dir}/tokenizer.json"
  # LoRA turns S²-Attn on by default: 9 / 3 heads split by kv group, 6 plain and 3 shifted.
  (lora_stage,) = read_stages(finetune_config(smollm2_dir, {"lora.enabled": True}))
  assert lora_stage.attention.s2_group == lora_stage.data.max_len // 4
  assert s2_head_split(m.num_heads, m.num_kv_heads) == (6, 2)
  check_stage(lora_stage, jax.make_mesh((2, 1, 4, 1), ("data", "fsdp", "seq", "tensor")),
              first=True, init_kind=InitKind.HF, init_path=smollm2_dir)


def test_passkey_prompts_never_pass_their_length(smollm2_dir):
  """With a subword tokenizer the "8192" prompts used to be 8201 tokens, past the context."""
  from longctx.eval.passkey import passkey_examples
  tok = HFTokenizer(f"{smollm2_dir}/tokenizer.json")
  for length in (1000, 8192):
    sizes = [len(tok.encode(ex.prompt)) + 1 for ex in passkey_examples(tok, length, 3, seed=0)]
    assert all(length - 24 <= n <= length for n in sizes), (length, sizes)


def test_sft_rows_use_the_models_own_chat_template(smollm2_dir):
  """data.template='model': the tokens are apply_chat_template's; only answers are targets."""
  from longctx.data.chat import to_document, tokenize_document
  from longctx.data.config import TemplateKind
  messages = [{"role": "user", "content": "What is RoPE?"},
              {"role": "assistant", "content": "Rotary position embeddings."},
              {"role": "user", "content": "And ABF?"},
              {"role": "assistant", "content": "A larger RoPE base frequency."}]
  tok = HFTokenizer(f"{smollm2_dir}/tokenizer.json")
  ids, mask = tokenize_document(to_document({"messages": messages}, "t:1"), TemplateKind.MODEL,
                                tok)
  want = transformers.AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(
      messages, tokenize=True)
  want = list(want["input_ids"] if hasattr(want, "keys") else want)
  assert ids.tolist() == want and ids[0] == tok.bos_id and not mask[0]
  assert tok.decode(ids[mask]) == ("Rotary position embeddings.<|im_end|>\n"
                                   "A larger RoPE base frequency.<|im_end|>\n")


def test_longbench_chat_prompts_use_the_models_own_template(smollm2_dir):
  from longctx.data.config import TemplateKind
  from longctx.eval.longbench_chat import Question, encode_prompt
  tok = HFTokenizer(f"{smollm2_dir}/tokenizer.json")
  question = Question(id="q", query="Summarize.", prompt="A long text. Summarize.", reference="")
  ids, truncated = encode_prompt(tok, question, TemplateKind.MODEL, 4096)
  want = transformers.AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(
      [{"role": "user", "content": question.prompt}], add_generation_prompt=True, tokenize=True)
  assert ids == list(want["input_ids"] if hasattr(want, "keys") else want) and not truncated


def test_the_baselines_bench_runs(smollm2_dir, tmp_path):
  from tests.bench_scripts import run_bench
  done = run_bench("smollm2_baselines.py", "--model", smollm2_dir, "--lengths", "128",
                   "--scalings", "default,yarn", "--out", str(tmp_path / "b.json"))
  report = json.loads((tmp_path / "b.json").read_text())
  assert [r["scaling"] for r in report["results"]] == ["default", "yarn"]
  assert "| default |" in done.stdout


def test_the_extension_configs_data_reads_with_the_real_tokenizer(smollm2_dir, tmp_path):
  """configs/smollm2_135m_extend.py: the data script's files go through each stage's pipeline;
  the SFT answer (a docstring) is, line by line, in its own prompt, and only it (and the end of
  turn) is a target; S²-Attn + LoRA is accepted on the 9 / 3 heads; the YaRN stage reads the
  documentation prose (held-out text not in it)."""
  import os

  from longctx.data.pipeline import iterate_batches
  from longctx.train.config import read_stages
  from tests.bench_scripts import ROOT, run_bench
  from tests.helpers import config_module as _module
  run_bench("smollm2_extend_data.py", "--out", str(tmp_path), "--per_module", "1")
  sft = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
  assert len(sft) > 50 and all(line.strip() in c["messages"][0]["content"]
                               for c in sft for line in c["messages"][1]["content"].split("\n"))
  module = _module(os.path.join(ROOT, "configs", "smollm2_135m_extend.py"))
  # a window of 8 examples: the first batch tokenizes 8 pieces, not 512 (the same checks)
  small = {"init.path": str(smollm2_dir), "data.max_len": 4096, "data.window": 8,
           "data.source.paths": f"{tmp_path}/cpt.jsonl"}
  config = module.get_config()
  config.update_from_flattened_dict({**small, "stages.ntk.data.max_len": 4096,
                                     "stages.ntk.data.source.paths": f"{tmp_path}/sft.jsonl"})
  abf, ntk = read_stages(config)
  assert (abf.model.rope.theta, ntk.model.num_heads) == (module.ABF_THETA, 9)
  batch = next(iterate_batches(abf.data))
  assert batch["inputs"].shape == (1, 4096) and (batch["loss_weights"] > 0).mean() > 0.99
  batch = next(iterate_batches(ntk.data))
  assert 0 < (batch["loss_weights"] > 0).mean() < 0.1  # the answers only
  config = module.get_config("longlora")
  config.update_from_flattened_dict(small)
  (lora_stage,) = read_stages(config)
  assert lora_stage.attention.s2_group == 1024 and lora_stage.lora.enabled
  docs = "".join(json.loads(line)["text"] for line in open(tmp_path / "docs.jsonl"))
  assert len(docs) > 10**6 and "NAME\n    json - JSON (JavaScript Object Notation)" in docs
  held_out = [p for p in real_text(10**7).split("\n\n") if len(p) > 300]
  assert len(held_out) > 100 and not any(p in docs for p in held_out)
  config = module.get_config("yarn")
  config.update_from_flattened_dict({**small, "stages.yarn.data.max_len": 4096,
                                     "stages.yarn.data.source.paths": f"{tmp_path}/docs.jsonl"})
  (yarn_stage,) = read_stages(config)
  rope = yarn_stage.model.rope
  assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4, 8192)
  batch = next(iterate_batches(yarn_stage.data))
  assert batch["inputs"].shape == (1, 4096) and (batch["loss_weights"] > 0).mean() > 0.99


class _TransformersGenerator:
  """transformers' greedy `generate` behind the interface `run_passkey` takes, one prompt at a
  time (no padding), so the passkey harness can score the reference model."""

  def __init__(self, model, config):
    self.model, self.config = model, config

  def generate(self, prompts, *, max_new_tokens, temperature, eos_token_id):
    assert temperature == 0.0
    outputs = []
    for prompt in prompts:
      with torch.no_grad():
        out = self.model.generate(torch.as_tensor([prompt]), do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                  pad_token_id=eos_token_id)
      outputs.append(out[0, len(prompt):].tolist())
    return outputs


def test_the_passkey_command_gives_transformers_answers(smollm2_dir, hf_model, ours, tmp_path):
  """The same prompts (the command's, real tokenizer), the same generated text per trial."""
  from longctx.eval.passkey import run_passkey
  out = tmp_path / "passkey.json"
  assert eval_main.main(["passkey", "--checkpoint", smollm2_dir, "--tokenizer",
                         f"{smollm2_dir}/tokenizer.json", "--lengths", "768", "--trials", "3",
                         "--out", str(out)]) == 0
  got = json.loads(out.read_text())["results"]
  tok = HFTokenizer(f"{smollm2_dir}/tokenizer.json")
  want = run_passkey(_TransformersGenerator(hf_model, ours.config), tok, [768], trials=3)["results"]
  assert [r["prompt_tokens"] for r in got] == [r["prompt_tokens"] for r in want]
  assert [r["generated"] for r in got] == [r["generated"] for r in want]
  assert any(r["correct"] for r in want)  # real answers, not a shared failure
