#!/usr/bin/env python3
"""Build the ``pydocs`` and ``pydocs_labels`` sample datasets.

What it builds
--------------
``data_samples/pydocs/`` -- a small retrieval dataset in BEIR layout::

    corpus.jsonl      {"_id": "d0001", "title": "module.qualname", "text": ...}
    queries.jsonl     {"_id": "q0001", "text": ...}
    qrels/train.tsv   query-id <TAB> corpus-id <TAB> score   (score is always 1)
    qrels/dev.tsv
    qrels/test.tsv
    README.md

Each labelled pair comes from one docstring of a public function, class or
method of a standard-library module: the query is the docstring's one-line
summary (its first sentence) and the document is the *rest* of the docstring,
titled with the object's qualified name.  The summary is removed from the
document so the task is not trivial string matching.  Docstrings whose
summary is unusable (too short, a signature, it names the object, it is
repeated in the body or shared with another docstring) are kept as unlabelled
distractor documents, and so are the topics of ``pydoc_data.topics`` (the
language reference text that ``help()`` shows).  Queries are split with a fixed seed into about
60 % train, 15 % dev and 25 % test.

``data_samples/pydocs_labels/`` -- a small labelled text sample for
classification and clustering metrics::

    texts.jsonl       {"text": <docstring>, "label": <standard-library area>}
    README.md

Source and licence
------------------
All text comes from the docstrings and pydoc topics that ship with the CPython
interpreter itself (built and checked with CPython 3.11).  That text is
Copyright (c) Python Software Foundation and is distributed under the Python
Software Foundation License Version 2 (https://docs.python.org/3/license.html).
The derived datasets carry the same licence.

Determinism
-----------
The script only uses the standard library, sorts everything by name, uses
fixed random seeds and writes each output folder under a temporary name that
is renamed into place when complete, so running it twice with the same
interpreter produces byte-identical files.  Docstrings differ slightly
between Python versions (and ``os`` between platforms), so other interpreters
give a similar but not identical dataset.

Usage::

    python3 data_samples/build_pydocs.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import shutil
import sys
import tempfile
import textwrap
import warnings

SEED = 20240611
MAX_DOC_CHARS = 1500
MIN_DOC_CHARS = 100
MIN_SUMMARY_WORDS = 4
MAX_SUMMARY_CHARS = 250
MAX_LABELLED = 460  # cap on labelled (query, document) pairs
MAX_DOCSTRING_DISTRACTORS = 130  # cap on unlabelled docstring documents
SPLITS = (("train", 0.60), ("dev", 0.15), ("test", 0.25))

# Standard-library modules whose public API feeds the retrieval corpus.
RETRIEVAL_MODULES = (
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "codecs",
    "collections",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "email.message",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "hashlib",
    "heapq",
    "http.client",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "urllib.parse",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
)

# Label -> modules for the classification / clustering sample.
LABEL_MODULES = (
    ("os", ("os",)),
    ("math", ("math", "statistics")),
    ("datetime", ("datetime", "time", "calendar")),
    ("collections", ("collections", "collections.abc", "heapq", "bisect")),
    ("pathlib", ("pathlib",)),
    ("text", ("re", "string", "textwrap", "difflib")),
    ("logging", ("logging",)),
)
MAX_PER_LABEL = 70
MIN_LABEL_TEXT_CHARS = 40
MAX_LABEL_TEXT_CHARS = 1000

# Implementation modules whose objects are re-exported by a public module.
MODULE_ALIASES = {
    "os": ("posix", "nt"),
    "collections": ("_collections", "_collections_abc"),
    "collections.abc": ("_collections_abc", "collections.abc"),
    "datetime": ("_datetime", "_pydatetime"),
    "functools": ("_functools",),
    "heapq": ("_heapq",),
    "bisect": ("_bisect",),
    "json": ("json.decoder", "json.encoder"),
    "codecs": ("_codecs",),
    "operator": ("_operator",),
    "pickle": ("_pickle",),
    "random": ("_random",),
    "statistics": (),
    "struct": ("_struct",),
    "string": (),
    "csv": ("_csv",),
    "hashlib": ("_hashlib",),
    "threading": ("_thread",),
    "re": ("re._compiler", "re._parser", "_sre"),
    "logging": (),
    "io": ("_io",),
    "sqlite3": ("_sqlite3",),
}

SIGNATURE_RE = re.compile(r"^[A-Za-z_][\w.]*\s*\(.*\)\s*(->.*)?$")
SENTENCE_END_RE = re.compile(r"(?<=[.!?])(?<!e\.g\.)(?<!i\.e\.)(?<!etc\.)\s+(?=[A-Z`'\"(])")
SIGNATURE_START_RE = re.compile(r"^[A-Za-z_][\w.]*\s*\(")
WS_RE = re.compile(r"\s+")

LICENCE_NAME = "Python Software Foundation License Version 2"
LICENCE_URL = "https://docs.python.org/3/license.html"


# --------------------------------------------------------------------------
# Docstring collection
# --------------------------------------------------------------------------


def collapse(text: str) -> str:
    return WS_RE.sub(" ", text).strip()


def cap(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters at a word boundary."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 4]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip() + " ..."


def import_module(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def owned_by(obj, module_name: str) -> bool:
    """True if ``obj`` is defined in ``module_name`` (or its C accelerator)."""
    owner = getattr(obj, "__module__", None)
    return owner == module_name or owner in MODULE_ALIASES.get(module_name, ())


def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return sorted(n for n in names if not n.startswith("_"))


def own_doc(obj) -> str | None:
    """The object's own docstring (not inherited through inspect.getdoc)."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return doc


def defined_on(member, cls) -> bool:
    """False for attributes that merely alias a function defined elsewhere
    (e.g. ``logging.Formatter.converter = time.localtime``)."""
    func = member
    if isinstance(member, (classmethod, staticmethod)):
        func = member.__func__
    elif isinstance(member, property):
        func = member.fget
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(qualname, str):
        return True
    return qualname.startswith(cls.__qualname__ + ".")


def inherited_docs(cls, attr: str) -> list[str]:
    """Docstrings of ``attr`` on the base classes of ``cls``."""
    docs = []
    for base in cls.__mro__[1:]:
        if attr in vars(base):
            doc = own_doc(vars(base)[attr])
            if doc:
                docs.append(inspect.cleandoc(doc))
    return docs


def iter_docstrings(module_names):
    """Yield (qualified name, short name, raw docstring), sorted by name.

    Covers public functions and classes defined in each module and the public
    methods/properties defined directly on those classes.  Each object is
    reported once (under the first module that owns it); docstrings copied
    from a base class are skipped.
    """
    seen_objects: set[int] = set()
    found = []
    for module_name in sorted(module_names):
        module = import_module(module_name)
        for name in public_names(module):
            obj = getattr(module, name, None)
            if obj is None or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if not owned_by(obj, module_name) or id(obj) in seen_objects:
                continue
            seen_objects.add(id(obj))
            doc = own_doc(obj)
            if doc and inspect.isclass(obj):
                base_docs = [inspect.cleandoc(d) for b in obj.__mro__[1:] if (d := own_doc(b))]
                if inspect.cleandoc(doc) in base_docs:
                    doc = None
            if doc:
                found.append((f"{module_name}.{name}", name, doc))
            if not inspect.isclass(obj):
                continue
            for attr in sorted(vars(obj)):
                if attr.startswith("_"):
                    continue
                member = vars(obj)[attr]
                if not (inspect.isroutine(member) or isinstance(member, (property, classmethod, staticmethod))):
                    continue
                mdoc = own_doc(member)
                if not mdoc or not defined_on(member, obj):
                    continue
                if inspect.cleandoc(mdoc) in inherited_docs(obj, attr):
                    continue
                found.append((f"{module_name}.{name}.{attr}", f"{name}.{attr}", mdoc))
    found.sort(key=lambda item: item[0])
    return found


def strip_signature(lines: list[str]) -> list[str]:
    """Drop leading signature lines such as ``log(x, [base=math.e])`` or
    ``gmtime([seconds]) -> (tm_year, ...,`` continued on the next line."""
    lines = list(lines)
    while lines:
        head = lines[0].strip()
        if not head or head == "--" or SIGNATURE_RE.match(head):
            lines.pop(0)
            continue
        if SIGNATURE_START_RE.match(head) and "->" in head:
            depth = head.count("(") - head.count(")")
            end = 1
            while depth > 0 and end < len(lines):
                depth += lines[end].count("(") - lines[end].count(")")
                end += 1
            if depth == 0:
                del lines[:end]
                continue
        break
    return lines


def split_docstring(raw: str) -> tuple[str, str]:
    """Split a docstring into (summary sentence, remaining text), collapsed."""
    lines = strip_signature(inspect.cleandoc(raw).splitlines())
    if not lines:
        return "", ""
    try:
        blank = next(i for i, line in enumerate(lines) if not line.strip())
    except StopIteration:
        blank = len(lines)
    first_par = collapse(" ".join(lines[:blank]))
    rest = "\n".join(lines[blank:])
    parts = SENTENCE_END_RE.split(first_par, maxsplit=1)
    summary = parts[0].strip().rstrip("\\").strip()
    if len(parts) > 1:
        rest = parts[1] + "\n" + rest
    return summary, collapse(rest)


def summary_problem(summary: str, qualname: str, short_name: str, text: str = "") -> str | None:
    """Why a summary cannot be used as a query (None if it can)."""
    if len(summary.split()) < MIN_SUMMARY_WORDS:
        return "too short"
    if len(summary) > MAX_SUMMARY_CHARS:
        return "too long"
    if "->" in summary or SIGNATURE_RE.match(summary):
        return "signature"
    low = summary.lower()
    if qualname.lower() in low or ("." in short_name and short_name.lower() in low):
        return "names the object"
    # The object's own name when it is clearly an identifier rather than an
    # English word (e.g. "StreamRecoder instances ...", "stat_result: ...").
    own_name = short_name.rsplit(".", 1)[-1]
    if own_name != own_name.lower() or not own_name.isalpha():
        if re.search(rf"(?<![\w.]){re.escape(own_name)}(?!\w)", summary):
            return "names the object"
    # Some docstrings repeat their summary in the body: that would be string
    # matching again.
    if summary.rstrip(".:").lower() in text.lower():
        return "repeated in text"
    return None


# --------------------------------------------------------------------------
# Retrieval dataset
# --------------------------------------------------------------------------


def build_retrieval():
    import pydoc_data.topics

    labelled, distractors = [], []
    seen_texts: set[str] = set()
    candidates = []
    for qualname, short_name, raw in iter_docstrings(RETRIEVAL_MODULES):
        summary, rest = split_docstring(raw)
        if len(rest) < MIN_DOC_CHARS:
            continue
        text = cap(rest, MAX_DOC_CHARS)
        if text in seen_texts:  # duplicate docstring body: keep first
            continue
        seen_texts.add(text)
        candidates.append((qualname, short_name, summary, text))

    # A summary shared by several docstrings would have several right answers:
    # such documents become distractors.
    summary_counts: dict[str, int] = {}
    for _, _, summary, _ in candidates:
        key = summary.lower()
        summary_counts[key] = summary_counts.get(key, 0) + 1
    for qualname, short_name, summary, text in candidates:
        problem = summary_problem(summary, qualname, short_name, text)
        if problem is None and summary_counts[summary.lower()] > 1:
            problem = "shared summary"
        if problem is None:
            labelled.append((qualname, summary, text))
        else:
            distractors.append((qualname, text))

    rng = random.Random(SEED)
    capped = max(0, len(labelled) - MAX_LABELLED)
    if capped:
        dropped = set(rng.sample(range(len(labelled)), len(labelled) - MAX_LABELLED))
        # Dropped pairs are not wasted: their documents become distractors.
        distractors += [(q, t) for i, (q, _, t) in enumerate(labelled) if i in dropped]
        labelled = [p for i, p in enumerate(labelled) if i not in dropped]
    distractors.sort()
    if len(distractors) > MAX_DOCSTRING_DISTRACTORS:
        keep = sorted(rng.sample(range(len(distractors)), MAX_DOCSTRING_DISTRACTORS))
        distractors = [distractors[i] for i in keep]

    topic_docs = []
    for key in sorted(pydoc_data.topics.topics):
        text = cap(collapse(pydoc_data.topics.topics[key]), MAX_DOC_CHARS)
        if len(text) >= MIN_DOC_CHARS and text not in seen_texts:
            seen_texts.add(text)
            topic_docs.append((f"pydoc_data.topics.{key}", text))

    # Documents: stable sort by title (qualified name) -> d0001, d0002, ...
    docs = [(q, t) for q, _, t in labelled] + distractors + topic_docs
    docs.sort(key=lambda d: d[0])
    titles = [d[0] for d in docs]
    assert len(set(titles)) == len(titles), "duplicate document titles"
    doc_id = {title: f"d{i:04d}" for i, title in enumerate(titles, 1)}
    corpus = [{"_id": doc_id[t], "title": t, "text": x} for t, x in docs]

    # Queries: sorted by the title of their positive document -> q0001, ...
    labelled.sort(key=lambda p: p[0])
    queries, qrels_pairs = [], []
    for i, (qualname, summary, _) in enumerate(labelled, 1):
        qid = f"q{i:04d}"
        queries.append({"_id": qid, "text": summary})
        qrels_pairs.append((qid, doc_id[qualname]))

    order = list(range(len(qrels_pairs)))
    random.Random(SEED + 1).shuffle(order)
    n = len(order)
    n_train = round(n * SPLITS[0][1])
    n_dev = round(n * SPLITS[1][1])
    bounds = {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "test": order[n_train + n_dev :]}
    qrels = {name: sorted(qrels_pairs[i] for i in idx) for name, idx in bounds.items()}
    stats = {
        "documents": len(corpus),
        "labelled_documents": len(labelled),
        "docstring_distractors": len(distractors),
        "topic_distractors": len(topic_docs),
        "distractors": len(distractors) + len(topic_docs),
        "capped_pairs": capped,
        "queries": len(queries),
        **{f"{name}_queries": len(pairs) for name, pairs in qrels.items()},
    }
    return corpus, queries, qrels, stats


# --------------------------------------------------------------------------
# Classification / clustering dataset
# --------------------------------------------------------------------------


def build_labels():
    rows = []
    seen: set[str] = set()
    counts = {}
    rng = random.Random(SEED + 2)
    for label, modules in LABEL_MODULES:
        texts = []
        for _, _, raw in iter_docstrings(modules):
            lines = strip_signature(inspect.cleandoc(raw).splitlines())
            text = cap(collapse(" ".join(lines)), MAX_LABEL_TEXT_CHARS)
            if len(text) < MIN_LABEL_TEXT_CHARS or text in seen:
                continue
            seen.add(text)
            texts.append(text)
        if len(texts) > MAX_PER_LABEL:
            keep = sorted(rng.sample(range(len(texts)), MAX_PER_LABEL))
            texts = [texts[i] for i in keep]
        counts[label] = len(texts)
        rows += [{"text": t, "label": label} for t in texts]
    # Interleave labels deterministically so the file is not sorted by class.
    rng.shuffle(rows)
    return rows, counts


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Move a finished temporary folder into place, replacing the old one."""
    old = None
    if os.path.exists(final_dir):
        old = final_dir + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    if old:
        shutil.rmtree(old)


PYDOCS_README = """\
# pydocs: retrieval sample built from Python's own documentation

A small retrieval dataset in BEIR layout, used as the default sample by the
notebooks.  Every file is UTF-8; ids are stable across rebuilds.

| file | content |
|---|---|
| `corpus.jsonl` | `{{"_id", "title", "text"}}`, {documents} documents |
| `queries.jsonl` | `{{"_id", "text"}}`, {queries} queries |
| `qrels/train.tsv` | {train_queries} queries |
| `qrels/dev.tsv` | {dev_queries} queries |
| `qrels/test.tsv` | {test_queries} queries |

The qrels files are tab-separated with the header `query-id corpus-id score`.
Each query has exactly one relevant document (score 1).  The corpus holds
{labelled_documents} labelled documents and {distractors} distractors that no
query points to: {docstring_distractors} docstring documents and
{topic_distractors} pydoc topics.

## Source

Docstrings of public functions, classes and methods of {n_modules}
standard-library modules of CPython {py_version} (Linux build; the `os`
docstrings are the POSIX ones), and the `pydoc_data.topics` help topics (the
language-reference text that `help()` shows).  Modules:
{modules}.

## How it was built

`python3 data_samples/build_pydocs.py` (standard library only, deterministic:
running it twice gives byte-identical files).

* query = the summary of a docstring (its first sentence, signature lines
  dropped);
* document = the rest of that docstring, whitespace collapsed, capped at
  {max_chars} characters, titled `module.qualname`; the summary is removed
  so the task is not string matching;
* docstrings whose remaining text is under {min_chars} characters, duplicate
  bodies and docstrings copied from a base class or another module are
  skipped;
* a summary gives no query when it has fewer than {min_words} words, is longer
  than {max_summary} characters, looks like a signature, contains the
  qualified name (or a class-style name of the object itself), is repeated in
  the document body, or is shared by several docstrings; those documents stay
  in the corpus as distractors;
* the labelled pairs are capped at {max_labelled} (a fixed-seed sample);
  {capped_pairs} pairs over the cap also stay as distractor documents;
* pydoc topics are added as distractors (whitespace collapsed, same cap);
* document ids `d0001`... follow the sorted titles, query ids `q0001`...
  follow the titles of their documents; queries are split with a fixed seed
  into about 60 % train, 15 % dev and 25 % test.

Docstrings change a little between Python versions and platforms, so a
rebuild elsewhere gives a similar but not byte-identical dataset.

## Licence

The text comes from CPython and is Copyright (c) Python Software Foundation,
distributed under the {licence} ({licence_url}).  This derived dataset is
distributed under the same licence.
"""

LABELS_README = """\
# pydocs_labels: labelled docstrings for classification and clustering

`texts.jsonl` holds {rows} rows `{{"text": ..., "label": ...}}` in a fixed
shuffled order.  The text is a whole standard-library docstring of a public
function, class or method (signature lines dropped, whitespace collapsed,
capped at {max_chars} characters, at least {min_chars} characters, no
duplicates) and the label is the area of the standard library it comes from.
Each label is capped at {max_per_label} rows (a fixed-seed sample) to keep the
classes roughly balanced.

| label | modules | rows |
|---|---|---|
{table}

Built by `python3 data_samples/build_pydocs.py` from CPython {py_version}
(Linux build).  Some of these docstrings also appear, split into query and
document, in `../pydocs/`.

## Licence

The text comes from CPython and is Copyright (c) Python Software Foundation,
distributed under the {licence} ({licence_url}).  This derived sample is
distributed under the same licence.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="folder that receives pydocs/ and pydocs_labels/",
    )
    args = parser.parse_args(argv)
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    py_version = "{}.{}".format(*sys.version_info[:2])

    corpus, queries, qrels, stats = build_retrieval()
    rows, label_counts = build_labels()

    tmp = tempfile.mkdtemp(prefix=".pydocs.tmp-", dir=out_dir)
    try:
        write_jsonl(os.path.join(tmp, "corpus.jsonl"), corpus)
        write_jsonl(os.path.join(tmp, "queries.jsonl"), queries)
        os.makedirs(os.path.join(tmp, "qrels"))
        for name, pairs in qrels.items():
            with open(os.path.join(tmp, "qrels", f"{name}.tsv"), "w", encoding="utf-8", newline="\n") as fh:
                fh.write("query-id\tcorpus-id\tscore\n")
                for qid, did in pairs:
                    fh.write(f"{qid}\t{did}\t1\n")
        write_text(
            os.path.join(tmp, "README.md"),
            PYDOCS_README.format(
                py_version=py_version,
                n_modules=len(RETRIEVAL_MODULES),
                modules=textwrap.fill(", ".join(f"`{m}`" for m in RETRIEVAL_MODULES), width=78, break_on_hyphens=False),
                max_chars=MAX_DOC_CHARS,
                min_chars=MIN_DOC_CHARS,
                min_words=MIN_SUMMARY_WORDS,
                max_summary=MAX_SUMMARY_CHARS,
                max_labelled=MAX_LABELLED,
                licence=LICENCE_NAME,
                licence_url=LICENCE_URL,
                **stats,
            ),
        )
        os.chmod(tmp, 0o755)
        replace_dir(tmp, os.path.join(out_dir, "pydocs"))
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)

    tmp = tempfile.mkdtemp(prefix=".pydocs_labels.tmp-", dir=out_dir)
    try:
        write_jsonl(os.path.join(tmp, "texts.jsonl"), rows)
        table = "\n".join(
            f"| `{label}` | {', '.join(f'`{m}`' for m in modules)} | {label_counts[label]} |"
            for label, modules in LABEL_MODULES
        )
        write_text(
            os.path.join(tmp, "README.md"),
            LABELS_README.format(
                rows=len(rows),
                max_chars=MAX_LABEL_TEXT_CHARS,
                min_chars=MIN_LABEL_TEXT_CHARS,
                max_per_label=MAX_PER_LABEL,
                table=table,
                py_version=py_version,
                licence=LICENCE_NAME,
                licence_url=LICENCE_URL,
            ),
        )
        os.chmod(tmp, 0o755)
        replace_dir(tmp, os.path.join(out_dir, "pydocs_labels"))
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)

    print(json.dumps({"pydocs": stats, "pydocs_labels": label_counts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
