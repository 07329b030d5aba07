"""Load and validate retrieval data in the BEIR layout.

A data folder holds `corpus.jsonl` (or `corpus.jsonl.gz`) with `_id`, `text` and an optional `title`,
`queries.jsonl` with `_id` and `text`, and `qrels/<split>.tsv` with the header `query-id corpus-id score`
(score a non-negative integer; > 0 relevant, higher more relevant). Every problem raises a `DataError`
whose one-line message names the file, the line and the fix. Loading only reads: nothing is written.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .rundir import RunDir

QRELS_HEADER = ["query-id", "corpus-id", "score"]
DEFAULT_DOC_TEMPLATE = "{title} {text}"

# Dataset limits of Vertex AI's embedding tuning, quoted by the guide: (what, low, high).
VERTEX_LIMITS = {
    "queries": (9, 10_000),
    "documents": (9, 500_000),
    "query ids per split": (3, None),
    "query ids in all splits": (9, None),
    "labels in all splits": (None, 499_999),
}


def format_doc(doc: dict[str, str], template: str = DEFAULT_DOC_TEMPLATE) -> str:
    """A document's title and text as one string; `template` joins `{title}` and `{text}` (no title: text only)."""
    return template.format(**doc).strip() if doc["title"] else doc["text"]


# Scripts written without spaces between words (a regex character class): Thai, Lao, Myanmar, Khmer, Hiragana,
# Katakana and the CJK ideographs.
NO_SPACES = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"


def spaceless(text: str) -> bool:
    """Whether most letters of the text are of a script written without spaces (words are then characters)."""
    letters = re.findall(r"[^\W\d_]", text)
    return sum(bool(re.match(f"[{NO_SPACES}]", ch)) for ch in letters) * 2 > len(letters)


def language(texts: list[str]) -> str:
    """A language code for a model card, from the script of the texts: zh, ja, ko, en (mostly Latin letters), else
    "multilingual". A guess from the script alone; a Latin-script corpus in another language says en."""
    sample = "".join(texts[:200])
    counts = {code: sum(low <= ch <= high for ch in sample) for code, (low, high) in
              {"zh": ("\u4e00", "\u9fff"), "ja": ("\u3040", "\u30ff"), "ko": ("\uac00", "\ud7af"),
               "en": ("a", "z")}.items()}  # fmt: skip
    counts["en"] += sum("A" <= ch <= "Z" for ch in sample)
    code = "ja" if counts["ja"] > counts["zh"] / 10 and counts["ja"] else max(counts, key=counts.get)
    return code if counts[code] > len(sample) / 4 else "multilingual"


def normalize_text(text: str) -> str:
    """The form in which two texts count as the same: case, punctuation and spacing ignored."""
    return re.sub(r"\W+", " ", text).strip().casefold()


class DataError(ValueError):
    """Bad input data. The message is one line: `file:line: problem. Fix: what to do`."""

    def __init__(self, path: Path | str, line: int | None, problem: str, fix: str):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {problem}. Fix: {fix}")


@dataclass
class BeirData:
    path: Path
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, dict[str, int]]]  # split -> query id -> doc id -> score

    def doc_texts(self, template: str = DEFAULT_DOC_TEMPLATE) -> dict[str, str]:
        """Each document as one string; `template` joins `{title}` and `{text}` (title-less docs get text only)."""
        return {doc_id: format_doc(doc, template) for doc_id, doc in self.corpus.items()}

    def relevant(self, split: str) -> dict[str, dict[str, int]]:
        """Labels of one split with score > 0 only."""
        return {
            qid: {did: s for did, s in docs.items() if s > 0}
            for qid, docs in self.qrels[split].items()
            if any(s > 0 for s in docs.values())
        }

    def empty(self) -> dict[str, list[str]]:
        """Ids of the queries with empty text and of the documents with empty title and text: legal, almost
        certainly a mistake; left out of training, and they score 0 in evaluation."""
        return {"queries": sorted(q for q, t in self.queries.items() if not t.strip()),
                "documents": sorted(d for d, doc in self.corpus.items()
                                    if not doc["text"].strip() and not doc.get("title", "").strip())}  # fmt: skip

    def eval_split(self) -> str:
        """The split evaluation uses: `test`, else `dev`."""
        for split in ("test", "dev"):
            if split in self.qrels:
                return split
        raise DataError(
            self.path / "qrels",
            None,
            f"no test or dev split (found: {', '.join(sorted(self.qrels)) or 'none'})",
            "add qrels/test.tsv (or qrels/dev.tsv) with labelled queries held out from training",
        )


def read_lines(path: Path):
    """Yield (line number, decoded line) of a text or gzip file, naming the line of undecodable bytes; a UTF-8
    byte-order mark (many editors and spreadsheet exports write one) is skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise DataError(path, number, f"bytes that are not UTF-8 ({e.reason} at byte {e.start})",
                                    "re-encode the file as UTF-8 (e.g. `iconv -f <encoding> -t utf-8`)") from None
                yield number, line.removeprefix("\ufeff") if number == 1 else line
    except gzip.BadGzipFile:
        raise DataError(path, None, "not a gzip file", f"compress it with `gzip`, or name it {path.stem}") from None
    except EOFError:
        raise DataError(path, number + 1, "the gzip file ends early (truncated)",
                        "copy or compress the file again, whole") from None


def read_jsonl(path: Path, fields: tuple[str, ...] = ("_id", "text"), optional: tuple[str, ...] = ()):
    """Read a JSONL file of records with unique `_id` and string fields; returns {id: {field: str}}."""
    records: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                path, number, f"malformed JSON ({e.msg} at column {e.colno})", "write one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(path, number, "a JSON value that is not an object", "write one JSON object per line")
        for field in fields:
            if field not in row:
                raise DataError(path, number, f'missing "{field}"', f'give every line a "{field}" field')
        doc_id = row["_id"]
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        if not isinstance(doc_id, str) or not doc_id.strip():
            raise DataError(path, number, f'"_id" is {doc_id!r}, not a non-empty string', 'make "_id" a string')
        record = {}
        for field in fields[1:] + optional:
            value = row.get(field, "")
            if value is None and field in optional:
                value = ""
            if not isinstance(value, str):
                raise DataError(
                    path,
                    number,
                    f'"{field}" is a {type(value).__name__}, not a string',
                    f'make "{field}" a JSON string',
                )
            record[field] = value
        if doc_id in records:
            raise DataError(
                path,
                number,
                f'duplicate "_id" {doc_id!r} (first on line {first_line[doc_id]})',
                "give every record a unique _id",
            )
        records[doc_id] = record
        first_line[doc_id] = number
    if not records:
        raise DataError(path, None, "no records", "add one JSON object per line")
    return records


def read_qrels(path: Path, corpus: dict, queries: dict) -> dict[str, dict[str, int]]:
    """Read one `qrels/<split>.tsv`, checking the header, the scores and that every id exists."""
    qrels: dict[str, dict[str, int]] = {}
    lines = read_lines(path)
    header = next(lines, (1, ""))[1].split("\t")
    if [h.strip() for h in header] != QRELS_HEADER:
        raise DataError(
            path,
            1,
            f"header is {header!r}, expected query-id<TAB>corpus-id<TAB>score",
            "make the first line exactly: query-id\\tcorpus-id\\tscore",
        )
    for number, line in lines:
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 3:
            raise DataError(
                path, number, f"{len(cols)} tab-separated columns, expected 3", "write query-id<TAB>corpus-id<TAB>score"
            )
        qid, did, score = (c.strip() for c in cols)
        if not (score.isascii() and score.isdigit()):  # "²" and "٣" are digits to str.isdigit, not to int()
            raise DataError(
                path,
                number,
                f"score {score!r} is not a non-negative integer",
                "use 0 for not relevant and 1, 2, ... for relevant (higher is more relevant)",
            )
        if qid not in queries:
            raise DataError(
                path,
                number,
                f"query-id {qid!r} is not in queries.jsonl",
                "add the query to queries.jsonl or remove this line",
            )
        if did not in corpus:
            raise DataError(
                path,
                number,
                f"corpus-id {did!r} is not in the corpus",
                "add the document to the corpus or remove this line",
            )
        if did in qrels.get(qid, {}):
            raise DataError(path, number, f"a second label for ({qid!r}, {did!r})", "keep one line per pair")
        qrels.setdefault(qid, {})[did] = int(score)
    if not qrels:
        raise DataError(
            path,
            None,
            "an empty split: no labels after the header",
            "add labels, or delete the file if the split is not used",
        )
    return qrels


def load_beir(path: str | Path, limits: str = "warn", run_dir: str | Path | None = None) -> BeirData:
    """Load and validate a BEIR folder; `limits` is "error", "warn" or "off" for the Vertex AI size limits. With
    `run_dir`, the queries judged in notebook 00 (`run_dir/judged/`) join the data's own labels: the data folder
    itself is never written to."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, None, "no such folder", "point data_dir at a folder in BEIR layout")
    corpus_file = next((p for p in (path / "corpus.jsonl", path / "corpus.jsonl.gz") if p.exists()), None)
    if corpus_file is None:
        raise DataError(
            path / "corpus.jsonl",
            None,
            "no corpus.jsonl or corpus.jsonl.gz",
            'write the documents there, one {"_id", "title", "text"} object per line',
        )
    queries_file = path / "queries.jsonl"
    if not queries_file.exists():
        raise DataError(queries_file, None, "no queries file", 'write the queries, one {"_id", "text"} per line')
    corpus = read_jsonl(corpus_file, optional=("title",))
    queries = {qid: q["text"] for qid, q in read_jsonl(queries_file).items()}
    qrels = {p.stem: read_qrels(p, corpus, queries) for p in sorted((path / "qrels").glob("*.tsv"))}
    data = BeirData(path, corpus, queries, qrels)
    if run_dir is not None:
        add_judged(data, RunDir(run_dir).judged)
    check_limits(data, limits)
    empty = data.empty()
    if empty["queries"] or empty["documents"]:
        listed = "; ".join(f"{len(ids)} empty {what} ({', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''})"
                           for what, ids in empty.items() if ids)  # fmt: skip
        warnings.warn(f"{path}: {listed}: left out of training, they score 0 in evaluation; fill in or remove them",
                      stacklevel=2)  # fmt: skip
    return data


def add_judged(data: BeirData, folder: Path) -> None:
    """Merge notebook 00's output into `data`: `queries.jsonl` (judged queries the data's queries file does not
    hold, e.g. from a text file) and `qrels/<split>.tsv`. A judged query must have no label in the data already:
    two sources of truth for one query would silently disagree."""
    queries_file = folder / "queries.jsonl"
    if queries_file.exists():
        for qid, q in read_jsonl(queries_file).items():
            if data.queries.setdefault(qid, q["text"]) != q["text"]:
                raise DataError(queries_file, None, f"query-id {qid!r} has another text in "
                                f"{data.path / 'queries.jsonl'}", f"delete {folder} and judge again")  # fmt: skip
    labelled = {q: split for split, qrels in data.qrels.items() for q in qrels}
    for path in sorted((folder / "qrels").glob("*.tsv")):
        judged = read_qrels(path, data.corpus, data.queries)
        both = sorted(set(judged) & set(labelled))
        if both:
            raise DataError(path, None, f"query-id {both[0]!r} is judged here and labelled in "
                            f"{data.path / 'qrels' / labelled[both[0]]}.tsv ({len(both)} such queries)",
                            "keep one: remove those queries' lines from the data's qrels, or judge again")  # fmt: skip
        data.qrels.setdefault(path.stem, {}).update(judged)


@dataclass
class TrainingLabels:
    """What training learns from: the train labels plus notebook 01's synthetic queries."""

    queries: dict[str, str]  # query id -> text (labelled and synthetic)
    qrels: dict[str, dict[str, int]]  # query id -> relevant doc id -> score (> 0)
    # Synthetic query id -> the view of its document to train on, when it is not the whole document
    # (inverse cloze task and cropping take the query out of the document; see embtune.generators).
    views: dict[str, dict[str, str]]
    labelled: set[str]  # ids of the labelled (not synthetic) training queries

    @property
    def uses_synthetic(self) -> bool:
        return len(self.qrels) > len(self.labelled)

    def positive_text(self, query_id: str, doc_id: str, docs: dict[str, str], template: str) -> str:
        view = self.views.get(query_id)
        return format_doc(view, template) if view else docs[doc_id]


def training_labels(data: BeirData, run_dir: str | Path, split_overlap: str = "error") -> TrainingLabels:
    """The train split (score > 0) plus `run_dir/synthetic/` (BEIR layout, from notebook 01, used only when it was
    made from this data) against `data`'s corpus, synthetic ids prefixed `synthetic:` so they never collide with
    labelled ones. A query labelled in train and in dev or test would train on held-out labels: an error, or
    with `split_overlap="drop"` a warning and the query left out of training."""
    from .rundir import data_fingerprint

    labelled = data.relevant("train") if "train" in data.qrels else {}
    held_out = {q for split in ("dev", "test") for q in data.qrels.get(split, {})}
    overlap = sorted(set(labelled) & held_out)
    if overlap:
        if split_overlap not in ("error", "drop"):
            raise ValueError(f'split_overlap must be "error" or "drop", not {split_overlap!r}')
        listed = f"{', '.join(overlap[:3])}{' ...' if len(overlap) > 3 else ''} ({len(overlap)} in all)"
        if split_overlap == "error":
            raise DataError(data.path / "qrels" / "train.tsv", None, f"query ids labelled in train and in dev/test: "
                            f"{listed}; training on them leaks held-out labels",
                            "remove them from qrels/train.tsv, or set split_overlap='drop' to train without them")
        warnings.warn(f"{data.path}: {listed} labelled in train and in dev/test: left out of training", stacklevel=2)
        labelled = {q: d for q, d in labelled.items() if q not in held_out}
    queries, qrels, views = dict(data.queries), dict(labelled), {}
    run = RunDir(run_dir)
    folder = run.synthetic
    if (folder / "qrels" / "train.tsv").exists():
        if not run.current("synthetic", data=data_fingerprint(data.path)):
            print(f"{folder} was made for other data: not used (run notebook 01 again to remake it)", flush=True)
            return TrainingLabels(queries, qrels, views, set(labelled))
        rows = read_jsonl(folder / "queries.jsonl", optional=("view_title", "view_text"))
        synthetic = read_qrels(folder / "qrels" / "train.tsv", data.corpus, rows)
        for qid, docs in synthetic.items():
            key = f"synthetic:{qid}"
            queries[key] = rows[qid]["text"]
            qrels[key] = {d: s for d, s in docs.items() if s > 0}
            if rows[qid]["view_text"]:
                views[key] = {"title": rows[qid]["view_title"], "text": rows[qid]["view_text"]}
    return _sound(data, TrainingLabels(queries, qrels, views, set(labelled)))


def _sound(data: BeirData, labels: TrainingLabels) -> TrainingLabels:
    """Training pairs without empty texts (left out, counted), and a warning for queries that are their positive's
    text: such a pair teaches the model nothing but to match identical strings."""
    empty = set(data.empty()["documents"])
    kept, dropped, same = {}, 0, []
    for q, docs in labels.qrels.items():
        good = {d: s for d, s in docs.items() if d not in empty} if labels.queries.get(q, "").strip() else {}
        dropped += len(docs) - len(good)
        if good:
            kept[q] = good
        same += [q for d in good if q not in labels.views
                 and normalize_text(labels.queries[q]) == normalize_text(format_doc(data.corpus[d]))]  # fmt: skip
    if dropped:
        warnings.warn(f"{data.path}: {dropped} training pairs with an empty query or document left out", stacklevel=3)
    if same:
        warnings.warn(f"{data.path}: {len(same)} training queries are the very text of their positive ("
                      f"{', '.join(same[:3])}{' ...' if len(same) > 3 else ''}): they teach nothing but copying; "
                      "check how the queries were made", stacklevel=3)  # fmt: skip
    return TrainingLabels(labels.queries, kept, labels.views, labels.labelled & set(kept))


def check_limits(data: BeirData, mode: str = "warn") -> list[str]:
    """Report where the data breaks Vertex AI's tuning limits; raise on "error", warn on "warn"."""
    if mode not in ("error", "warn", "off"):
        raise ValueError(f'limits must be "error", "warn" or "off", not {mode!r}')
    counts = {"queries": len(data.queries), "documents": len(data.corpus)}
    if data.qrels:  # a corpus without labels (synthetic queries, notebook 00) is not a Vertex data set: no label counts
        counts["query ids in all splits"] = len({q for split in data.qrels.values() for q in split})
        counts["labels in all splits"] = sum(len(d) for split in data.qrels.values() for d in split.values())
    checks = [(what, counts[what], what) for what in counts]
    checks += [(f"query ids in split {s!r}", len(q), "query ids per split") for s, q in data.qrels.items()]
    problems = []
    for label, value, rule in checks:
        low, high = VERTEX_LIMITS[rule]
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"at most {high:,}" if low is None else f"{low} to {high:,}"
            problems.append(f"{value:,} {label}; Vertex AI tuning needs {bounds}")
    if problems and mode != "off":
        message = "; ".join(problems)
        if mode == "error":
            raise DataError(
                data.path,
                None,
                f"outside Vertex AI limits: {message}",
                'resize the data, or pass limits="warn" to go on anyway',
            )
        warnings.warn(f"{data.path}: outside Vertex AI limits: {message}", stacklevel=2)
    return problems


def dev_size(n: int, fraction: float | None = None) -> int:
    """How many of n labelled queries to hold out as dev when the data has no dev split: enough to tell the merge
    and fusion candidates apart (the standard error of a mean NDCG@10 falls as 1/sqrt(queries)) without starving
    training: 15 %, at least 50 and at most 300, never more than a quarter; none under 40. `fraction` forces one."""
    if fraction is not None:
        return int(n * fraction)
    return 0 if n < 40 else min(n // 4, max(50, min(300, round(0.15 * n))))


def split_train_dev(data: BeirData, labels: TrainingLabels, seed: int = 42, dev_fraction: float | None = None):
    """(train qrels, dev qrels): the data's own dev split, else a seeded slice of the labelled training queries
    (`dev_size`), or of the synthetic ones when too few are labelled. Notebooks 03, 05 and 06 hold out the same
    queries, and nothing is ever tuned on the test split."""
    if not labels.qrels:
        raise DataError(
            data.path / "qrels" / "train.tsv",
            None,
            "no training labels and no synthetic queries",
            "add training labels or run notebook 01 first (GENERATOR=ict needs no LLM)",
        )
    if "dev" in data.qrels:
        return labels.qrels, _enough(data.relevant("dev"))
    pool = sorted(labels.labelled) if dev_size(len(labels.labelled), dev_fraction) else sorted(labels.qrels)
    random.Random(seed).shuffle(pool)
    dev_ids = set(pool[: dev_size(len(pool), dev_fraction)])
    return {q: d for q, d in labels.qrels.items() if q not in dev_ids}, _enough({q: labels.qrels[q] for q in dev_ids})


MIN_DEV_QUERIES = 30  # below this, the dev choices (checkpoint, slerp t, fusion weight) follow noise


def _enough(dev: dict) -> dict:
    if 0 < len(dev) < MIN_DEV_QUERIES:
        warnings.warn(f"only {len(dev)} dev queries: the choices made on them (checkpoint, merge, fusion weight) are "
                      f"noise under {MIN_DEV_QUERIES}; label or judge more (notebook 00)", stacklevel=3)  # fmt: skip
    return dev
