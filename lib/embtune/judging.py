"""Judging a pool of real queries: the IR field's pooling (TREC builds its qrels this way), for corpora without
relevance labels. Each query's pool is the union of the top results of several systems, shown in an order that
says nothing of which system found what; a person (notebook buttons) or an LLM grades each pair 0-3 (UMBRELA's
scale); the grades become `qrels/dev.tsv` and `qrels/test.tsv`.

Every act is one line appended to a journal and flushed at once, so a kill loses at most the pair on screen and
judging resumes where it stopped, also after new systems (a fine-tuned model) add documents to the pools:

    query-id <TAB> corpus-id <TAB> grade (0-3, "skip" or "undo") <TAB> judge <TAB> unix time

"undo" cancels the judge's latest act still standing; the journal itself is the record of who judged what.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .config import StepConfig, at_least, between, one_of
from .data import BeirData, DataError, load_beir, read_lines
from .rundir import RunDir

GRADES = {0: "not relevant", 1: "related, does not answer", 2: "answers in part", 3: "answers fully"}
HEADER = "query-id\tcorpus-id\tgrade\tjudge\ttime\n"


def pool(runs: dict[str, dict[str, dict[str, float]]], query_ids: list[str], k: int = 10,
         seed: int = 0) -> list[tuple[str, str]]:  # fmt: skip
    """(query, document) pairs to judge, query by query in the order given: the union of each run's top k, in an
    order drawn from the query alone (the same on every resume, and blind to the systems)."""
    pairs = []
    for q in query_ids:
        found = set()
        for run in runs.values():
            ranked = run.get(q, {})
            found.update(sorted(ranked, key=ranked.get, reverse=True)[:k])
        docs = sorted(found)
        random.Random(f"{seed}:{q}").shuffle(docs)
        pairs += [(q, d) for d in docs]
    return pairs


class Journal:
    """The grades of one judging effort, read from and appended to `path` (see the module's docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.acts: list[tuple[str, str, str, str]] = []  # (query, document, grade, judge)
        self._tail_checked = False
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines[0] + "\n" != HEADER:
            raise ValueError(f"{self.path}:1: not a judging journal (expected the header {HEADER.strip()!r}); "
                             "pass another file, or move this one away")  # fmt: skip
        # a line without its newline is the one a kill interrupted while writing it: not an act
        for number, line in enumerate(lines[1:-1], start=2):
            fields = line.split("\t")
            if len(fields) != 5 or fields[2] not in {*map(str, GRADES), "skip", "undo"}:
                raise ValueError(f"{self.path}:{number}: {line!r} is not query-id, corpus-id, grade (0-3, skip or "
                                 "undo), judge and time separated by tabs; fix or delete that line")  # fmt: skip
            self.acts.append((fields[0], fields[1], fields[2], fields[3]))

    def _append(self, q: str, d: str, grade: str, judge: str) -> None:
        for field in (q, d, judge):
            if "\t" in field or "\n" in field:
                raise ValueError(f"{field!r}: ids and judge names cannot hold tabs or line breaks")
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not new and not self._tail_checked:  # drop a line a kill left half-written, so it joins no act
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._tail_checked = True
        with open(self.path, "a", encoding="utf-8") as f:
            f.write((HEADER if new else "") + f"{q}\t{d}\t{grade}\t{judge}\t{time.time():.0f}\n")
            f.flush()
        self.acts.append((q, d, grade, judge))

    def grade(self, q: str, d: str, grade: int, judge: str = "person") -> None:
        if grade not in GRADES:
            raise ValueError(f"grade {grade!r}: one of {', '.join(map(str, GRADES))} ({GRADES})")
        self._append(q, d, str(grade), judge)

    def skip(self, q: str, d: str, judge: str = "person") -> None:
        self._append(q, d, "skip", judge)

    def undo(self, judge: str = "person") -> tuple[str, str] | None:
        """Cancel `judge`'s latest standing act; returns its pair (to show again), None when there is none."""
        standing = self._standing(judge)
        if not standing:
            return None
        q, d, _ = standing[-1]
        self._append(q, d, "undo", judge)
        return q, d

    def _standing(self, judge: str) -> list[tuple[str, str, str]]:
        acts = []
        for q, d, grade, who in self.acts:
            if who != judge:
                continue
            if grade == "undo":
                acts.pop()
            else:
                acts.append((q, d, grade))
        return acts

    def grades(self, judge: str = "person") -> dict[tuple[str, str], int]:
        """{(query, document): grade} of one judge, the latest grade of a pair standing; skips left out."""
        return {(q, d): int(g) for q, d, g in self._standing(judge) if g != "skip"}

    def judges(self) -> list[str]:
        return sorted({who for *_, who in self.acts})

    def seen(self, judge: str = "person") -> set[tuple[str, str]]:
        """Pairs the judge graded or skipped."""
        return {(q, d) for q, d, _ in self._standing(judge)}


def next_pair(pairs: list[tuple[str, str]], journal: Journal, judge: str = "person") -> tuple[str, str] | None:
    """The first pair of the pool the judge has neither graded nor skipped; None when the pool is done."""
    seen = journal.seen(judge)
    return next((p for p in pairs if p not in seen), None)


def to_qrels(grades: dict[tuple[str, str], int], dev_share: float = 0.5, seed: int = 42) -> dict[str, dict]:
    """{"dev": qrels, "test": qrels} in BEIR's form ({query: {document: grade}}, grade 0 kept: a judged non-relevant
    document), each query's split drawn from the seed and the query alone, so judging more queries later never
    moves one from dev (which chose what ships) to test. A query none of whose documents is relevant stays out: it
    cannot score."""
    by_query: dict[str, dict[str, int]] = {}
    for (q, d), g in sorted(grades.items()):
        by_query.setdefault(q, {})[d] = g
    split: dict[str, dict] = {"dev": {}, "test": {}}
    for q, docs in sorted(by_query.items()):
        if any(g > 0 for g in docs.values()):
            split["dev" if random.Random(f"{seed}:{q}").random() < dev_share else "test"][q] = docs
    return split


def write_qrels(path: str | Path, qrels: dict[str, dict[str, int]]) -> Path:
    """One BEIR qrels TSV (header, then query-id, corpus-id, score), written whole or not at all."""
    from .files import write_text

    rows = [f"{q}\t{d}\t{g}" for q, docs in qrels.items() for d, g in sorted(docs.items())]
    return write_text(path, "query-id\tcorpus-id\tscore\n" + "".join(r + "\n" for r in rows))


def agreement(a: dict[tuple[str, str], int], b: dict[tuple[str, str], int]) -> dict:
    """How two judges (a person and an LLM, say) agree on the pairs both graded: Cohen's kappa with linear weights
    (a 3 against a 2 disagrees less than a 3 against a 0) and the confusion table (rows: a, columns: b)."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return {"pairs": len(common), "kappa": None, "confusion": None}
    x, y = [a[p] for p in common], [b[p] for p in common]
    labels = sorted(GRADES)
    kappa = cohen_kappa_score(x, y, labels=labels, weights="linear")
    return {"pairs": len(common), "kappa": round(float(kappa), 4),
            "confusion": confusion_matrix(x, y, labels=labels).tolist()}  # fmt: skip


# UMBRELA's zero-shot prompt (Upadhyay, Pradeep, Thakur, Craswell, Lin 2024, "UMBRELA: UMbrela is the
# (Open-Source Reproduction of the) Bing RELevance Assessor", arXiv:2406.06519; castorini/umbrela), itself
# Thomas et al.'s Bing prompt (2023): the judge of the TREC 2024 RAG track, whose grades reproduce the system
# rankings of human assessors. Used as published, so that its measured agreement carries over.
UMBRELA_PROMPT = (
    "Given a query and a passage, you must provide a score on an integer scale of 0 to 3 with the following "
    "meanings:\n"
    "0 = represent that the passage has nothing to do with the query, \n"
    "1 = represents that the passage seems related to the query but does not answer it, \n"
    "2 = represents that the passage has some answer for the query, but the answer may be a bit unclear, or hidden "
    "amongst extraneous information and \n"
    "3 = represents that the passage is dedicated to the query and contains the exact answer.\n\n"
    "Important Instruction: Assign category 1 if the passage is somewhat related to the topic but not completely, "
    "category 2 if passage presents something very important related to the entire topic but also has some extra "
    "information and category 3 if the passage only and entirely refers to the topic. If none of the above "
    "satisfies give it category 0.\n\n"
    "Query: {query}\nPassage: {passage}\n\n"
    "Split this problem into steps:\n"
    "Consider the underlying intent of the search.\n"
    "Measure how well the content matches a likely intent of the query (M).\n"
    "Measure how trustworthy the passage is (T).\n"
    "Consider the aspects above and the relative importance of each, and decide on a final score (O). Final score "
    "must be an integer value only.\n"
    "Do not provide any code in result. Provide each score in the format of: ##final score: score without "
    "providing any reasoning."
)


def parse_grade(reply: str) -> int | None:
    """The grade of a reply in UMBRELA's format (`##final score: 2`), reasoning aside; None for anything else: a
    refusal, prose, several different final scores, a number out of the scale."""
    from .generators import strip_thinking

    found = {int(g) for g in re.findall(r"##\s*final score\s*:\s*(\d+)\b", strip_thinking(reply), flags=re.I)}
    return found.pop() if len(found) == 1 and found <= GRADES.keys() else None


def llm_judge(generator, pairs: list[tuple[str, str]], queries: dict[str, str], docs: dict[str, str],
              journal: Journal, judge: str, batch: int = 32, max_chars: int = 4000) -> dict:  # fmt: skip
    """Grade with an LLM (notebook 01's generators: an OpenAI-compatible endpoint or a model in process) the pairs
    `judge` has not graded. Each batch is journaled as it arrives; a reply that is not a grade is counted and left
    unjudged (a rerun asks again); a request that failed after its retries stops the run once the replies that
    arrived are saved (GeneratorError: rerun to resume). Returns the counts and a few unparsed replies."""
    from .generators import GeneratorError

    seen = journal.seen(judge)
    todo = [p for p in pairs if p not in seen]
    stats = {"asked": len(todo), "graded": 0, "unparsed": 0, "examples": []}
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        prompts = [UMBRELA_PROMPT.format(query=queries[q], passage=docs[d][:max_chars]) for q, d in chunk]
        replies = generator.generate(prompts)
        failed = [r for r in replies if isinstance(r, GeneratorError)]
        for (q, d), reply in zip(chunk, replies, strict=True):
            if isinstance(reply, GeneratorError):
                continue
            grade = parse_grade(reply)
            if grade is None:
                stats["unparsed"] += 1
                stats["examples"] = (stats["examples"] + [reply[:200]])[:5]
            else:
                journal.grade(q, d, grade, judge)
                stats["graded"] += 1
        if failed:
            raise GeneratorError(f"{len(failed)} judging requests failed ({failed[0]}); the {stats['graded']} "
                                 "grades that arrived are saved: rerun to resume")  # fmt: skip
    return stats


# The notebook step (00): which queries, the pool, grades taken from a file or an LLM, and the qrels written.

MIN_PAIRS_FOR_AGREEMENT = 30  # fewer pairs judged by both: the kappa is noise, agreement "not measured"


@dataclass(kw_only=True)
class JudgeConfig(StepConfig):
    queries_file: str | None = None  # one query a line (UTF-8); None: the data's queries that no qrels file labels
    max_queries: int | None = 100  # a seeded sample of them to judge; None: all
    pool_k: int = 10  # each system's top k joins the pool
    judge: str = "person"  # "person": buttons in the notebook; "llm": generator_model grades the whole pool
    generator_model: str = ""  # the LLM judge, as in notebook 01: "openai:<model>" (OPENAI_BASE_URL) or a causal LM
    grades_file: str | None = None  # grades to take in: a grades.tsv of this notebook, or query-id, corpus-id, grade
    dev_share: float = 0.5  # judged queries drawn into dev (what notebooks 03 and 06 choose on); the rest: test
    min_kappa: float = 0.4  # an LLM judge agreeing less with people (weighted kappa) decides nothing
    bm25_stopwords: str | None = "en"  # None for languages without an English-like stop-word list
    batch_size: int = 32

    RULES = {"max_queries": at_least(1), "pool_k": at_least(1), "judge": one_of("person", "llm"),
             "dev_share": between(0, 1), "min_kappa": between(-1, 1), "batch_size": at_least(1)}


@dataclass
class Judging:
    """One judging effort: the queries that may be judged (`candidates`), the sample pooled (`queries`), their
    pooled documents (`pairs`, in judging order) and the journal."""

    data: BeirData
    candidates: dict[str, str]
    queries: dict[str, str]
    docs: dict[str, str]
    runs: dict[str, dict]
    pairs: list[tuple[str, str]]
    journal: Journal


def judging_queries(data: BeirData, config: JudgeConfig) -> dict[str, str]:
    """The queries that may be judged: the lines of `queries_file` (ids `judged:<hash>`, stable across runs), else
    the data's queries that no qrels file labels."""
    if config.queries_file:
        path = Path(config.queries_file)
        if not path.is_file():
            raise DataError(path, None, "no such file", "pass a text file with one query a line")
        found = {f"judged:{hashlib.sha256(t.encode()).hexdigest()[:12]}": t
                 for _, line in read_lines(path) if (t := " ".join(line.split()))}  # fmt: skip
        if not found:
            raise DataError(path, None, "no queries", "write one query a line")
    else:
        labelled = {q for qrels in data.qrels.values() for q in qrels}
        found = {q: t for q, t in data.queries.items() if q not in labelled and t.strip()}
        if not found:
            raise DataError(data.path / "queries.jsonl", None, "every query already has a label: nothing to judge",
                            "pass queries_file= with real queries, one a line")  # fmt: skip
    return dict(sorted(found.items()))


def pool_runs(data: BeirData, queries: dict[str, str], config: JudgeConfig) -> dict[str, dict]:
    """Each system's top `pool_k`: the base model, the fine-tuned one once notebook 03 trained it on this data,
    BM25, and the RRF hybrid of each dense system with BM25."""
    import gc

    from .encode import corpus_embeddings
    from .evaluate import dense_systems
    from .models import load_embedder
    from .search import bm25_search, dense_run, fuse

    runs = {"bm25": bm25_search(queries, data.doc_texts(config.doc_template), config.pool_k, config.bm25_stopwords)}
    for name, path in dense_systems(config).items():
        model = load_embedder(path)
        doc_emb = corpus_embeddings(model, path, data, config.run_dir, config.doc_template, config.batch_size)
        runs[name] = dense_run(model, queries, doc_emb, list(data.corpus), config.instruction, config.pool_k,
                               config.batch_size)  # fmt: skip
        runs[f"hybrid ({name})"] = fuse([runs[name], runs["bm25"]], "rrf")
        del model, doc_emb  # one model in memory at a time
        gc.collect()
    return runs


def contributions(runs: dict[str, dict], pairs: list[tuple[str, str]], k: int) -> dict[str, dict[str, int]]:
    """Per system: the pooled pairs in its top k, and those no other system has in its top k (what pooling it
    adds)."""
    tops = {name: {(q, d) for q, ranked in run.items() for d in sorted(ranked, key=ranked.get, reverse=True)[:k]}
            for name, run in runs.items()}  # fmt: skip
    pooled, found = set(pairs), {}
    for name, top in tops.items():
        others = set().union(*(t for n, t in tops.items() if n != name))
        found[name] = {"in its top k": len(top & pooled), "found by no other system": len(top & pooled - others)}
    return found


def start(config: JudgeConfig) -> Judging:
    """A seeded sample of `max_queries` candidates, their pool and the journal (`run_dir/judged/grades.tsv`),
    resumed where it stopped."""
    data = load_beir(config.data_dir, limits="off")
    candidates = judging_queries(data, config)
    ids = list(candidates)
    if config.max_queries and len(ids) > config.max_queries:
        ids = sorted(random.Random(config.seed).sample(ids, config.max_queries))
    queries = {q: candidates[q] for q in ids}
    runs = pool_runs(data, queries, config)
    pairs = pool(runs, ids, config.pool_k, config.seed)
    docs = data.doc_texts(config.doc_template)
    return Judging(data, candidates, queries, {d: docs[d] for _, d in pairs}, runs, pairs,
                   Journal(RunDir(config.run_dir).judged / "grades.tsv"))  # fmt: skip


def read_grades(path: str | Path, queries: dict, corpus: dict) -> dict[str, dict[tuple[str, str], int]]:
    """{judge: grades} from a file: a grades.tsv this notebook wrote (its judges kept), or three columns
    `query-id corpus-id grade` (a person's). Every line is checked: ids among these queries and documents, grades
    0-3. Grades of queries outside the sample being pooled are taken too, if they may be judged."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "no such file", "pass the grades TSV (query-id, corpus-id, grade)")
    lines = list(read_lines(path))
    header = [h.strip() for h in lines[0][1].split("\t")] if lines else []
    journal = header == HEADER.strip().split("\t")
    if not journal and header not in (["query-id", "corpus-id", "grade"], ["query-id", "corpus-id", "score"]):
        raise DataError(path, 1, f"header is {header!r}",
                        "start with query-id<TAB>corpus-id<TAB>grade, or pass a grades.tsv of notebook 00 as it is")
    valid = {*map(str, GRADES), *(("skip", "undo") if journal else ())}
    grades = {}
    for number, line in lines[1:]:
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != (5 if journal else 3):
            raise DataError(path, number, f"{len(fields)} tab-separated columns, expected {5 if journal else 3}",
                            "write query-id<TAB>corpus-id<TAB>grade")  # fmt: skip
        q, d, g = fields[:3]
        if q not in queries:
            raise DataError(path, number, f"query-id {q!r} is not a query to judge (not in queries_file, or "
                            "labelled in the data already)", "check queries_file, or remove the line")  # fmt: skip
        if d not in corpus:
            raise DataError(path, number, f"corpus-id {d!r} is not in the corpus", "remove the line")
        if g not in valid:
            raise DataError(path, number, f"grade {g!r} is not one of {', '.join(sorted(valid))}",
                            f"grade 0-3: {'; '.join(f'{k} {v}' for k, v in GRADES.items())}")  # fmt: skip
        if not journal:
            grades[(q, d)] = int(g)  # a later line wins, as in the journal
    if journal:
        read = Journal(path)
        return {who: read.grades(who) for who in read.judges()}
    return {"person": grades}


def take_grades(judging: Judging, path: str | Path) -> int:
    """Add a file's grades to the journal (those it does not hold already); returns how many were added."""
    added = 0
    for judge, grades in read_grades(path, judging.candidates, judging.data.corpus).items():
        held = judging.journal.grades(judge)
        for (q, d), g in grades.items():
            if held.get((q, d)) != g:
                judging.journal.grade(q, d, g, judge)
                added += 1
    return added


def judge_with_llm(judging: Judging, config: JudgeConfig, generator=None) -> dict:
    """Grade the whole pool with the LLM `generator_model` (judge `llm:<name>`); resumable like the journal."""
    from .generators import UNSUPERVISED, GeneratorError
    from .synthetic import SynthConfig, make_generator

    if not config.generator_model or config.generator_model in UNSUPERVISED:
        raise GeneratorError(f'judge="llm" needs an LLM in generator_model (openai:<model> or a causal LM), not '
                             f"{config.generator_model!r}")  # fmt: skip
    if generator is None:
        generator = make_generator(SynthConfig(data_dir=config.data_dir, run_dir=config.run_dir,
                                               base_model=config.base_model, generator_model=config.generator_model,
                                               temperature=0.0))  # fmt: skip
    return llm_judge(generator, judging.pairs, judging.queries, judging.docs, judging.journal,
                     f"llm:{config.generator_model}")  # fmt: skip


def decide(journal: Journal, min_kappa: float) -> tuple[dict[tuple[str, str], int], dict]:
    """(grades, report): the grades the qrels are made of. A person's grade (any judge not named `llm:...`) stands
    over an LLM's; an LLM judge whose weighted kappa with the people's grades is under `min_kappa`, on at least
    MIN_PAIRS_FOR_AGREEMENT pairs both judged, is left out."""
    people: dict[tuple[str, str], int] = {}
    for judge in journal.judges():
        if not judge.startswith("llm:"):
            people.update(journal.grades(judge))
    merged: dict[tuple[str, str], int] = {}
    report = {"grades": {j: len(journal.grades(j)) for j in journal.judges()}, "agreement": {}, "left_out": []}
    for judge in journal.judges():
        if judge.startswith("llm:"):
            agree = report["agreement"][judge] = agreement(people, journal.grades(judge))
            if agree["pairs"] >= MIN_PAIRS_FOR_AGREEMENT and agree["kappa"] < min_kappa:
                report["left_out"].append(judge)
            else:
                merged.update(journal.grades(judge))
    merged.update(people)
    return merged, report


def write_judged(judging: Judging, config: JudgeConfig) -> dict:
    """Write `run_dir/judged/`: queries.jsonl (judged queries the data's file lacks, first: the qrels name them),
    then qrels/dev.tsv and test.tsv; a split left empty is removed. Returns what was written, also as stats.json."""
    from .files import write_json, write_text

    grades, report = decide(judging.journal, config.min_kappa)
    grades = {(q, d): g for (q, d), g in grades.items() if q in judging.candidates and d in judging.data.corpus}
    qrels = to_qrels(grades, config.dev_share, config.seed)
    folder = RunDir(config.run_dir).judged
    extra = sorted(q for split in qrels.values() for q in split if q not in judging.data.queries)
    if extra:
        write_text(folder / "queries.jsonl", "".join(json.dumps({"_id": q, "text": judging.candidates[q]},
                                                                ensure_ascii=False) + "\n" for q in extra))
    else:
        (folder / "queries.jsonl").unlink(missing_ok=True)
    for split, rows in qrels.items():
        if rows:
            write_qrels(folder / "qrels" / f"{split}.tsv", rows)
        else:
            (folder / "qrels" / f"{split}.tsv").unlink(missing_ok=True)
    graded = {q for q, _ in grades}
    stats = {**report, "queries": len(judging.queries), "pairs": len(judging.pairs),
             "queries_graded": len(graded), "without_relevant": len(graded) - sum(map(len, qrels.values())),
             "dev": len(qrels["dev"]), "test": len(qrels["test"])}  # fmt: skip
    write_json(folder / "stats.json", stats)
    return stats


def plot_grades(journal: Journal, path=None):
    """Bar chart of how many pairs each judge gave each grade; saved as PNG when `path` is given. Returns the
    figure (a bare matplotlib Figure: the library never changes the notebook's plotting backend)."""
    from matplotlib.figure import Figure

    from .files import atomic_path

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    judges = journal.judges() or ["person"]
    width = 0.8 / len(judges)
    for i, judge in enumerate(judges):
        counts = [list(journal.grades(judge).values()).count(g) for g in GRADES]
        bars = ax.bar([g + i * width - 0.4 + width / 2 for g in GRADES], counts, width, label=judge)
        ax.bar_label(bars, fontsize=7, padding=2)
    ax.set_xticks(list(GRADES), [f"{g}\n{name}" for g, name in GRADES.items()], fontsize=7)
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    return fig
