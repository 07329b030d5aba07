"""Rerankers: Qwen3-Reranker (a causal LM read at its `yes`/`no` logits) and any sentence-transformers
CrossEncoder, both loaded as a sentence-transformers `CrossEncoder`.

For a causal LM, sentence-transformers scores a (query, document) pair with its `LogitScore` module:
logit(yes) - logit(no) at the last position, left padded; the CrossEncoder's sigmoid turns that into
exp(yes) / (exp(yes) + exp(no)) = P(yes), exactly Qwen's score. The prompt comes from the tokenizer's chat
template with `query` and `document` roles; `CHAT_TEMPLATE` below renders Qwen3-Reranker's official prompt
and is saved with every model we write, so training and scoring can never use two different templates.
Batching, length sorting and the progress bar are sentence-transformers' `predict`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .encode import WEB_SEARCH_TASK

SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# PREFIX + "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}" + SUFFIX (the model card's
# `format_instruction`). A system message, which sentence-transformers makes of `predict(..., prompt=...)`, is the
# instruction, trimmed (see `instruction_prompt`); a lone text (sentence-transformers' model card
# statistics render single columns) is the query. Message content may be a string or text parts.
CHAT_TEMPLATE = (
    "{%- macro text(m) -%}{%- if m.content is string -%}{{ m.content }}{%- else -%}{{ m.content[0].text }}"
    "{%- endif -%}{%- endmacro -%}"
    f"{{%- set ns = namespace(instruction={_jinja_string(WEB_SEARCH_TASK)}, query='', document='') -%}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{%- set ns.instruction = text(m) | trim -%}"
    "{%- elif m.role == 'document' -%}{%- set ns.document = text(m) -%}"
    "{%- elif ns.query == '' -%}{%- set ns.query = text(m) -%}{%- endif -%}"
    "{%- endfor -%}"
    f"{{{{ {_jinja_string(PREFIX + '<Instruct>: ')} }}}}{{{{ ns.instruction }}}}"
    "{{ '\\n<Query>: ' }}{{ ns.query }}{{ '\\n<Document>: ' }}{{ ns.document }}"
    f"{{{{ {_jinja_string(SUFFIX)} }}}}"
)


def instruction_prompt(model, instruction: str | None) -> str | None:
    """The `prompt` for `predict` and training: None keeps the model's own instruction (Qwen's web-search task);
    "" leaves the instruct line empty, sent as a lone space because sentence-transformers drops an empty prompt
    and the template trims it; a cross-encoder takes no instruction."""
    if instruction is None or not is_causal(model):
        return None
    return instruction or " "


def is_causal(model) -> bool:
    from sentence_transformers.cross_encoder.modules import LogitScore

    return any(isinstance(m, LogitScore) for m in model)


def is_causal_lm(path: str, trust_remote_code=False) -> bool:
    """Whether the folder (or the base of a LoRA adapter folder) holds a causal LM rather than a cross-encoder."""
    from transformers import AutoConfig

    adapter = Path(path) / "adapter_config.json"
    config_path = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.exists() else path
    architectures = AutoConfig.from_pretrained(config_path, trust_remote_code=trust_remote_code).architectures or []
    return any(a.endswith("ForCausalLM") for a in architectures)


def load_reranker(name: str, device: str | None = None, max_length: int = 1024, trust_remote_code=False, **kw):
    """A CrossEncoder for a Qwen3-Reranker-style causal LM (given the official template) or any
    sentence-transformers cross-encoder; `predict` returns P(relevant) in [0, 1]."""
    from sentence_transformers import CrossEncoder

    from .models import resolve

    path = resolve(name, "RERANKER")
    if is_causal_lm(path, trust_remote_code):
        # At load time: sentence-transformers decides then whether pairs become chat messages. A template
        # set later leaves them as plain text, and the model silently scores "querydocument".
        kw["processor_kwargs"] = {**kw.get("processor_kwargs", {}), "chat_template": CHAT_TEMPLATE}
    model = CrossEncoder(path, device=device, max_length=max_length, trust_remote_code=trust_remote_code, **kw)
    if model.tokenizer.pad_token is None:  # many chat LMs ship without one; batches need it (left padding)
        model.tokenizer.pad_token = model.tokenizer.eos_token
    return model


def rerank(model, queries: dict[str, str], run: dict[str, dict[str, float]], docs: dict[str, str], top_k: int = 100,
           instruction: str | None = None, batch_size: int = 16) -> dict[str, dict[str, float]]:  # fmt: skip
    """Re-score each query's top `top_k` documents of `run` with the reranker; returns the new run. The
    documents below `top_k` follow in their first-stage order (scores below any reranked one), so a shallow
    rerank keeps the first stage's recall at depth."""
    pairs, keys, rest = [], [], {}
    for qid, ranked in run.items():
        order = sorted(ranked, key=ranked.get, reverse=True)
        for did in order[:top_k]:
            pairs.append((queries[qid], docs[did]))
            keys.append((qid, did))
        rest[qid] = order[top_k:]
    prompt = instruction_prompt(model, instruction)
    scores = model.predict(pairs, batch_size=batch_size, show_progress_bar=True, prompt=prompt) if pairs else []
    out: dict[str, dict[str, float]] = {qid: {} for qid in run}
    for (qid, did), s in zip(keys, scores, strict=True):
        out[qid][did] = float(s)
    for qid, tail in rest.items():
        floor = min(out[qid].values(), default=0.0)
        out[qid].update({did: floor - 1.0 - i for i, did in enumerate(tail)})
    return out


def fuse_scores(first: dict[str, dict[str, float]], reranked: dict[str, dict[str, float]], weight: float,
                top_k: int = 100) -> dict[str, dict[str, float]]:  # fmt: skip
    """The two-stage score: `weight` x the reranker's score + (1 - weight) x the first stage's, each min-max
    normalised over the query's reranked top `top_k`; below it the first stage's order, as in `rerank`. Weight 0
    gives back the first stage, so a reranker that does not help on dev cannot make the system worse."""

    def normalised(values: list[float]) -> list[float]:
        low, high = min(values, default=0.0), max(values, default=0.0)
        return [(v - low) / (high - low) if high > low else 0.0 for v in values]

    out = {}
    for qid, ranked in first.items():
        order = sorted(ranked, key=ranked.get, reverse=True)
        top, tail = order[:top_k], order[top_k:]
        f, r = normalised([ranked[d] for d in top]), normalised([reranked[qid][d] for d in top])
        out[qid] = {d: weight * b + (1 - weight) * a for d, a, b in zip(top, f, r, strict=True)}
        floor = min(out[qid].values(), default=0.0)
        out[qid].update({d: floor - 1.0 - i for i, d in enumerate(tail)})
    return out
