import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from embtune.fixtures import write_tiny_qwen3_embedding
from embtune.models import load_embedder


def test_tokenizers_carry_qwen_special_tokens(tiny_models):
    for folder in tiny_models:
        tok = AutoTokenizer.from_pretrained(folder)
        for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "yes", "no"):
            assert tok.convert_tokens_to_ids(token) != tok.unk_token_id
            assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(token)) == token
        assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
        assert tok.tokenize("中文 text")  # byte-level: any script encodes


def test_embedding_fixture_is_a_qwen3_sentence_transformer(tiny_embedding):
    model = load_embedder(str(tiny_embedding), device="cpu")
    assert type(model[0].auto_model).__name__ == "Qwen3Model"
    assert model[1].pooling_mode == "lasttoken"
    assert type(model[2]).__name__ == "Normalize"
    assert model.prompts["query"].startswith("Instruct: ") and model.prompts["query"].endswith("\nQuery:")
    ids = AutoTokenizer.from_pretrained(tiny_embedding)("hello")["input_ids"]
    assert ids[-1] == AutoTokenizer.from_pretrained(tiny_embedding).convert_tokens_to_ids("<|endoftext|>")


def test_reranker_fixture_is_a_qwen3_causal_lm(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[1])
    assert type(model).__name__ == "Qwen3ForCausalLM"
    tok = AutoTokenizer.from_pretrained(tiny_models[1])
    logits = model(**tok(["<|im_start|>user\nhi<|im_end|>"], return_tensors="pt")).logits
    assert logits.shape[-1] == len(tok)


def test_fixtures_are_deterministic(tmp_path, tiny_embedding):
    again = write_tiny_qwen3_embedding(tmp_path / "again")
    a = load_embedder(str(tiny_embedding), device="cpu")[0].auto_model.state_dict()
    b = load_embedder(str(again), device="cpu")[0].auto_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_embedding / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_fixtures_command_line_writes_the_same_models(tmp_path, tiny_models):
    """`make fixtures` writes the very models the tests build in process: same weights, same tokenizers."""
    out = subprocess.run([sys.executable, "-m", "embtune.fixtures", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, check=True).stdout  # fmt: skip
    written = [tmp_path / "tiny-qwen3-embedding", tmp_path / "tiny-qwen3-reranker"]
    assert out.split() == [str(p) for p in written]
    for mine, theirs in zip(written, tiny_models, strict=True):
        a, b = load_file(next(mine.rglob("model.safetensors"))), load_file(next(theirs.rglob("model.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert next(mine.rglob("tokenizer.json")).read_text() == next(theirs.rglob("tokenizer.json")).read_text()
    assert load_embedder(str(written[0]), device="cpu")[1].pooling_mode == "lasttoken"
    assert type(AutoModelForCausalLM.from_pretrained(written[1])).__name__ == "Qwen3ForCausalLM"
