"""Encode queries and documents: the one place that knows how each model wants its input.

Qwen3-Embedding needs (and silently degrades without): the instruction on queries only, written
`Instruct: {task}\\nQuery:{query}`; last-token pooling with left padding; exactly one trailing
`<|endoftext|>`; L2 normalisation. Other sentence-transformers models keep their own pooling and prompts.
Batching, length sorting and the progress bar are sentence-transformers' own `encode`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers.processors import TemplateProcessing

# Qwen's default retrieval task (Qwen3-Embedding's model card and `prompts["query"]`).
WEB_SEARCH_TASK = "Given a web search query, retrieve relevant passages that answer the query"
END_OF_TEXT = "<|endoftext|>"


def instruct(task: str) -> str:
    """The query prefix for a task description, in Qwen3-Embedding's format."""
    return f"Instruct: {task}\nQuery:"


def query_prompt(model: SentenceTransformer, instruction: str | None = None) -> str:
    """None: the model's own query prompt (Qwen3 ships the web-search one; MiniLM none); "": no instruction."""
    if instruction is None:
        return model.prompts.get("query") or ""
    return instruct(instruction) if instruction else ""


def uses_last_token(model: SentenceTransformer) -> bool:
    return any(isinstance(m, Pooling) and m.pooling_mode == "lasttoken" for m in model)


def end_token(tokenizer) -> str:
    """The token last-token pooling reads: `<|endoftext|>` where the vocabulary has it, else EOS."""
    return END_OF_TEXT if END_OF_TEXT in tokenizer.get_vocab() else tokenizer.eos_token


def prepare(model: SentenceTransformer) -> SentenceTransformer:
    """Left padding and one appended end token for last-token-pooled models; others are left alone.

    Qwen3-Embedding's current tokenizer appends `<|endoftext|>` itself; early copies and many fine-tuned
    forks do not, and last-token pooling then reads an ordinary word. A post-processor (not string
    concatenation) keeps the token when inputs are truncated, and is saved with the model.
    """
    if not uses_last_token(model):
        return model
    tokenizer = model.tokenizer
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: kept on save
    end = end_token(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(end)
    if tokenizer("a")["input_ids"][-1] != end_id:
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"$A:0 {end}:0", pair=f"$A:0 {end}:0 $B:1 {end}:1", special_tokens=[(end, end_id)]
        )
    return model


def truncate(embeddings: np.ndarray, dim: int | None) -> np.ndarray:
    """Matryoshka truncation: keep the first `dim` coordinates, then L2-normalise again."""
    if dim is not None:
        if not 0 < dim <= embeddings.shape[1]:
            raise ValueError(f"dim={dim} is outside 1..{embeddings.shape[1]} (the model's dimension)")
        embeddings = embeddings[:, :dim]
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def encode(
    model: SentenceTransformer,
    texts: list[str],
    kind: str = "document",
    instruction: str | None = None,
    dim: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> np.ndarray:
    """Unit-length embeddings of `texts`, `kind` "query" (instruction prepended) or "document" (none)."""
    if kind not in ("query", "document"):
        raise ValueError(f'kind must be "query" or "document", not {kind!r}')
    prepare(model)
    prompt = query_prompt(model, instruction) if kind == "query" else model.prompts.get("document") or ""
    if uses_last_token(model):
        # The tokenizer appends the end token; one typed into the text would make two.
        end = end_token(model.tokenizer)
        texts = [t.removesuffix(end) for t in texts]
    embeddings = model.encode(
        list(texts), prompt=prompt, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True
    )
    return truncate(embeddings, dim)


def corpus_embeddings(model: SentenceTransformer, model_path: str, data, run_dir: str | Path, template: str,
                      batch_size: int = 32) -> np.ndarray:  # fmt: skip
    """The corpus embedded once per model, data and template, cached as `run_dir/cache/corpus-<key>.npy` for every
    later step (mining, evaluation, Matryoshka, synthetic-query filters). Caches of an earlier version of this
    model (retrained in place) or of other data are deleted."""
    from .files import atomic_path, write_json
    from .rundir import RunDir, corpus_fingerprint, model_fingerprint

    made_from = {"model": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
                 "model_fingerprint": model_fingerprint(model_path), "corpus": corpus_fingerprint(data.corpus),
                 "template": template}  # fmt: skip
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]
    cache = RunDir(run_dir).cache
    path = cache / f"corpus-{key}.npy"
    if path.exists():
        return np.load(path)
    for sidecar in cache.glob("corpus-*.json"):  # stale: this model as it was before, or other documents
        other = json.loads(sidecar.read_text(encoding="utf-8"))
        changed = {k for k in made_from if other.get(k) != made_from[k]}
        if changed == {"model_fingerprint"} or "corpus" in changed:
            sidecar.unlink()
            sidecar.with_suffix(".npy").unlink(missing_ok=True)
    embeddings = encode(model, list(data.doc_texts(template).values()), "document", batch_size=batch_size)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, embeddings)
    write_json(path.with_suffix(".json"), made_from)
    return embeddings
