"""Notebook 01: synthetic training queries for a bare corpus, filtered, in BEIR layout, resumable.

`run_dir/synthetic/generations.jsonl` is the journal: one line per processed document (prompt, raw reply, each
candidate query with every filter's verdict, tokens spent so far), appended batch by batch. At the end
`queries.jsonl`, `qrels/train.tsv` and `stats.json` are built from it atomically; a rerun skips the documents
already journaled and builds them again. Per-document randomness is seeded by the document id, so an
interrupted run and an uninterrupted one end with the same files.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import POSITIVE, Reuse, Rule, StepConfig, at_least, between
from .data import BeirData, normalize_text
from .encode import corpus_embeddings, encode
from .files import atomic_path, write_json
from .generators import (
    UNSUPERVISED,
    Endpoint,
    GeneratorError,
    LocalLM,
    PromptConfig,
    build_prompt,
    crop,
    ict,
    judge_prompt,
    parse_queries,
    parse_score,
    prose,
)
from .rundir import RunDir, data_fingerprint, make_manifest, model_fingerprint

FILTERS = ("length", "cosine", "round_trip", "judge", "duplicate")  # in the order they run
METHODS = {"ict": "inverse cloze task (no LLM)", "crop": "independent cropping (no LLM)",
           "prose": "prose inside code (no LLM)"}


@dataclass(kw_only=True)
class SynthConfig(StepConfig, Reuse, PromptConfig):
    # base_model is the embedder of the cosine and round-trip filters
    # "" (nothing to do) | ict | crop | prose (code) | openai:<model> | a causal LM folder, hub name, .gguf
    generator_model: str = ""
    # A seeded sample of the corpus; None: every document. "auto": 1,000 for an LLM (time, tokens); 5,000 for
    # ict/crop/prose, which cost nothing to generate (the filters and the training still take their time).
    max_documents: int | str | None = "auto"
    batch_size: int = 16  # documents per batch (and per journal write)
    trust_remote_code: bool = False  # for a local generator whose code lives in its folder; only if you trust it
    # OpenAI-compatible endpoint; the key is read from the environment only
    base_url: str | None = None  # None: $OPENAI_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    max_total_tokens: int | None = None  # stop once this many tokens (prompt + reply) are spent
    temperature: float = 0.7  # the endpoint's; the in-process LM decodes greedily, so a resumed run is identical
    max_new_tokens: int = 256
    # filters (None: off)
    min_chars: int = 8
    max_chars: int = 512
    # Base embedder's cosine between query and its document. "auto": the guide's 0.7 for LLM queries, off for
    # ict/crop, whose query is a span of the document: a floor there keeps only the spans the base model
    # already matches, and most of them go (docs/BENCHMARKS.md). The round trip still applies to them.
    min_cosine: float | str | None = "auto"
    round_trip_k: int | None = 5  # the document must be in the base embedder's top k for its query
    judge_min_score: int | None = None  # LLM-as-judge: keep queries it rates at least this (1-5)

    RULES = {"max_documents": Rule(lambda v: v == "auto" or (not isinstance(v, str) and v >= 1),
                                   '"auto", None (every document) or a number of at least 1'),
             "batch_size": at_least(1), "concurrency": at_least(1), "timeout": POSITIVE, "max_retries": at_least(0),
             "max_total_tokens": at_least(1), "temperature": at_least(0), "max_new_tokens": at_least(1),
             "min_chars": at_least(0), "max_chars": at_least(1),
             "min_cosine": Rule(lambda v: v == "auto" or (not isinstance(v, str) and -1 <= v <= 1),
                                '"auto", None (off) or a cosine from -1 to 1'),
             "round_trip_k": at_least(1), "judge_min_score": between(1, 5)}  # fmt: skip


def cosine_floor(config: SynthConfig) -> float | None:
    """The minimum query-document cosine in force (`min_cosine` with "auto" resolved)."""
    if config.min_cosine == "auto":
        return None if config.generator_model in UNSUPERVISED else 0.7
    if isinstance(config.min_cosine, str):
        raise ValueError(f'min_cosine must be a number, None or "auto", not {config.min_cosine!r}')
    return config.min_cosine


def make_generator(config: SynthConfig):
    """None for the no-LLM methods, else an object with `generate(prompts) -> replies`."""
    name = config.generator_model
    if name in UNSUPERVISED:
        if config.judge_min_score is not None:
            raise GeneratorError(f"judge_min_score needs an LLM; generator={name!r} has none")
        return None
    if name.startswith("openai:"):
        base_url = config.base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise GeneratorError("set OPENAI_BASE_URL (or base_url) to the endpoint, e.g. http://localhost:8000/v1")
        return Endpoint(
            base_url,
            name.removeprefix("openai:"),
            api_key=os.environ.get(config.api_key_env),
            concurrency=config.concurrency,
            timeout=config.timeout,
            max_retries=config.max_retries,
            temperature=config.temperature,
            max_tokens=config.max_new_tokens,
        )
    return LocalLM(name, config.max_new_tokens, 0.0, config.trust_remote_code)


def select_documents(data: BeirData, config: SynthConfig) -> list[str]:
    ids = sorted(data.corpus)
    limit = config.max_documents
    if limit == "auto":
        limit = 5000 if config.generator_model in UNSUPERVISED else 1000
    if limit and len(ids) > limit:
        ids = sorted(random.Random(config.seed).sample(ids, limit))
    return ids


def read_journal(path: Path) -> list[dict]:
    """The journal's complete lines; a partial last line (a kill mid-write) is cut off."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line]


def _candidates(doc_id, data, config, generator, rng, reply):
    """(query, view, form) for each query of one document: from the reply, or by ICT/cropping without an LLM."""
    n = config.queries_per_doc
    if generator is None:
        method = {"ict": ict, "crop": crop, "prose": prose}[config.generator_model]
        made = [method(data.corpus[doc_id], rng) for _ in range(n)]
        return [m for m in made if m]
    return [(q, None, "llm") for q in parse_queries(reply)[:n]]


def _filter(rows, seen, model, doc_emb, row_of, config, generator):
    """Set each candidate's verdicts; the first filter that rejects it is `dropped_by`. Duplicates are checked
    last, against kept queries only, so a query that failed for one document may still serve another."""
    pending = []
    for row in rows:
        for cand in row["queries"]:
            if config.min_chars <= len(cand["query"]) <= config.max_chars:
                pending.append((row, cand))
            else:
                cand["dropped_by"] = "length"
    if pending and doc_emb is not None:
        emb = encode(model, [c["query"] for _, c in pending], "query", config.instruction, progress=False)
        scores = emb @ doc_emb.T
        for (row, cand), s in zip(pending, scores, strict=True):
            own = s[row_of[row["doc_id"]]]
            cand["cosine"] = round(float(own), 6)
            cand["rank"] = int((s > own).sum()) + 1
            floor = cosine_floor(config)
            if floor is not None and own < floor:
                cand["dropped_by"] = "cosine"
            elif config.round_trip_k is not None and cand["rank"] > config.round_trip_k:
                cand["dropped_by"] = "round_trip"
        pending = [(r, c) for r, c in pending if "dropped_by" not in c]
    if pending and config.judge_min_score is not None:
        replies = generator.generate([judge_prompt(c["query"], r["document"]) for r, c in pending])
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:  # an unreachable judge must not look like a rejection
            raise failed
        for (_, cand), reply in zip(pending, replies, strict=True):
            cand["judge"] = parse_score(reply)
            if cand["judge"] is None or cand["judge"] < config.judge_min_score:
                cand["dropped_by"] = "judge"
    for row in rows:
        for cand in row["queries"]:
            if "dropped_by" not in cand:
                key = normalize_text(cand["query"])
                cand["dropped_by"] = "duplicate" if key in seen else None
                seen.add(key)


def summarise(journal: list[dict], config: SynthConfig) -> dict:
    dropped = [c["dropped_by"] for row in journal for c in row["queries"]]
    forms = {}  # per piece the queries were cut from (sentences, lines, words, characters; llm): made, kept
    for c in (c for row in journal for c in row["queries"]):
        counts = forms.setdefault(c.get("form", "llm"), {"made": 0, "kept": 0})
        counts["made"] += 1
        counts["kept"] += c["dropped_by"] is None
    return {
        "generator": METHODS.get(config.generator_model, config.generator_model),
        "documents": len(journal),
        "documents_without_queries": sum(not row["queries"] for row in journal),
        "by_form": forms,
        "generated": len(dropped),
        "removed": {f: dropped.count(f) for f in FILTERS},
        "kept": dropped.count(None),
        "tokens_used": journal[-1]["tokens_total"] if journal else 0,
        "config": asdict(config),
    }


def write_beir(journal: list[dict], folder: Path) -> None:
    """queries.jsonl (with the training view of the document when it is not the whole document) and
    qrels/train.tsv, from the journal's kept queries."""
    queries, qrels = [], ["query-id\tcorpus-id\tscore"]
    for row in journal:
        for i, cand in enumerate(row["queries"]):
            if cand["dropped_by"] is None:
                qid = f"{row['doc_id']}#{i}"
                view = cand.get("view") or {}
                queries.append({"_id": qid, "text": cand["query"], **{f"view_{k}": v for k, v in view.items()}})
                qrels.append(f"{qid}\t{row['doc_id']}\t1")
    if not queries:  # an empty BEIR split is invalid: leave no files, and training says what is missing
        for path in (folder / "queries.jsonl", folder / "qrels" / "train.tsv"):
            path.unlink(missing_ok=True)
        return
    with atomic_path(folder / "queries.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries), encoding="utf-8")
    with atomic_path(folder / "qrels" / "train.tsv") as tmp:
        tmp.write_text("\n".join(qrels) + "\n", encoding="utf-8")


# Settings that change how fast or how far generation goes, not what it makes for a document.
NOT_SHAPING = {"data_dir", "run_dir", "base_model", "batch_size", "concurrency", "timeout", "max_retries",
               "max_total_tokens", "base_url", "api_key_env", "reuse", "trust_remote_code"}  # fmt: skip


def manifest(config: SynthConfig, model_path: str) -> dict:
    """What `run_dir/synthetic/` is made from: the data, the filters' embedder, the generator, the settings."""
    generator = config.generator_model
    local = generator not in UNSUPERVISED and not generator.startswith("openai:") and os.path.exists(generator)
    inputs = {"data": data_fingerprint(config.data_dir), "base_model": model_fingerprint(model_path),
              "generator": model_fingerprint(generator) if local else generator}  # fmt: skip
    return make_manifest(inputs, {k: v for k, v in asdict(config).items() if k not in NOT_SHAPING})


def generate(model, model_path: str, data: BeirData, config: SynthConfig, generator=None) -> dict:
    """Generate, filter and write `run_dir/synthetic/`; resumes from its journal when it was made from the same
    inputs and settings (else starts over, or stops with `reuse="error"`). Returns the stats."""
    from tqdm.auto import tqdm

    run = RunDir(config.run_dir)
    folder = run.synthetic
    made_from = manifest(config, model_path)
    run.reusable("synthetic", made_from, config.reuse, [folder])
    folder.mkdir(parents=True, exist_ok=True)
    run.record("synthetic", made_from)  # the journal below is continued only under this record
    journal_path = folder / "generations.jsonl"
    journal = read_journal(journal_path)
    tokens_before = journal[-1]["tokens_total"] if journal else 0
    if generator is None and config.generator_model not in UNSUPERVISED:
        generator = make_generator(config)
    done = {row["doc_id"] for row in journal}
    todo = [d for d in select_documents(data, config) if d not in done]
    seen = {normalize_text(c["query"]) for row in journal for c in row["queries"] if c["dropped_by"] is None}
    docs = data.doc_texts(config.doc_template)
    doc_emb = row_of = None
    if todo and (cosine_floor(config) is not None or config.round_trip_k is not None):
        doc_emb = corpus_embeddings(model, model_path, data, config.run_dir, config.doc_template)
        row_of = {d: i for i, d in enumerate(docs)}

    def tokens():
        return tokens_before + getattr(generator, "tokens_used", 0)

    bar = tqdm(total=len(todo) + len(done), initial=len(done), desc="Documents")
    kept = sum(c["dropped_by"] is None for row in journal for c in row["queries"])
    dropped = sum(len(row["queries"]) for row in journal) - kept
    for start in range(0, len(todo), config.batch_size):
        if config.max_total_tokens is not None and tokens() >= config.max_total_tokens:
            print(f"token budget of {config.max_total_tokens:,} spent; stopping (raise it and rerun to go on)")
            break
        batch = todo[start : start + config.batch_size]
        rngs = [random.Random(f"{config.seed}:{d}") for d in batch]
        failed = None
        if generator is None:
            prompts = replies = [None] * len(batch)
        else:
            prompts = [build_prompt(docs[d], config, r) for d, r in zip(batch, rngs, strict=True)]
            replies = generator.generate(prompts)
            # The replies that arrived are journaled before a failed request stops the run (rerun to resume).
            answered = [i for i, r in enumerate(replies) if not isinstance(r, Exception)]
            failed = next((r for r in replies if isinstance(r, Exception)), None)
            batch, rngs, prompts, replies = ([x[i] for i in answered] for x in (batch, rngs, prompts, replies))
        rows = []
        for doc_id, rng, prompt, reply in zip(batch, rngs, prompts, replies, strict=True):
            made = _candidates(doc_id, data, config, generator, rng, reply)
            rows.append(
                {
                    "doc_id": doc_id,
                    "document": docs[doc_id],
                    "generator": METHODS.get(config.generator_model, config.generator_model),
                    "prompt": prompt,
                    "reply": reply,
                    "queries": [{"query": q, "form": form, **({"view": v} if v else {})} for q, v, form in made],
                }
            )
        _filter(rows, seen, model, doc_emb, row_of, config, generator)
        for row in rows:
            row["tokens_total"] = tokens()
        with open(journal_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        journal += rows
        batch_kept = sum(c["dropped_by"] is None for row in rows for c in row["queries"])
        kept, dropped = kept + batch_kept, dropped + sum(len(row["queries"]) for row in rows) - batch_kept
        bar.update(len(batch))
        bar.set_postfix(kept=kept, dropped=dropped)
        if failed is not None:
            bar.close()
            raise failed
    bar.close()
    stats = summarise(journal, config)
    write_beir(journal, folder)
    write_json(folder / "stats.json", stats)
    if journal and not stats["kept"]:
        removed = ", ".join(f"{n} by {f}" for f, n in stats["removed"].items() if n)
        raise GeneratorError(f"no synthetic query passed the filters ({stats['generated']} made for "
                             f"{stats['documents']} documents; removed {removed or 'none: no query parsed'}): loosen "
                             "min_cosine or round_trip_k, or use another generator")  # fmt: skip
    return stats
