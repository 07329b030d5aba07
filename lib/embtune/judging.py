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

import random
import re
import time
from pathlib import Path

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
    document), the queries split by a seeded draw (a query's grades all go to one split). A query none of whose
    documents is relevant stays out: it cannot score."""
    by_query: dict[str, dict[str, int]] = {}
    for (q, d), g in grades.items():
        by_query.setdefault(q, {})[d] = g
    queries = sorted(q for q, docs in by_query.items() if any(g > 0 for g in docs.values()))
    random.Random(seed).shuffle(queries)
    n_dev = round(dev_share * len(queries))
    return {"dev": {q: by_query[q] for q in sorted(queries[:n_dev])},
            "test": {q: by_query[q] for q in sorted(queries[n_dev:])}}  # fmt: skip


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
