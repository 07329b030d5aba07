"""Any causal LM as a Qwen3-Embedding-style embedder: what a user does to start from a decoder that is not yet an
embedding model (a Qwen3 or Llama base, a chat model such as SmolLM2, a GGUF file).

`embedder_from_causal_lm(source, out)` writes a sentence-transformers folder: the decoder's base model (AutoModel:
the transformer without its LM head) as the Transformer module, last-token Pooling and Normalize, and the tokenizer
set up the way last-token pooling needs it (`embtune.encode.prepare` checks the same): left padding, a pad token, and
exactly one end token appended by the tokenizer's post-processor (so truncation keeps it); the query prompt in
Qwen3-Embedding's format. Plain `SentenceTransformer(out)` loads it; `embtune.train` trains it (LoRA on the
decoder's projections, 4-bit on the way).

The end token is the one `embtune.encode.end_token` picks, `<|endoftext|>` where the vocabulary has it, else the
tokenizer's EOS: `prepare()` rewrites the post-processor of any other choice at every load, so the folder must agree
with it to behave the same under plain sentence-transformers and under embtune.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .encode import WEB_SEARCH_TASK, end_token, instruct

PAD_CANDIDATES = ("<|im_end|>", "<|pad|>", "<pad>", "<|finetune_right_pad_id|>")


def pick_pad_token(tokenizer, end: str) -> str:
    """A pad token other than the end token when there is one: the tokenizer's own, else a chat or pad token of the
    vocabulary, else EOS or UNK. (With the attention mask any id pads correctly; a distinct one keeps the end token
    unambiguous in the inputs.)"""
    vocab = tokenizer.get_vocab()
    for token in (tokenizer.pad_token, *PAD_CANDIDATES, tokenizer.eos_token, tokenizer.unk_token):
        if token and token != end and token in vocab:
            return token
    return end


def set_up_tokenizer(tokenizer, end: str | None = None):
    """Left padding, a pad token, and exactly one `end` token appended by the post-processor (a leading BOS the
    tokenizer adds is kept). Returns the tokenizer (changed in place)."""
    from tokenizers.processors import TemplateProcessing

    end = end or end_token(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(end)
    if end_id is None or end_id == tokenizer.unk_token_id and end != tokenizer.unk_token:
        raise ValueError(f"the end token {end!r} is not in the tokenizer's vocabulary")
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: kept on save
    tokenizer.pad_token = pick_pad_token(tokenizer, end)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_special = tokenizer("a")["input_ids"]
    prefix = with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []
    lead = [tokenizer.convert_ids_to_tokens(i) for i in prefix]  # e.g. Llama's <s>
    single = " ".join([*(f"{t}:0" for t in lead), "$A:0", f"{end}:0"])
    pair = " ".join([single, "$B:1", f"{end}:1"])
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in [*lead, end]}
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=single, pair=pair, special_tokens=list(specials.items())
    )
    ids = tokenizer("a")["input_ids"]
    assert ids[-1] == end_id and ids.count(end_id) == 1, f"the post-processor does not append one {end!r}: {ids}"
    return tokenizer


def _dense(kwargs: dict) -> dict:
    """Load a GGUF's weights unpacked into dense tensors (transformers keeps them in GGUF blocks where it has a
    kernel for them, and refuses to save such a model)."""
    if not kwargs.get("gguf_file"):
        return {}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantise
        return {}
    return {"quantization_config": GgufConfig(gguf_file=kwargs["gguf_file"], dequantize=True)}


def embedder_from_causal_lm(source: str | Path, out: str | Path, gguf_file: str | None = None,
                            max_seq_length: int | None = None, dtype=None,
                            task: str = WEB_SEARCH_TASK) -> Path:  # fmt: skip
    """Write a sentence-transformers folder at `out` built from the causal LM `source` (a folder or hub name;
    `gguf_file`: a .gguf inside it, de-quantised by transformers). The decoder's base model (no LM head) with
    last-token pooling and L2 normalisation; the tokenizer as `set_up_tokenizer` leaves it; the query prompt
    `Instruct: {task}\\nQuery:` and none for documents. `max_seq_length`: None keeps the model's own limit (its
    position embeddings); `dtype`: None keeps what transformers loads (the checkpoint's; float32 from a GGUF)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoModel, AutoTokenizer

    from .files import replace_dir

    source, kwargs = str(source), {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file is not None and Path(gguf_file).is_absolute():
        source, kwargs = str(Path(gguf_file).parent), {"gguf_file": Path(gguf_file).name}
    tokenizer = set_up_tokenizer(AutoTokenizer.from_pretrained(source, **kwargs))
    model = AutoModel.from_pretrained(source, **kwargs, **_dense(kwargs), **({"dtype": dtype} if dtype else {}))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and gguf_file:  # de-quantised: an ordinary dense model that transformers can save
        quantizer.remove_quantization_config(model)
    eos = model.config.eos_token_id
    if isinstance(eos, int) and eos != tokenizer.eos_token_id:  # SmolLM2's GGUF names <|im_start|>, its config 2
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    max_seq_length = min(max_seq_length or limit, limit)
    tokenizer.model_max_length = max_seq_length
    # An embedder embeds the text as it is. With a chat template, sentence-transformers 6 gives the Transformer a
    # `message` modality and renders every plain text through the template (a chat LM's system prompt included),
    # which no server does: served embeddings would not be the trained ones.
    tokenizer.chat_template = None
    model.config.pad_token_id = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as hf:
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        hidden = model.config.hidden_size
        del model
        transformer = Transformer(hf, max_seq_length=max_seq_length)
        embedder = SentenceTransformer(
            modules=[transformer, Pooling(hidden, "lasttoken"), Normalize()],
            prompts={"query": instruct(task) if task else "", "document": ""},
            similarity_fn_name="cosine",
            device="cpu",
        )
        with replace_dir(out) as tmp:
            embedder.save(str(tmp))
    return Path(out)
