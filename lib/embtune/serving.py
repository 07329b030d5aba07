"""Prove that served embeddings are the trained ones: `check(model_dir, target)`.

Two sides reached by independent code. The reference is the model folder loaded by plain sentence-transformers in
a process that imports nothing of embtune (`embtune.consumer`, run as a script). The target is reached the way
SERVING.md deploys it, with no embtune code in between: an exported ONNX folder through SERVING.md's consumer
client (tokenizers + onnxruntime + the pooling the folder declares, the same file run as a script); a GGUF file
through `llama-server` started with SERVING.md's exact command (`embtune.llama_cpp`); any OpenAI-compatible `/v1`
URL (TEI, vLLM, Ollama) through SERVING.md's HTTP client; or a function from texts to vectors.

The fixed texts: queries with the query prompt written in front (as the client does), documents of mixed
lengths, some longer than the model's max_seq_length; a server receives them clipped where the model truncates
(as SERVING.md's client clips) and, once more, the long ones unclipped, so its own truncation is checked too.

Reported: min and median cosine between the two embeddings of each text, how far the vector lengths differ
(a server that does not L2-normalise a normalised model fails), and how often a small retrieval run returns the
same top 10 (swaps among documents the model scores within 1 - threshold of its 10th, near-ties the precision
allows, do not count). Passing means min cosine >= 0.999 (float) or 0.99 (int8), lengths within 1 %, the long
texts sent unclipped embedded as the model embeds them (or refused; reported only, for a deployment whose client
clips), and an identical top-10 set on >= 95 % of queries. A failure is diagnosed: plain sentence-transformers
modules re-encode the texts under each known way serving goes wrong (instruction missing, query prompt on every
text, other pooling, right padding read at the last position, no end token, other truncation), and the hypothesis
that matches the target best is named as the cause. A target that cannot be reached (a server error, a binary
that could not be built) is that row's `error`, and the row fails.

Rerankers: `check_reranker(model_dir, target)` against an ONNX folder (the consumer's reranker client), a GGUF
file (`llama-server --reranking`, `/v1/rerank`), a `/v1/rerank`, `/rerank` (TEI) or `/score` (vLLM) URL, or a
function: the max abs difference of P(relevant), each query's Spearman correlation and its top 3.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import consumer, llama_cpp
from .encode import query_prompt, uses_last_token

THRESHOLDS = {"float": 0.999, "int8": 0.99}
RERANK_THRESHOLDS = {"float": 1e-3, "int8": 0.05}  # max abs difference of P(relevant)
MIN_IDENTICAL = 0.95  # share of queries whose top 10 (reranker: top 3) must be identical
MIN_SPEARMAN = 0.99  # reranker: the rank correlation of each query's candidates
# Vector lengths may differ this much: a reference in bf16 (a checkpoint's own dtype, as sentence-transformers loads
# it) is unit length only to +-0.4 %, while a server that does not normalise is off by far more.
NORM_TOLERANCE = 0.01
TOP_K = 10
RERANK_TOP = 3


class TargetError(RuntimeError):
    """The target (or the reference) could not be run: the message says where it failed."""


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
    norm_error: float | None = None  # embedder: max relative difference of the vector lengths
    long_texts: str | None = None  # embedder: what the target did with texts sent unclipped
    max_abs_diff: float | None = None  # reranker: P(relevant)
    min_spearman: float | None = None  # reranker: the lowest rank correlation of one query's candidates
    identical: float = 0.0  # share of queries with the identical top 10 (reranker: top 3)
    overlap: float = 0.0  # mean overlap of the top 10 (reranker: top 3)
    passed: bool = False
    cause: str | None = None
    error: str | None = None  # the target could not be run
    hypotheses: dict[str, float] = field(default_factory=dict)  # min cosine of each re-encoding to the target
    worst: list = field(default_factory=list)  # [cosine, tokens, the text's start] of the three least alike texts

    def to_dict(self) -> dict:
        return asdict(self)


def table(results: list[Parity]) -> str:
    """A markdown table of checks, for reports."""
    rows = ["| target | precision | min cos | median cos | max abs diff | min spearman | identical top-k | passed "
            "| cause |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    for r in results:
        rows.append(f"| {r.target} | {r.precision} | {num(r.min_cosine, '.5f')} | {num(r.median_cosine, '.5f')} | "
                    f"{num(r.max_abs_diff, '.4f')} | {num(r.min_spearman, '.4f')} | {r.identical:.0%} | "
                    f"{'yes' if r.passed else 'no'} | {r.cause or r.error or ''} |")  # fmt: skip
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- the two sides


_REFERENCES: dict = {}  # the reference's replies in this process, by model folder (its files' sizes and times)


def consume(kind: str, source, request: dict, timeout: float = 3600) -> dict:
    """`embtune/consumer.py` run as a script (python -I: no embtune on its path) on `request`; its JSON reply.
    The reference (plain sentence-transformers on a folder) is run once per folder state and request."""
    key = None
    if kind in ("sentence-transformers", "cross-encoder"):
        files = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(source).rglob("*") if p.is_file())
        key = (kind, str(source), tuple(files), json.dumps(request))
        if key in _REFERENCES:
            return _REFERENCES[key]
    script = Path(consumer.__file__)
    done = subprocess.run([sys.executable, "-I", str(script), kind, str(source)], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if done.returncode:
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
        raise TargetError(f"{kind} on {source}: {lines[-1] if lines else done.returncode}")
    reply = json.loads(done.stdout)
    if reply.pop("imported_embtune"):  # the independence this check rests on
        raise TargetError(f"the {kind} consumer imported embtune")
    if key:
        _REFERENCES[key] = reply
    return reply


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def _name(target) -> str:
    if callable(target):
        return getattr(target, "__name__", "function")
    return str(target) if _is_url(target) else Path(target).name


def _guess_precision(target) -> str:
    name = str(target).lower()
    return "int8" if re.search(r"int8|q8_0|q4|q5|q6|qint|quant", name) else "float"


def pooling_mode(model) -> str | None:
    from sentence_transformers.sentence_transformer.modules import Pooling

    return next((m.pooling_mode for m in model if isinstance(m, Pooling)), None)


def llama_pooling(model) -> str:
    """llama-server's --pooling for the model's Pooling module."""
    return {"lasttoken": "last", "mean": "mean", "cls": "cls"}.get(pooling_mode(model) or "", "mean")


def _over_http(url: str, sent: list[list[str]], long: list[str], served_model: str | None):
    """What a server returns for `sent` (clipped, as SERVING.md's client sends texts), and for the long texts
    unclipped: (vectors, vectors of the long texts or the server's refusal as a string)."""
    got = np.concatenate([consumer.http_embed(url, batch, served_model) for batch in sent])
    try:
        probe = consumer.http_embed(url, long, served_model, retries=0) if long else None
    except RuntimeError as e:
        probe = str(e)
    return got, probe


def _target_vectors(target, model, sent, long, served_model, llama_server):
    """(vectors of the texts in `sent`, vectors of `long` sent unclipped: or the refusal, or None: not sent)."""
    if callable(target):
        return np.concatenate([np.asarray(target(b)) for b in sent]), (np.asarray(target(long)) if long else None)
    if _is_url(target):
        return _over_http(str(target), sent, long, served_model)
    path = Path(target)
    if path.suffix == ".gguf":
        binary = llama_cpp.find_server(llama_server)
        length = llama_cpp.embedding_context(model.max_seq_length)
        with llama_cpp.serve(binary, path, length=length, pooling=llama_pooling(model)) as url:
            return _over_http(url + "/v1", sent, long, served_model)
    if (path / "onnx").is_dir():  # the client truncates by the folder's own configuration: nothing is clipped
        return np.asarray(consume("onnx", path, {"texts": [t for batch in sent for t in batch]})["vectors"]), None
    raise ValueError(f"{target!r} is neither a URL, a .gguf file, an exported ONNX folder nor a function")


def _is_url(target) -> bool:
    return not callable(target) and str(target).startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------------- check


def check(model_dir: str | Path, target, *, instruction: str | None = None, precision: str | None = None,
          served_model: str | None = None, batch_size: int = 16, model=None, diagnose: bool = True,
          llama_server: str | None = "build", clipping_client: bool | None = None) -> Parity:  # fmt: skip
    """Compare the embeddings of the trained model (`model_dir`, read by plain sentence-transformers in its own
    process) and of `target` (an exported ONNX folder, a .gguf file, an OpenAI-compatible URL or a function
    texts -> vectors) on the fixed texts. `instruction` as everywhere (None: the model's own query prompt);
    `precision` "float" or "int8" picks the threshold (None: "int8" when the target's name says so);
    `llama_server` serves a .gguf target ("build": the cached build, or a binary's path). `model`, the model as
    loaded by embtune, only picks the texts and diagnoses a failure. `clipping_client`: the deployment clips texts
    on the client, so how the server embeds longer texts is reported (`long_texts`), not judged; None: True for
    a .gguf target (SERVING.md's llama-server, which embeds whatever fits its context, with SERVING.md's client),
    False for a URL, whose clients may send texts unclipped."""
    from .models import load_embedder

    model = model or load_embedder(str(model_dir))
    precision = precision or _guess_precision(target)
    clipping_client = str(target).endswith(".gguf") if clipping_client is None else clipping_client
    prompt = query_prompt(model, instruction)
    docs = documents(model.tokenizer, model.max_seq_length)
    texts = [prompt + q for q in QUERIES] + docs
    # What the target receives: like SERVING.md's clients, the query prompt in front of each query, and texts cut
    # where the model truncates (the ONNX client truncates by the folder's configuration itself), in batches.
    clip = (lambda t: t) if Path(str(target)).joinpath("onnx").is_dir() else consumer.clipper(model_dir)
    sent = [[clip(t) for t in b] for b in _batches(texts[: len(QUERIES)], batch_size) +
            _batches(texts[len(QUERIES) :], batch_size)]  # fmt: skip
    n_tokens = [len(model.tokenizer(t, verbose=False)["input_ids"]) for t in texts]
    long = [i for i, n in enumerate(n_tokens) if n > model.max_seq_length]
    result = Parity(target=_name(target), kind="embedder", precision=precision, threshold=THRESHOLDS[precision],
                    n_queries=len(QUERIES), n_documents=len(docs))  # fmt: skip
    try:
        ref = consume("sentence-transformers", model_dir,
                      {"queries": QUERIES, "documents": docs, "prompt": None if instruction is None else prompt})
        ref = np.concatenate([np.asarray(ref["queries"]), np.asarray(ref["documents"])])
        got, probe = _target_vectors(target, model, sent, [texts[i] for i in long], served_model, llama_server)
    except (TargetError, llama_cpp.NoLlamaCpp, RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        result.error = str(e)
        return result
    cos = (_unit(ref) * _unit(got)).sum(1)
    norms = np.linalg.norm(got, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    tie = 1 - THRESHOLDS[precision]
    q, n = _unit(ref), _unit(got)
    identical, overlap = _top_k_agreement(q[: len(QUERIES)] @ q[len(QUERIES) :].T,
                                          n[: len(QUERIES)] @ n[len(QUERIES) :].T, tie=tie)  # fmt: skip
    result.min_cosine, result.median_cosine = round(float(cos.min()), 6), round(float(np.median(cos)), 6)
    result.norm_error = round(float(np.abs(norms - 1).max()), 6)
    result.identical, result.overlap = identical, overlap
    result.worst = [[round(float(cos[i]), 4), n_tokens[i], texts[i][:60]] for i in np.argsort(cos)[:3]]
    causes = []
    if isinstance(probe, str):
        result.long_texts = f"refused: {probe[:200]} (the client clips them: SERVING.md)"
    elif probe is not None:
        probe_cos = float((_unit(ref[long]) * _unit(probe)).sum(1).min())
        result.long_texts = (f"min cosine {probe_cos:.4f} sent unclipped" + (
            ": embedded otherwise than the model, so clients must clip them (SERVING.md's does)"
            if probe_cos < result.threshold else ""))  # fmt: skip
        if probe_cos < result.threshold and not clipping_client:
            causes.append(f"truncation: texts over {model.max_seq_length} tokens, sent unclipped, are truncated "
                          f"otherwise than by the model (min cosine {probe_cos:.4f}): "
                          + FIXES["truncation"])  # fmt: skip
    if result.norm_error > NORM_TOLERANCE:
        causes.append(f"not normalised: the target's vectors differ in length from the model's by up to "
                      f"{result.norm_error:.1%} (the model's are {_length_word(ref)}): "
                      + FIXES["not normalised"])  # fmt: skip
    in_full = bool(cos.min() >= result.threshold and identical >= MIN_IDENTICAL)
    result.passed = in_full and not causes
    if not in_full and diagnose and pooling_mode(model) is None:
        causes.insert(0, "not diagnosed: the model has no Pooling module to vary")
    elif not in_full and diagnose:
        result.hypotheses = {"as trained": round(float(cos.min()), 6)}
        exact = _in_float32(model)  # as the reference computes: bf16's own drift would blur the hypotheses
        for hypothesis, options in hypotheses(model, prompt).items():
            emb = _variant(exact, sent, len(QUERIES), prompt, **options)
            result.hypotheses[hypothesis] = round(float((emb * _unit(got)).sum(1).min()), 6)
        causes.insert(0, _cause(result.hypotheses, result.threshold))
    result.cause = "; ".join(causes) or None
    return result


def _in_float32(model):
    """`model`, or a float32 copy of it where it computes in another precision."""
    import copy

    return model if model.dtype == torch.float32 else copy.deepcopy(model).float()


def _length_word(ref) -> str:
    lengths = np.linalg.norm(ref, axis=1)
    return "unit length" if np.allclose(lengths, 1, atol=1e-3) else f"of length {lengths.min():.3g}-{lengths.max():.3g}"


def _top_k_agreement(ref, got, tie: float, k: int = TOP_K) -> tuple[float, float]:
    """(share of queries with the same top k, mean overlap), from (queries x candidates) score matrices.
    Candidates the model itself scores within `tie` of its k-th score are near-ties that the precision allowed can
    reorder: a top k that differs only in those counts as the same (otherwise int8 weights at cosine 0.9998
    "differ" on whichever of 40 documents sit at rank 10)."""
    same, overlap = [], []
    for r, g in zip(ref, got, strict=True):
        a, b = set(np.argsort(-r, kind="stable")[:k]), set(np.argsort(-g, kind="stable")[:k])
        kth = np.sort(r)[-k]
        same.append(all(abs(r[d] - kth) <= tie for d in a ^ b))
        overlap.append(len(a & b) / k)
    return round(float(np.mean(same)), 4), round(float(np.mean(overlap)), 4)


def hypotheses(model, prompt: str) -> dict[str, dict]:
    """The known ways serving goes wrong, each as options of `_variant` (a re-encoding by plain
    sentence-transformers modules with that one thing changed)."""
    found = {}
    # First, as ties go to the first: every variant tokenizes plain text, so all of them also "apply no template"
    if "message" in getattr(model[0], "modality_config", {}):
        found["chat template not applied"] = {}
    if prompt:
        found["instruction missing"] = {"drop_prompt": True}
        found["query prompt on every text"] = {"prompt_everywhere": True}
    own = pooling_mode(model)
    for mode, label in (("mean", "mean"), ("cls", "first token"), ("lasttoken", "last token")):
        if own and mode != own:
            found[f"pooling: {label}"] = {"pooling": mode}
    if uses_last_token(model):
        found["padding side: right, last position read"] = {"right_padding": True}
        found["end token missing"] = {"end_token": False}
    found[f"truncation: at {model.max_seq_length // 2} tokens"] = {"max_length": model.max_seq_length // 2}
    found["truncation: none"] = {"max_length": None}
    found["truncation: after the end token was added, cutting it"] = {"cut_after_end": True}
    return found


def _variant(model, sent: list[list[str]], n_queries: int, prompt: str, drop_prompt: bool = False,
             prompt_everywhere: bool = False, pooling: str | None = None, right_padding: bool = False,
             end_token: bool = True, max_length: int | None | str = "model",
             cut_after_end: bool = False) -> np.ndarray:  # fmt: skip
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
        if prompt_everywhere:  # a server adding the query prompt to every input, on top of the client's
            batch = [prompt + t for t in batch]
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
    "query prompt on every text": "the server adds the query prompt to every input, documents included (TEI "
    "started with --default-prompt-name query): start it without a default prompt; the client prompts queries",
    "not normalised": "normalise on the server (llama-server: --embd-normalize 2, its default) or on the client",
    "chat template not applied": "the model renders every text through its tokenizer's chat template and the "
    "server embeds the plain text",
}


def _cause(scores: dict[str, float], threshold: float) -> str:
    """The hypothesis under which the least alike text comes closest to the target (a hypothesis that explains
    every text has min cosine ~1), with the fix; "precision" when none beats the model as trained, or the best
    explains little of the gap (the target computes the same thing, less exactly)."""
    best, trained = max(scores, key=scores.get), scores["as trained"]
    # a hypothesis that explains only part must close at least half the gap to 1: a few texts a little nearer
    # (int8 arithmetic's outliers) are no known mistake
    if best == "as trained" or scores[best] < threshold and scores[best] - trained < (1 - trained) / 2:
        return (f"precision: no known mistake explains it better than the model as trained (min cosine "
                f"{trained:.4f}); the target computes the same thing less exactly")  # fmt: skip
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


def served_pair(model, query: str, doc: str, instruction: str | None = None) -> tuple[str, str]:
    """The two texts a client sends to a server that does not template them (vLLM's /score): a causal-LM
    reranker's prompt split at the document (Qwen's query and document templates, as vLLM's Qwen3-Reranker
    example sends them); a cross-encoder's raw texts."""
    from .encode import WEB_SEARCH_TASK
    from .rerank import PREFIX, SUFFIX, is_causal

    if not is_causal(model):
        return query, doc
    task = WEB_SEARCH_TASK if instruction is None else instruction.strip()
    return f"{PREFIX}<Instruct>: {task}\n<Query>: {query}\n", f"<Document>: {doc}{SUFFIX}"


def _scores_over_http(url: str, model, pairs, instruction, served_model, templated: bool) -> np.ndarray:
    got = []
    for query, docs in pairs:
        if templated:
            sent = [served_pair(model, query, d, instruction) for d in docs]
            query, docs = sent[0][0], [d for _, d in sent]
        got.extend(consumer.http_rerank(url, query, docs, served_model))
    return np.asarray(got, dtype=np.float64)


def check_reranker(model_dir: str | Path, target, *, instruction: str | None = None, precision: str | None = None,
                   served_model: str | None = None, model=None, client_template: bool | None = None,
                   llama_server: str | None = "build") -> Parity:  # fmt: skip
    """Compare P(relevant) of the trained reranker (`model_dir` read by plain sentence-transformers' CrossEncoder
    in its own process) and of `target`: an exported ONNX folder, a .gguf file (served by `llama_server`
    --reranking), a rerank/score URL or a function (query, documents) -> scores. `client_template`: whether the
    client wraps a causal reranker's texts in Qwen's template (None: for vLLM's /score only; llama.cpp's
    /v1/rerank applies the template stored in the GGUF itself; vLLM's /v1/rerank needs True)."""
    from .rerank import instruction_prompt, is_causal, load_reranker

    model = model or load_reranker(str(model_dir))
    precision = precision or _guess_precision(target)
    pairs = rerank_pairs()
    flat = [(q, d) for q, docs in pairs for d in docs]
    result = Parity(target=_name(target), kind="reranker", precision=precision, threshold=RERANK_THRESHOLDS[precision],
                    n_queries=len(pairs), n_documents=len(flat))  # fmt: skip
    prompt = instruction_prompt(model, instruction)
    try:
        ref = np.asarray(consume("cross-encoder", model_dir, {"pairs": flat, "prompt": prompt})["scores"])
        if callable(target):
            got = np.asarray([s for q, docs in pairs for s in target(q, docs)], dtype=np.float64)
        elif _is_url(target):
            templated = str(target).rstrip("/").endswith("/score") if client_template is None else client_template
            templated = templated and is_causal(model)
            got = _scores_over_http(str(target), model, pairs, instruction, served_model, templated)
        elif Path(target).suffix == ".gguf":
            binary = llama_cpp.find_server(llama_server)
            with llama_cpp.serve(binary, target, length=model.max_seq_length, rerank=True) as url:
                got = _scores_over_http(url + "/v1/rerank", model, pairs, instruction, served_model, False)
        else:
            got = np.asarray(consume("onnx-rerank", target, {"pairs": flat, "instruction": instruction})["scores"])
    except (TargetError, llama_cpp.NoLlamaCpp, RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        result.error = str(e)
        return result
    from scipy.stats import spearmanr

    n = len(pairs[0][1])
    diff = np.abs(ref - got)
    # Order is judged up to near-ties: candidates whose P(yes) the target moved by no more than the float threshold
    # keep the model's score (a random model's candidates sit within 1e-4 of each other and swap under f16 or int8).
    ordered = np.where(diff <= RERANK_THRESHOLDS["float"], ref, got).reshape(-1, n)
    ref_q = ref.reshape(-1, n)
    spearman = [1.0 if np.ptp(r) == 0 and np.ptp(g) == 0 else float(np.nan_to_num(spearmanr(r, g).statistic))
                for r, g in zip(ref_q, ordered, strict=True)]  # fmt: skip
    result.max_abs_diff = round(float(diff.max()), 6)
    result.min_spearman = round(min(spearman), 4)
    result.identical, result.overlap = _top_k_agreement(ref_q, ordered, tie=RERANK_THRESHOLDS["float"], k=RERANK_TOP)
    result.passed = bool(diff.max() <= result.threshold and result.min_spearman >= MIN_SPEARMAN
                         and result.identical >= MIN_IDENTICAL)  # fmt: skip
    if not result.passed:
        if got.min() < 0 or got.max() > 1:
            result.cause = ("scores are not probabilities: the server returns raw logits (TEI: raw_scores=false; "
                            "a Qwen3 reranker's P(yes) is the softmax of its yes/no logits)")  # fmt: skip
        else:
            result.cause = (f"scores differ (median abs difference {statistics.median(diff):.4f}, lowest Spearman "
                            f"{result.min_spearman:.3f}): the server scores other texts or another model (template, "
                            "instruction, truncation) - or, if small, less exactly")  # fmt: skip
    return result
