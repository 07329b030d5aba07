"""How a consumer reads an exported model: the client code SERVING.md prints, verbatim, and nothing of embtune.

This file imports no other module of this package, on purpose: it is the other side of the served = trained
check (`embtune.serving`), so it must not share code that could repair a broken export on the way. It is copied
into SERVING.md as it is, and the check runs it as a script in a process of its own.

- `OnnxEmbedder(folder)`: an exported ONNX folder read with `tokenizers` (the folder's tokenizer.json, its
  truncation length and padding side), onnxruntime over `onnx/model.onnx`, and the pooling and normalisation
  the folder declares (modules.json, 1_Pooling/config.json, 2_Normalize).
- `http_embed(url, texts)`: any OpenAI-compatible `/v1/embeddings` server (TEI, vLLM, llama.cpp, Ollama), in
  batches of at most 32 (TEI's default max_client_batch_size), with a timeout and retries.
- `clipper(folder)`: cuts a text where the model truncates it, so a server with other limits embeds what the
  model embedded.
- `OnnxReranker(folder)`: an exported reranker with onnxruntime: a Qwen3-Reranker-style causal LM with the model
  card's prompt (P(yes) from the yes/no logits), or a cross-encoder.
- `http_rerank(url, query, documents)`: a `/v1/rerank` (llama.cpp, Cohere-style), `/rerank` (TEI) or `/score`
  (vLLM) endpoint; the scores as the server returns them.
- `reference(folder, queries, documents)`, `reference_scores(folder, pairs)`: plain sentence-transformers, the
  source of truth.

As a script (what the check runs): `python consumer.py KIND SOURCE < request.json > reply.json`, KIND one of
`onnx`, `onnx-rerank`, `http`, `sentence-transformers`, `cross-encoder`; the request and reply are JSON (see `main`).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

BATCH = 32  # TEI refuses more than 32 inputs a request by default (max_client_batch_size)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _pooling_mode(config: dict) -> str:
    """sentence-transformers writes `pooling_mode` (v6) or one `pooling_mode_<mode>` flag set to true (before)."""
    if "pooling_mode" in config:
        return config["pooling_mode"]
    legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
              "pooling_mode_lasttoken": "lasttoken"}  # fmt: skip
    return next((mode for key, mode in legacy.items() if config.get(key)), "mean")


def _max_length(folder: Path) -> int | None:
    return _read(folder / "sentence_bert_config.json").get("max_seq_length") or _read(
        folder / "tokenizer_config.json").get("model_max_length")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- ONNX


class OnnxEmbedder:
    """An exported folder (`onnx/model.onnx` beside the model's configuration files) read with onnxruntime."""

    def __init__(self, folder: str | Path, threads: int = 0):
        import onnxruntime
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        length = _max_length(folder)
        if length:  # the tokenizer keeps the tokens it adds (the end token) when it truncates
            self.tokenizer.enable_truncation(length)
        config = _read(folder / "tokenizer_config.json")
        pad = config.get("pad_token") or "<pad>"
        pad = pad["content"] if isinstance(pad, dict) else pad
        self.tokenizer.enable_padding(direction=config.get("padding_side", "right"), pad_token=pad,
                                      pad_id=self.tokenizer.token_to_id(pad) or 0)  # fmt: skip
        self.pooling, self.normalize = None, False
        for module in json.loads((folder / "modules.json").read_text()):
            kind = module["type"].rsplit(".", 1)[-1]
            if kind == "Pooling":
                self.pooling = _pooling_mode(_read(folder / module["path"] / "config.json"))
            elif kind == "Normalize":
                self.normalize = True
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(folder / "onnx" / "model.onnx"), options)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.concatenate([self._batch(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)])

    def _batch(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}  # fmt: skip
        (hidden,) = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})[:1]
        mask = feeds["attention_mask"]
        if self.pooling == "lasttoken":  # the last real token, wherever the padding is (as sentence-transformers)
            last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
            vectors = hidden[np.arange(len(hidden)), last]
        elif self.pooling == "cls":
            vectors = hidden[:, 0]
        elif self.pooling == "mean":
            vectors = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        else:
            raise ValueError(f"pooling {self.pooling!r}: this client reads cls, mean and lasttoken")
        if self.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(np.float32)


# Qwen3-Reranker's prompt, from its model card (format_instruction, prefix, suffix): copied, not imported, so that
# this side stays independent of the code that trained the model.
RERANK_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                 'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_TASK = "Given a web search query, retrieve relevant passages that answer the query"


class OnnxReranker:
    """An exported reranker folder read with onnxruntime: a Qwen3-Reranker-style causal LM (the model card's
    prompt, P(yes) = softmax of the yes/no logits at the last position, left padded) or a cross-encoder
    (query and document as a pair, sigmoid of its one logit)."""

    def __init__(self, folder: str | Path, threads: int = 0):
        import onnxruntime
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.causal = any(a.endswith("ForCausalLM") for a in _read(folder / "config.json").get("architectures", []))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()
        config = _read(folder / "tokenizer_config.json")
        pad = config.get("pad_token") or "<|endoftext|>"
        pad = pad["content"] if isinstance(pad, dict) else pad
        side = "left" if self.causal else config.get("padding_side", "right")  # the graph reads the last position
        self.tokenizer.enable_padding(direction=side, pad_token=pad, pad_id=self.tokenizer.token_to_id(pad) or 0)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(folder / "onnx" / "model.onnx"), options)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.yes, self.no = self.tokenizer.token_to_id("yes"), self.tokenizer.token_to_id("no")

    def scores(self, pairs: list[list[str]], instruction: str | None = None) -> np.ndarray:
        task = RERANK_TASK if instruction is None else instruction.strip()
        out = []
        for i in range(0, len(pairs), BATCH):
            batch = pairs[i : i + BATCH]
            if self.causal:
                texts = [f"{RERANK_PREFIX}<Instruct>: {task}\n<Query>: {q}\n<Document>: {d}{RERANK_SUFFIX}"
                         for q, d in batch]  # fmt: skip
                encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            else:
                encodings = self.tokenizer.encode_batch([tuple(p) for p in batch])
            feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                     "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                     "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}  # fmt: skip
            (logits,) = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})[:1]
            if self.causal:
                last = logits[:, -1]
                yes_no = np.stack([last[:, self.yes], last[:, self.no]], axis=1)
                yes_no = np.exp(yes_no - yes_no.max(1, keepdims=True))
                out.append(yes_no[:, 0] / yes_no.sum(1))
            else:
                out.append(1 / (1 + np.exp(-logits[:, 0])))
        return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------- HTTP


def _post(url: str, body: dict, timeout: float, retries: int):
    """POST JSON; a timeout, a refused connection or a 5xx is retried with a growing pause, a 4xx is not."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == retries:
                detail = e.read().decode(errors="replace")[:300]
                raise RuntimeError(f"{url} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == retries:
                raise RuntimeError(f"{url} did not answer: {getattr(e, 'reason', e)}") from None
        time.sleep(2**attempt)


def http_embed(url: str, texts: list[str], model: str | None = None, timeout: float = 60, retries: int = 2):
    """Vectors from an OpenAI-compatible server; `url` is its base (…/v1) or the full …/v1/embeddings."""
    url = url.rstrip("/")
    url = url if url.endswith("/embeddings") else url + "/embeddings"
    vectors = []
    for i in range(0, len(texts), BATCH):
        body = {"input": texts[i : i + BATCH], **({"model": model} if model else {})}
        data = _post(url, body, timeout, retries)["data"]
        vectors += [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]
    return np.array(vectors, dtype=np.float32)


def clipper(folder: str | Path):
    """clip(text): the text cut at the token where the model truncates (its max_seq_length, less the tokens
    the tokenizer adds), cut in the text so that any server then tokenizes and appends its end token itself."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    added = len(tokenizer.encode("a").ids) - len(tokenizer.encode("a", add_special_tokens=False).ids)
    keep = _max_length(folder) - added

    def clip(text: str) -> str:
        enc = tokenizer.encode(text, add_special_tokens=False)
        return text if len(enc.ids) <= keep else text[: enc.offsets[keep - 1][1]]

    return clip


def http_rerank(url: str, query: str, documents: list[str], model: str | None = None, timeout: float = 60,
                retries: int = 2) -> list[float]:  # fmt: skip
    """One score a document, in the documents' order: llama.cpp's, Cohere's and vLLM's /v1/rerank, TEI's
    /rerank (`raw_scores: false`: probabilities), vLLM's /score."""
    url = url.rstrip("/")
    named = {"model": model} if model else {}
    if url.endswith("/score"):
        rows = _post(url, {**named, "text_1": query, "text_2": documents}, timeout, retries)["data"]
        pairs = [(r["index"], r["score"]) for r in rows]
    elif url.endswith("/v1/rerank"):
        body = {**named, "query": query, "documents": documents, "top_n": len(documents)}
        pairs = [(r["index"], r["relevance_score"]) for r in _post(url, body, timeout, retries)["results"]]
    else:
        body = {"query": query, "texts": documents, "raw_scores": False}
        pairs = [(r["index"], r["score"]) for r in _post(url, body, timeout, retries)]
    scores = [0.0] * len(documents)
    for i, score in pairs:
        scores[i] = float(score)
    return scores


# ---------------------------------------------------------------------------------------------------- reference


def reference(folder: str | Path, queries: list[str], documents: list[str], prompt: str | None = None):
    """Plain sentence-transformers on the model folder: queries with the model's own query prompt (or `prompt`),
    documents with its document prompt, exactly as `encode_query` / `encode_document` do. In float32: a bf16
    checkpoint computed in bf16 on a CPU drifts by itself in left-padded batches (SmolLM2: min cosine 0.964 against
    its float32 ONNX export, which equals float32 torch), and that noise is no property of the trained model."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", model_kwargs={"dtype": torch.float32})
    q = model.encode(queries, prompt=prompt) if prompt is not None else model.encode_query(queries)
    return q, model.encode_document(documents)


def reference_scores(folder: str | Path, pairs: list[list[str]], prompt: str | None = None) -> list[float]:
    """Plain sentence-transformers' CrossEncoder on the reranker folder: P(relevant) of each (query, document)."""
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(folder), device="cpu", model_kwargs={"dtype": torch.float32})  # as `reference`
    return model.predict([tuple(p) for p in pairs], prompt=prompt, show_progress_bar=False).tolist()


def main(argv: list[str]) -> None:
    """Request on stdin, reply on stdout, both JSON:
    onnx FOLDER / http URL: {"texts": [...], "model": name?} -> {"vectors": [[...]]}
    onnx-rerank FOLDER: {"pairs": [[q, d]], "instruction"?} -> {"scores": [...]}
    sentence-transformers FOLDER: {"queries", "documents", "prompt"?} -> {"queries": [[...]], "documents": [[...]]}
    cross-encoder FOLDER: {"pairs": [[q, d]], "prompt"?} -> {"scores": [...]}"""
    kind, source = argv
    request = json.load(sys.stdin)
    out, sys.stdout = sys.stdout, sys.stderr  # whatever the libraries print, stdout carries the reply alone
    if kind == "onnx":
        reply = {"vectors": OnnxEmbedder(source).embed(request["texts"]).tolist()}
    elif kind == "onnx-rerank":
        reply = {"scores": OnnxReranker(source).scores(request["pairs"], request.get("instruction")).tolist()}
    elif kind == "http":
        reply = {"vectors": http_embed(source, request["texts"], request.get("model")).tolist()}
    elif kind == "sentence-transformers":
        q, d = reference(source, request["queries"], request["documents"], request.get("prompt"))
        reply = {"queries": q.tolist(), "documents": d.tolist()}
    elif kind == "cross-encoder":
        reply = {"scores": reference_scores(source, request["pairs"], request.get("prompt"))}
    else:
        raise SystemExit(f"unknown kind {kind!r}: onnx, onnx-rerank, http, sentence-transformers or cross-encoder")
    reply["imported_embtune"] = any(name.split(".")[0] == "embtune" for name in sys.modules)
    json.dump(reply, out)


if __name__ == "__main__":
    main(sys.argv[1:])
