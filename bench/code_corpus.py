"""Corpus-only training on source code: do the no-LLM generators cover a corpus without sentence punctuation, and
does training on their pairs pay? all-MiniLM-L6-v2 on functions of the Python standard library, CPU, no labels.

The corpus is this interpreter's own standard library (offline): every function or method whose docstring's first
sentence has at least 4 words and whose body, the docstring left out, is 3-60 lines. A document is the function's
source without its docstring (the `def` line kept, no title); its query is that first sentence. Identical queries
and identical documents are kept once. A seeded sample (seed 0) of `--documents` functions is the corpus, and
`--test-queries` of them get a label (query -> its function), `--dev-queries` of those in a dev split, as a user
who judged that many real queries would have (notebook 00); there is no train split, so training learns from
synthetic queries only, and the dev split chooses what ships (the slerp of base and trained model). For each
generator (inverse cloze task, cropping, prose inside code) notebook 01 writes pairs for every document with its
default filters and notebook 03's default recipe trains on them (no mined negatives). Goal: shipped - base >= 0
NDCG@10 on the test split for every generator, >= +0.02 for the best. Each system runs in its own process; numbers
go to docs/BENCHMARKS.md.

    python bench/code_corpus.py [--documents 3000] [--test-queries 300] [--dev-queries 100] [--generators ...]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DOCS, in_own_process, markdown_table, minilm_path, report, save_results, test_scores  # noqa: E402

SEQ = 256
SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages"}
COLUMNS = ["generator", "ndcg@10", "shipped - base", "t chosen on dev", "dev: trained against base", "mrr@10",
           "recall@100", "ndcg@10 as trained", "documents",
           "kept", "with a pair", "kept by form", "generate_s", "train_s"]  # fmt: skip


def first_sentence(docstring: str) -> str:
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s", paragraph, maxsplit=1)[0]


def functions(stdlib: Path):
    """(id, query, document) for each function of the standard library that passes the filters, in file order."""
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            docstring, doc = ast.get_docstring(node), node.body[0]
            if not docstring or doc.lineno == node.lineno or not 3 <= node.end_lineno - node.body[1].lineno + 1 <= 60:
                continue
            query = first_sentence(docstring)
            if len(query.split()) < 4:
                continue
            kept = lines[node.lineno - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
            yield f"{rel.as_posix()}:{node.lineno}", query, textwrap.dedent("\n".join(kept))


def build(folder: Path, documents: int, test_queries: int, dev_queries: int) -> dict:
    """Write the BEIR folder (corpus, the labelled queries, qrels/dev.tsv and test.tsv) and return its counts."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found, queries, texts = [], set(), set()
    for fid, query, text in functions(stdlib):
        if query not in queries and text not in texts:
            found.append((fid, query, text))
        queries.add(query)
        texts.add(text)
    sample = random.Random(0).sample(found, min(documents, len(found)))
    tested = random.Random(0).sample(sample, min(test_queries, len(sample)))
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f, "title": "", "text": t}) + "\n"
                                                 for f, _, t in sample), encoding="utf-8")  # fmt: skip
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q:{f}", "text": q}) + "\n"
                                                  for f, q, _ in tested), encoding="utf-8")  # fmt: skip
    for split, part in (("dev", tested[:dev_queries]), ("test", tested[dev_queries:])):
        labels = "".join(f"q:{f}\t{f}\t1\n" for f, _, _ in part)
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + labels, encoding="utf-8")
    return {"python": sys.version.split()[0], "functions": len(found), "documents": len(sample),
            "test_queries": len(tested) - dev_queries, "dev_queries": dev_queries}  # fmt: skip


def coverage(run_dir: Path, stats: dict) -> dict:
    """Share of documents with a kept pair, and kept / made queries by the form they were cut from."""
    journal = [json.loads(line) for line in (run_dir / "synthetic" / "generations.jsonl").open(encoding="utf-8")]
    covered = sum(any(c["dropped_by"] is None for c in row["queries"]) for row in journal)
    forms = ", ".join(f"{form} {n['kept']}/{n['made']}" for form, n in sorted(stats.get("by_form", {}).items()))
    return {"with a pair": round(covered / max(1, len(journal)), 4), "kept by form": forms,
            "without queries": stats.get("documents_without_queries"), "removed": stats.get("removed")}  # fmt: skip


def one(system: str, data_dir: Path, max_steps: int) -> dict:
    from embtune.data import load_beir
    from embtune.models import load_embedder
    from embtune.synthetic import SynthConfig, generate
    from embtune.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        base = minilm_path()
        if system == "base":
            return {"generator": "none (base model)", **test_scores(load_embedder(base), base, data_dir, run_dir)}
        start = time.perf_counter()
        config = SynthConfig(data_dir=str(data_dir), run_dir=str(run_dir), base_model=base, generator_model=system,
                             max_documents=None)  # fmt: skip
        stats = generate(load_embedder(base), base, load_beir(data_dir, limits="off"), config)
        row = {"generator": stats["generator"], "documents": stats["documents"], "kept": stats["kept"],
               "generate_s": round(time.perf_counter() - start, 1), **coverage(run_dir, stats)}  # fmt: skip
        if stats["kept"] < 2:
            return row  # nothing to train on (a batch needs two pairs)
        log = train(TrainConfig(base_model=base, data_dir=str(data_dir), run_dir=str(run_dir), max_seq_length=SEQ,
                                max_steps=max_steps))  # fmt: skip
        merged = str(run_dir / "model")
        scores = test_scores(load_embedder(merged), merged, data_dir, run_dir)
        # shipped: the slerp of base and trained model the dev split chose; the model as trained, for comparison
        finetuned = log["finetuned_model"]
        trained = test_scores(load_embedder(finetuned), finetuned, data_dir, run_dir)["ndcg@10"]
    return {**row, **scores, "ndcg@10 as trained": trained, "train_s": log["seconds"], "steps": log["steps"],
            "t chosen on dev": log["merge_with_base"], "dev: trained against base": dev_verdict(log)}  # fmt: skip


def dev_verdict(log: dict) -> str:
    """The dev split's evidence for the choice: NDCG@10 of the base (t = 0) and of the model as trained (t = 1),
    and the one-sided paired t-test's p that the trained model beats the base."""
    row = {p["t"]: p for p in log.get("merge_curve", [])}
    if 0.0 not in row or 1.0 not in row:
        return ""
    return f"{row[0.0]['ndcg@10']:.4f} → {row[1.0]['ndcg@10']:.4f} (p = {row[1.0]['p_vs_base']:.2f})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--test-queries", type=int, default=300)
    parser.add_argument("--dev-queries", type=int, default=100)
    parser.add_argument("--generators", nargs="+", default=["ict", "crop", "prose"])
    parser.add_argument("--max-steps", type=int, default=-1, help="cap on training steps (-1: the recipe's epochs)")
    parser.add_argument("--fresh", action="store_true", help="rerun every row, not only the missing ones")
    parser.add_argument("--one")
    parser.add_argument("--data", help="with --one: the BEIR folder the parent built (else built here)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data) if args.data else Path(tmp) / "data"
        corpus = None if args.data else build(data_dir, args.documents, args.test_queries, args.dev_queries)
        if args.one:
            report(one(args.one, data_dir, args.max_steps))
            return
        settings = {"documents": args.documents, "max_steps": args.max_steps, **corpus}
        saved = DOCS / "benchmarks" / "code_corpus.json"
        previous = json.loads(saved.read_text()) if saved.exists() and not args.fresh else {}
        # Each row is saved as it finishes; a rerun with the same settings keeps the finished rows.
        same = previous.get("settings") == settings
        done = {r["key"]: r for r in previous.get("rows", []) if "key" in r} if same else {}
        rows = []
        for system in ["base", *args.generators]:
            if system in done:
                rows.append(done[system])
                continue
            rows.append({"key": system, **in_own_process(__file__, system, "--data", str(data_dir), "--max-steps",
                                                         str(args.max_steps))})  # fmt: skip
            print(rows[-1], flush=True)
            save(rows, settings)
        save(rows, settings)


def save(rows: list[dict], settings: dict) -> None:
    base = next((r["ndcg@10"] for r in rows if r["key"] == "base"), None)
    for r in rows:
        if base is not None and r["key"] != "base" and "ndcg@10" in r:
            r["shipped - base"] = f"{r['ndcg@10'] - base:+.4f}"
    steps = "" if settings["max_steps"] < 0 else f", capped at {settings['max_steps']} steps"
    section = (
        "## Corpus-only training on source code: Python standard library functions\n\n"
        f"`bench/code_corpus.py`: the corpus is Python {settings['python']}'s own standard library (tests, idlelib, "
        f"lib2to3 and site-packages left out): of {settings['functions']:,} functions and methods whose docstring's "
        "first sentence has at least 4 words and whose body without the docstring is 3-60 lines (identical queries "
        f"and documents kept once), a seeded sample of {settings['documents']:,}. A document is the function's source "
        f"without its docstring; its query is that first sentence. {settings['dev_queries']} queries are labelled "
        "in a dev split, as if a person had judged them in notebook 00, and "
        f"{settings['test_queries']} in the test split that scores the table: no train labels, a corpus-only run. "
        "Code has little sentence punctuation, so the inverse cloze task cuts most documents by lines; cropping cuts "
        "words; `prose` takes a comment or a defined name split into words (the docstrings are the test queries, so "
        "not in the documents). For each generator notebook 01 writes pairs for every document with its default "
        f"filters (round trip top 5), then notebook 03's default recipe (max {SEQ} tokens, batch 32, 3 epochs{steps}, "
        "no mined negatives) trains on them, and the dev split chooses the slerp of base (t = 0) and trained model "
        "(t = 1) that ships (`t chosen on dev`; `dev: trained against base`: their dev NDCG@10 and the one-sided "
        "paired t-test's p, which must be under 0.05 for the trained model to ship). `with a pair`: the share of "
        "documents with at least one kept pair; "
        "`kept by form`: kept / made queries by the piece they were cut from. `ndcg@10 as trained` is the model "
        "before the merge. Goal: shipped - base ≥ 0 NDCG@10 for every generator, ≥ +0.02 for the best. The base is "
        "already a code searcher: all-MiniLM-L6-v2 was trained on 1,151,414 CodeSearchNet (docstring, function) "
        "pairs among its billion (its model card's training data), which is this benchmark's task, so pairs cut "
        "from the code itself have little to add, and a gain smaller than the dev queries' noise ships nothing "
        "(the p beside each choice).\n\n"
        + markdown_table(rows, COLUMNS)
    )
    save_results("code_corpus", {"settings": settings, "rows": rows}, section)


if __name__ == "__main__":
    main()
