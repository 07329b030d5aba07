"""Prove that served embeddings are the trained ones: `check(model_dir, target)`.

The fine-tuned model in sentence-transformers (through `embtune.encode.encode`, the suite's source of truth) and a
target encode the same fixed texts: queries with the model's query prompt, documents of mixed lengths (some
longer than the model's max_seq_length, so truncation is exercised; batches of mixed lengths, so padding is).
A target is an exported ONNX folder, a GGUF file (llama-cpp-python), any OpenAI-compatible `/v1` URL (TEI,
vLLM, Ollama and llama.cpp's server all speak it), or a function from texts to vectors. Like a real client,
the check sends raw texts and adds the query prompt itself, exactly as SERVING.md tells you to.

Reported: min and median cosine between the two embeddings of each text, and how often a small retrieval run
over the documents returns the same top 10 (swaps among documents the model scores within 1 - threshold of its
10th, near-ties the precision allows, do not count). Passing means min cosine >= 0.999 (float) or 0.99 (int8)
and an identical top-10 set on >= 95 % of queries. A failure is diagnosed: plain
sentence-transformers re-encodes the texts under each known way serving goes wrong (instruction missing, other
pooling, right padding read at the last position, no end token, other truncation) and the hypothesis whose
embeddings match the target's best is named as the cause.

Rerankers: `check_reranker(model_dir, target)` against an ONNX folder, a `/rerank` (TEI or Cohere-style) or a
`/score` (vLLM) URL: the max abs difference of P(relevant) and an identical order of each query's candidates.
"""

from __future__ import annotations

import json
import re
import statistics
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .encode import encode, query_prompt, uses_last_token

THRESHOLDS = {"float": 0.999, "int8": 0.99}
RERANK_THRESHOLDS = {"float": 1e-3, "int8": 0.05}  # max abs difference of P(relevant)
MIN_IDENTICAL = 0.95  # share of queries whose top 10 (reranker: candidate order) must be identical
TOP_K = 10

QUERIES = [
    "how do I catch an exception and run cleanup code",
    "what does the with statement do",
    "difference between a list and a tuple",
    "how to format a float with two decimals in an f-string",
    "what is a lambda expression",
    "how does the for loop iterate over a sequence",
    "when is the else clause of a loop executed",
    "what does yield do in a function",
    "how do I compare two objects for equality",
    "what are the truth values of built-in types",
    "how to import a module from a package",
    "what does the global keyword change",
    "how to slice a list with a step",
    "what methods does a dictionary have",
    "how are class attributes looked up",
    "what does the await expression suspend",
    "bitwise operators on integers",
    "how to raise an exception from another one",
    "what is the operator precedence in Python",
    "string methods to split and join text",
    "Wie fange ich eine Ausnahme in Python ab?",
    "如何在 Python 中定义一个函数？",
    "Pythonで辞書をループする方法",
    "🐍 unpacking assignment with a star target",
]


def documents(tokenizer, max_seq_length: int, n: int = 40) -> list[str]:
    """Fixed documents from the Python reference (`pydoc_data.topics`, shipped with Python): short (a
    sentence), medium (about 80 words) and long ones, the long ones cut 64 tokens past `max_seq_length` so that
    they are truncated; plus two documents in other scripts."""
    from pydoc_data.topics import topics

    docs = []
    for i, key in enumerate(sorted(topics)[: n - 2]):
        text = " ".join(topics[key].split())
        if i % 5 == 4:
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: max_seq_length + 64]
            docs.append(tokenizer.decode(ids))
        elif i % 5 in (1, 3):
            docs.append(" ".join(text.split()[:80]))
        else:
            docs.append(" ".join(text.split()[:12]))
    docs += ["Ausnahmen werden mit try und except abgefangen; finally läuft immer.",
             "函数使用 def 关键字定义，后跟函数名和括号中的参数。"]  # fmt: skip
    return docs


@dataclass
class Parity:
    """One target's agreement with the trained model."""

    target: str
    kind: str  # "embedder" or "reranker"
    precision: str  # "float" or "int8": which threshold applies
    threshold: float
    n_queries: int
    n_documents: int
    min_cosine: float | None = None  # embedder
    median_cosine: float | None = None
    max_abs_diff: float | None = None  # reranker: P(relevant)
    identical: float = 0.0  # share of queries with the identical top 10 (reranker: candidate order)
    overlap: float = 0.0  # mean overlap of the top 10
    passed: bool = False
    cause: str | None = None
    hypotheses: dict[str, float] = field(default_factory=dict)  # min cosine of each re-encoding to the target
    worst: list = field(default_factory=list)  # [cosine, tokens, the text's start] of the three least alike texts

    def to_dict(self) -> dict:
        return asdict(self)


def table(results: list[Parity]) -> str:
    """A markdown table of checks, for reports."""
    rows = ["| target | precision | min cos | median cos | max abs diff | identical top-10 | passed | cause |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    for r in results:
        rows.append(f"| {r.target} | {r.precision} | {num(r.min_cosine, '.5f')} | {num(r.median_cosine, '.5f')} | "
                    f"{num(r.max_abs_diff, '.4f')} | {r.identical:.0%} | {'yes' if r.passed else 'no'} | "
                    f"{r.cause or ''} |")  # fmt: skip
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- targets


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def clip_texts(tokenizer, texts: list[str], max_seq_length: int) -> list[str]:
    """Texts cut where the model would truncate them: at most `max_seq_length` tokens once the tokenizer has
    added its own (Qwen3's end token; BERT's [CLS] and [SEP]). The cut is made in the text, at a token's end
    offset, so any server then tokenizes, appends the end token and embeds what the model embedded. Servers
    truncate otherwise (llama.cpp after appending the end token, which cuts it; TEI and vLLM at their own
    limits), so SERVING.md's client clips and this check does the same."""
    added = len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])
    keep = max_seq_length - added
    out = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        out.append(text if len(enc["input_ids"]) <= keep else text[: enc["offset_mapping"][keep - 1][1]])
    return out


def _post(url: str, body: dict, timeout: float = 120):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def openai_embed(url: str, model: str | None = None, timeout: float = 120):
    """A function texts -> vectors over an OpenAI-compatible `/v1/embeddings` endpoint (`url` is the base,
    e.g. http://localhost:8080/v1, or the full …/embeddings URL). Texts go as they are: no prompt added."""
    endpoint = url.rstrip("/") if url.rstrip("/").endswith("/embeddings") else url.rstrip("/") + "/embeddings"

    def embed(texts: list[str]) -> np.ndarray:
        body = {"input": texts, **({"model": model} if model else {})}
        data = sorted(_post(endpoint, body, timeout)["data"], key=lambda d: d["index"])
        return np.array([d["embedding"] for d in data], dtype=np.float32)

    return embed


def gguf_embed(path: str | Path, n_ctx: int = 512, n_threads: int | None = None):
    """A function texts -> vectors by llama-cpp-python on a GGUF file, with the pooling stored in the file."""
    from llama_cpp import Llama

    # llama-cpp-python's default is half the cores; torch's (all of them) makes speed comparisons fair
    llm = Llama(model_path=str(path), embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                n_threads=n_threads or torch.get_num_threads(), verbose=False)  # fmt: skip

    def embed(texts: list[str]) -> np.ndarray:
        return np.array(llm.embed(texts, normalize=True, truncate=True), dtype=np.float32)

    return embed


def _target_encoder(target, model, served_model: str | None):
    """(name, encode(texts, kind, prompt) -> vectors, sends batches itself) for any kind of target."""
    if callable(target):
        return getattr(target, "__name__", "function"), target, True
    name = str(target)
    if name.startswith(("http://", "https://")):
        return name, openai_embed(name, served_model), True
    path = Path(target)
    if path.suffix == ".gguf":
        # llama.cpp truncates at its context size; a multiple of 256, or BERT models fail its matrix-shape asserts
        return path.name, gguf_embed(path, n_ctx=-(-model.max_seq_length // 256) * 256), True
    if (path / "onnx").is_dir() or path.suffix == ".onnx":
        from .export import load_onnx

        return path.name, load_onnx(path), False
    raise ValueError(f"{target!r} is neither a URL, a .gguf file, an exported ONNX folder nor a function")


def _guess_precision(target) -> str:
    name = str(target).lower()
    return "int8" if re.search(r"int8|q8_0|q4|q5|q6|qint|quant", name) else "float"


# ---------------------------------------------------------------------------------------------------- check


def check(model_dir: str | Path, target, *, instruction: str | None = None, precision: str | None = None,
          served_model: str | None = None, batch_size: int = 16, model=None, clip: bool = True,
          diagnose: bool = True) -> Parity:  # fmt: skip
    """Compare the embeddings of the trained model (`model_dir`, or the loaded `model`) and of `target` (an
    exported ONNX folder, a .gguf file, an OpenAI-compatible URL or a function texts -> vectors) on the fixed
    texts. `instruction` as everywhere (None: the model's own query prompt); `precision` "float" or "int8"
    picks the threshold (None: "int8" when the target's name says so)."""
    from .models import load_embedder

    model = model or load_embedder(str(model_dir))
    precision = precision or _guess_precision(target)
    prompt = query_prompt(model, instruction)
    docs = documents(model.tokenizer, model.max_seq_length)
    name, target_encoder, raw = _target_encoder(target, model, served_model)

    ref_q = encode(model, QUERIES, "query", instruction, batch_size=batch_size, progress=False)
    ref_d = encode(model, docs, "document", batch_size=batch_size, progress=False)
    # What the target receives: like SERVING.md's client, the query prompt written in front of each query, texts
    # clipped to the model's length (`clip=False`: as they are, to see how the server truncates), in batches.
    texts = [prompt + q for q in QUERIES] + docs
    texts = clip_texts(model.tokenizer, texts, model.max_seq_length) if clip else texts
    sent = _batches(texts[: len(QUERIES)], batch_size) + _batches(texts[len(QUERIES) :], batch_size)
    if raw:
        got = _unit(np.concatenate([target_encoder(b) for b in sent]))
    else:
        kw = {"batch_size": batch_size, "progress": False}
        got = np.concatenate([encode(target_encoder, QUERIES, "query", instruction, **kw),
                              encode(target_encoder, docs, "document", **kw)])  # fmt: skip
    ref = np.concatenate([ref_q, ref_d])
    cos = (ref * got).sum(1)
    identical, overlap = _top_k_agreement(ref_q, ref_d, got[: len(QUERIES)], got[len(QUERIES) :],
                                          tie=1 - THRESHOLDS[precision])  # fmt: skip
    result = Parity(target=name, kind="embedder", precision=precision, threshold=THRESHOLDS[precision],
                    n_queries=len(QUERIES), n_documents=len(docs), min_cosine=round(float(cos.min()), 6),
                    median_cosine=round(float(np.median(cos)), 6), identical=identical, overlap=overlap)  # fmt: skip
    result.passed = bool(cos.min() >= result.threshold and identical >= MIN_IDENTICAL)
    result.worst = [[round(float(cos[i]), 4), len(model.tokenizer(texts[i], verbose=False)["input_ids"]), texts[i][:60]]
                    for i in np.argsort(cos)[:3]]  # fmt: skip
    if not result.passed and diagnose and _pooling_mode(model) is None:
        result.cause = "not diagnosed: the model has no Pooling module to vary"
    elif not result.passed and diagnose:
        result.hypotheses = {"as trained": round(float(cos.min()), 6)}
        for hypothesis, options in hypotheses(model, prompt).items():
            emb = _variant(model, sent, len(QUERIES), prompt, **options)
            result.hypotheses[hypothesis] = round(float((emb * got).sum(1).min()), 6)
        result.cause = _cause(result.hypotheses, result.threshold)
    return result


def _top_k_agreement(ref_q, ref_d, got_q, got_d, tie: float, k: int = TOP_K) -> tuple[float, float]:
    """(share of queries with the same top k, mean overlap). Documents the model itself scores within `tie` of its
    k-th score are near-ties that the precision allowed can reorder: a top k that differs only in those counts as
    the same (otherwise int8 weights at cosine 0.9998 "differ" on whichever of 40 documents sit at rank 10)."""
    ref, got = ref_q @ ref_d.T, got_q @ got_d.T
    same, overlap = [], []
    for r, g in zip(ref, got, strict=True):
        a, b = set(np.argsort(-r, kind="stable")[:k]), set(np.argsort(-g, kind="stable")[:k])
        kth = np.sort(r)[-k]
        same.append(all(abs(r[d] - kth) <= tie for d in a ^ b))
        overlap.append(len(a & b) / k)
    return round(float(np.mean(same)), 4), round(float(np.mean(overlap)), 4)


def _pooling_mode(model) -> str | None:
    from sentence_transformers.sentence_transformer.modules import Pooling

    return next((m.pooling_mode for m in model if isinstance(m, Pooling)), None)


def hypotheses(model, prompt: str) -> dict[str, dict]:
    """The known ways serving goes wrong, each as options of `_variant` (a re-encoding by plain
    sentence-transformers modules with that one thing changed)."""
    found = {}
    if prompt:
        found["instruction missing"] = {"drop_prompt": True}
    own = _pooling_mode(model)
    for mode, label in (("mean", "mean"), ("cls", "first token"), ("lasttoken", "last token")):
        if own and mode != own:
            found[f"pooling: {label}"] = {"pooling": mode}
    if uses_last_token(model):
        found["padding side: right, last position read"] = {"right_padding": True}
        found["end token missing"] = {"end_token": False}
    found[f"truncation: at {model.max_seq_length // 2} tokens"] = {"max_length": model.max_seq_length // 2}
    found["truncation: none"] = {"max_length": None}
    found["truncation: after the end token was added, cutting it"] = {"cut_after_end": True}
    if "message" in getattr(model[0], "modality_config", {}):
        found["chat template not applied"] = {}  # the variants tokenize plain text; the model renders a chat
    return found


def _variant(model, sent: list[list[str]], n_queries: int, prompt: str, drop_prompt: bool = False,
             pooling: str | None = None, right_padding: bool = False, end_token: bool = True,
             max_length: int | None | str = "model", cut_after_end: bool = False) -> np.ndarray:  # fmt: skip
    """The texts as the target received them (`sent`, batch by batch, queries first with `prompt`), encoded by
    the model's own modules with one thing changed. Texts are tokenized as plain text (no chat template)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    tokenizer, transformer = model.tokenizer, model[0]
    pool_at = next(i for i, m in enumerate(model) if isinstance(m, Pooling))
    length = model.max_seq_length if max_length == "model" else max_length
    left = tokenizer.padding_side == "left" and not right_padding
    out, seen = [], 0
    for batch in sent:
        if drop_prompt and seen < n_queries:
            batch = [t.removeprefix(prompt) for t in batch]
        seen += len(batch)
        truncate = length is not None and not cut_after_end
        ids = tokenizer(batch, add_special_tokens=end_token, truncation=truncate, max_length=length)["input_ids"]
        if cut_after_end:  # truncated after the end token was appended: long texts lose it
            ids = [x[:length] for x in ids]
        width = max(map(len, ids))
        pad = [[tokenizer.pad_token_id] * (width - len(x)) for x in ids]
        input_ids = [p + x if left else x + p for x, p in zip(ids, pad, strict=True)]
        mask = [[0] * len(p) + [1] * len(x) if left else [1] * len(x) + [0] * len(p)
                for x, p in zip(ids, pad, strict=True)]  # fmt: skip
        features = {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask)}
        if "token_type_ids" in tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        features = {k: v.to(model.device) for k, v in features.items()}
        with torch.no_grad():
            features = transformer(features)
            if right_padding:  # a server reading the last position, whatever the mask says
                features["sentence_embedding"] = features["token_embeddings"][:, -1]
            elif pooling:
                features = Pooling(features["token_embeddings"].shape[-1], pooling)(features)
            else:
                features = model[pool_at](features)
            for module in list(model)[pool_at + 1 :]:
                features = module(features)
        out.append(features["sentence_embedding"].float().cpu().numpy())
    return _unit(np.concatenate(out))


FIXES = {
    "instruction missing": "queries reach the model without the query prompt: prepend it on the client (SERVING.md)",
    "pooling": "the server pools differently from the model: serve the folder with its 1_Pooling config, or set "
    "the server's pooling flag (SERVING.md)",
    "padding side": "the server pads on the right and reads the last position: use a server with mask-aware "
    "last-token pooling, or left padding",
    "end token missing": "the tokenizer the server uses does not append the end token: serve the exported folder "
    "(its tokenizer.json appends it), or append it to every text on the client",
    "truncation": "long texts are truncated otherwise than by the model (at another length, or after the end "
    "token was appended, which cuts it): truncate on the client to max_seq_length - 1 tokens (SERVING.md)",
    "chat template not applied": "the model renders every text through its tokenizer's chat template and the "
    "server embeds the plain text",
}


def _cause(scores: dict[str, float], threshold: float) -> str:
    """The hypothesis under which the least alike text comes closest to the target (a hypothesis that explains
    every text has min cosine ~1), with the fix; "precision" when none beats the model as trained (the target
    computes the same thing, less exactly)."""
    best = max(scores, key=scores.get)
    if best == "as trained" or scores[best] <= scores["as trained"]:
        return (f"precision: no known mistake explains it better than the model as trained (min cosine "
                f"{scores['as trained']:.4f}); the target computes the same thing less exactly")  # fmt: skip
    key = best.split(":")[0]
    explained = "" if scores[best] >= threshold else f" (explains it only in part: min cosine {scores[best]:.4f})"
    return f"{best}{explained}: {FIXES[key]}"


# ---------------------------------------------------------------------------------------------------- rerankers


def rerank_pairs(n_candidates: int = 10) -> list[tuple[str, list[str]]]:
    """(query, candidates) of the fixed texts: each query against `n_candidates` documents."""
    docs = documents(_Words(), 96)
    return [(q, [docs[(i * 3 + j) % len(docs)] for j in range(n_candidates)]) for i, q in enumerate(QUERIES)]


class _Words:
    """A whitespace 'tokenizer' for the reranker's documents, so they do not depend on its vocabulary."""

    def __call__(self, text, **kwargs):
        return {"input_ids": text.split()}

    def decode(self, ids):
        return " ".join(ids)


def _rerank_api(url: str) -> str:
    path = url.rstrip("/")
    if path.endswith("/score"):
        return "vllm-score"
    if re.search(r"/v\d/rerank$", path):
        return "cohere"  # Cohere, Jina, vLLM's and llama.cpp's /v1/rerank: {"query", "documents"} -> results
    if path.endswith("/rerank"):
        return "tei"
    raise ValueError(f"{url}: expected a …/rerank (TEI, or /v1/rerank Cohere-style) or …/score (vLLM) URL")


def http_rerank(url: str, model: str | None = None, timeout: float = 120):
    """A function (query, documents) -> P(relevant) over a rerank or score endpoint; the texts go as given."""
    api = _rerank_api(url)
    named = {"model": model} if model else {}

    def score(query: str, docs: list[str]) -> np.ndarray:
        if api == "vllm-score":
            rows = _post(url, {**named, "text_1": query, "text_2": docs}, timeout)["data"]
            pairs = [(r["index"], r["score"]) for r in rows]
        elif api == "cohere":
            rows = _post(url, {**named, "query": query, "documents": docs, "top_n": len(docs)}, timeout)["results"]
            pairs = [(r["index"], r["relevance_score"]) for r in rows]
        else:
            rows = _post(url, {"query": query, "texts": docs, "raw_scores": False}, timeout)
            pairs = [(r["index"], r["score"]) for r in rows]
        out = np.zeros(len(docs), dtype=np.float64)
        for i, s in pairs:
            out[i] = s
        return out

    return score


def served_pair(model, query: str, doc: str, instruction: str | None = None) -> tuple[str, str]:
    """The two texts a client sends for one pair: a causal-LM reranker's prompt split at the document (Qwen's
    query and document templates, as vLLM's Qwen3-Reranker example sends them); a cross-encoder's raw texts."""
    from .encode import WEB_SEARCH_TASK
    from .rerank import PREFIX, SUFFIX, is_causal

    if not is_causal(model):
        return query, doc
    task = WEB_SEARCH_TASK if instruction is None else instruction.strip()
    return f"{PREFIX}<Instruct>: {task}\n<Query>: {query}\n", f"<Document>: {doc}{SUFFIX}"


def check_reranker(model_dir: str | Path, target, *, instruction: str | None = None, precision: str | None = None,
                   served_model: str | None = None, batch_size: int = 16, model=None) -> Parity:  # fmt: skip
    """Compare P(relevant) of the trained reranker and of `target` (an exported ONNX folder, a rerank/score URL
    or a function (query, documents) -> scores) on the fixed pairs."""
    from .rerank import instruction_prompt, load_reranker

    model = model or load_reranker(str(model_dir))
    precision = precision or _guess_precision(target)
    pairs = rerank_pairs()
    flat = [(q, d) for q, docs in pairs for d in docs]
    ref = np.asarray(model.predict(flat, batch_size=batch_size, show_progress_bar=False,
                                   prompt=instruction_prompt(model, instruction)), dtype=np.float64)  # fmt: skip
    if callable(target) or str(target).startswith(("http://", "https://")):
        name = getattr(target, "__name__", "function") if callable(target) else str(target)
        scorer = target if callable(target) else http_rerank(str(target), served_model)
        got = []
        for q, docs in pairs:
            sent = [served_pair(model, q, d, instruction) for d in docs]
            got.extend(scorer(sent[0][0], [d for _, d in sent]))
        got = np.asarray(got, dtype=np.float64)
    else:
        from .export import load_onnx

        name = Path(target).name
        onnx = load_onnx(target, reranker=True)
        got = np.asarray(onnx.predict(flat, batch_size=batch_size, show_progress_bar=False,
                                      prompt=instruction_prompt(onnx, instruction)), dtype=np.float64)  # fmt: skip
    diff = np.abs(ref - got)
    n = len(pairs[0][1])
    same = [list(np.argsort(-ref[i : i + n], kind="stable")) == list(np.argsort(-got[i : i + n], kind="stable"))
            for i in range(0, len(flat), n)]  # fmt: skip
    result = Parity(target=name, kind="reranker", precision=precision, threshold=RERANK_THRESHOLDS[precision],
                    n_queries=len(pairs), n_documents=len(flat), max_abs_diff=round(float(diff.max()), 6),
                    identical=round(float(np.mean(same)), 4), overlap=round(float(np.mean(same)), 4))  # fmt: skip
    result.passed = bool(diff.max() <= result.threshold and result.identical >= MIN_IDENTICAL)
    if not result.passed:
        if got.min() < 0 or got.max() > 1:
            result.cause = "scores are not probabilities: the server returns raw logits (TEI: raw_scores=false)"
        else:
            result.cause = f"scores differ (median abs difference {statistics.median(diff):.4f})"
    return result
