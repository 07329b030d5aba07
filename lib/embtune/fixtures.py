"""Tiny random Qwen3 models for tests and CI: seconds to build, deterministic, no network.

`write_tiny_qwen3_embedding` writes a sentence-transformers folder shaped like Qwen3-Embedding
(Transformer + last-token Pooling + Normalize, the query prompt in `config_sentence_transformers.json`);
`write_tiny_qwen3_reranker` writes a `Qwen3ForCausalLM` shaped like Qwen3-Reranker. Both carry a small
byte-level BPE tokenizer trained on the fly with Qwen's special tokens and single-token `yes`/`no`.

    python -m embtune.fixtures OUT   # writes OUT/tiny-qwen3-embedding/ and OUT/tiny-qwen3-reranker/
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from .encode import END_OF_TEXT, WEB_SEARCH_TASK, instruct
from .files import replace_dir

SPECIAL_TOKENS = [END_OF_TEXT, "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SEED = 0


def _training_text():
    """Deterministic English text for the BPE merges; any other script falls back to byte tokens."""
    from pydoc_data.topics import topics

    yield from topics.values()
    # The reranker reads the logits of exactly these two tokens.
    yield from ["yes no"] * 200


def tiny_tokenizer(append_end: bool) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with Qwen's special tokens; `append_end` adds `<|endoftext|>` to every input
    (Qwen3-Embedding's tokenizer does; the reranker's does not)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer)
    for word in ("yes", "no"):
        assert tok.token_to_id(word) is not None, f"BPE training did not make {word!r} one token"
    if append_end:
        end_id = tok.token_to_id(END_OF_TEXT)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {END_OF_TEXT}:0",
            pair=f"$A:0 {END_OF_TEXT}:0 $B:1 {END_OF_TEXT}:1",
            special_tokens=[(END_OF_TEXT, end_id)],
        )
    return Qwen2Tokenizer(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token=END_OF_TEXT,
        unk_token=None,
        bos_token=None,
        model_max_length=512,
    )


def tiny_config(tokenizer) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def write_tiny_qwen3_embedding(out: str | Path) -> Path:
    """A sentence-transformers folder with Qwen3-Embedding's shape and prompts, random weights."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tokenizer = tiny_tokenizer(append_end=True)
    tokenizer.padding_side = "left"
    torch.manual_seed(SEED)
    backbone = Qwen3Model(tiny_config(tokenizer))
    with tempfile.TemporaryDirectory() as hf_dir:
        backbone.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        transformer = Transformer(hf_dir, max_seq_length=256)
        model = SentenceTransformer(
            modules=[transformer, Pooling(backbone.config.hidden_size, "lasttoken"), Normalize()],
            prompts={"query": instruct(WEB_SEARCH_TASK), "document": ""},
            similarity_fn_name="cosine",
            device="cpu",
        )
        with replace_dir(out) as tmp:
            model.save(str(tmp))
    return Path(out)


def write_tiny_qwen3_reranker(out: str | Path) -> Path:
    """A `Qwen3ForCausalLM` with Qwen3-Reranker's shape (yes/no read from the LM head), random weights."""
    tokenizer = tiny_tokenizer(append_end=False)
    tokenizer.padding_side = "left"
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(tiny_config(tokenizer))
    with replace_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def write_fixtures(out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    return (
        write_tiny_qwen3_embedding(out / "tiny-qwen3-embedding"),
        write_tiny_qwen3_reranker(out / "tiny-qwen3-reranker"),
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m embtune.fixtures OUT_DIR")
    for path in write_fixtures(sys.argv[1]):
        print(path)
