import gzip
import json
import subprocess
import sys

import pytest

from conftest import SAMPLES, write_beir
from embtune.data import DataError, check_limits, load_beir

HEADER = "query-id\tcorpus-id\tscore\n"
DOC = json.dumps({"_id": "d0", "text": "a"})

# (case, files to write, file named in the error, line, words in the problem)
MALFORMED = [
    ("malformed JSON", {"corpus": DOC + '\n{"_id": "d1", "text": '}, "corpus.jsonl", 2, "malformed JSON"),
    ("missing _id", {"corpus": DOC + '\n{"text": "b"}'}, "corpus.jsonl", 2, 'missing "_id"'),
    ("missing text", {"queries": '{"_id": "q0"}'}, "queries.jsonl", 1, 'missing "text"'),
    ("non-string text", {"corpus": DOC + '\n{"_id": "d1", "text": 5}'}, "corpus.jsonl", 2, '"text" is a int'),
    (
        "non-string title",
        {"corpus": '{"_id": "d1", "text": "x", "title": ["t"]}'},
        "corpus.jsonl",
        1,
        '"title" is a list',
    ),
    ("duplicate id", {"corpus": DOC + "\n" + DOC}, "corpus.jsonl", 2, "duplicate"),
    ("unknown query", {"qrels": HEADER + "q0\td0\t1\nqX\td0\t1\n"}, "test.tsv", 3, "query-id 'qX'"),
    ("unknown doc", {"qrels": HEADER + "q0\tdX\t1\n"}, "test.tsv", 2, "corpus-id 'dX'"),
    ("negative score", {"qrels": HEADER + "q0\td0\t-1\n"}, "test.tsv", 2, "not a non-negative integer"),
    ("bad score", {"qrels": HEADER + "q0\td0\thigh\n"}, "test.tsv", 2, "not a non-negative integer"),
    ("superscript score", {"qrels": HEADER + "q0\td0\t\u00b2\n"}, "test.tsv", 2, "not a non-negative integer"),
    ("missing header", {"qrels": "q0\td0\t1\n"}, "test.tsv", 1, "header"),
    ("empty split", {"qrels": HEADER}, "test.tsv", None, "empty split"),
    ("two columns", {"qrels": HEADER + "q0\td0\n"}, "test.tsv", 2, "2 tab-separated columns"),
    (
        "undecodable bytes",
        {"queries_bytes": b'{"_id": "q0", "text": "ok"}\n{"_id": "q1", "text": "\xff"}\n'},
        "queries.jsonl",
        2,
        "not UTF-8",
    ),
]


@pytest.mark.parametrize("case,files,filename,line,problem", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_names_file_line_and_fix(tmp_path, case, files, filename, line, problem):
    folder = write_beir(
        tmp_path / "data",
        corpus=files.get("corpus", DOC),
        queries=files.get("queries", '{"_id": "q0", "text": "x"}'),
        qrels={"test": files.get("qrels", HEADER + "q0\td0\t1\n")},
    )
    if "queries_bytes" in files:
        (folder / "queries.jsonl").write_bytes(files["queries_bytes"])
    with pytest.raises(DataError) as err:
        load_beir(folder, limits="off")
    message = str(err.value)
    assert "\n" not in message
    where = f"{filename}:{line}:" if line else f"{filename}:"
    assert where in message, message
    assert problem in message
    assert "Fix: " in message


def test_malformed_input_exits_nonzero_and_writes_nothing(tmp_path):
    folder = write_beir(tmp_path / "data", corpus=DOC + "\n" + DOC)
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "embtune.run_all", "--data", str(folder), "--model", str(tmp_path), "--run", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corpus.jsonl:2: duplicate" in errors[0]
    assert not run.exists()


def test_gzipped_corpus_titles_and_integer_ids(tmp_path):
    folder = write_beir(tmp_path / "data")
    rows = [{"_id": 7, "title": "Title", "text": "body"}, {"_id": "8", "title": "", "text": "plain"}]
    (folder / "corpus.jsonl").unlink()
    with gzip.open(folder / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "qrels" / "test.tsv").write_text(HEADER + "q0\t7\t2\nq1\t8\t0\n")
    data = load_beir(folder, limits="off")
    assert data.doc_texts() == {"7": "Title body", "8": "plain"}
    assert data.doc_texts("{title}\n{text}")["7"] == "Title\nbody"
    assert data.qrels["test"] == {"q0": {"7": 2}, "q1": {"8": 0}}
    assert data.relevant("test") == {"q0": {"7": 2}}  # score 0 is not relevant
    assert data.eval_split() == "test"


def test_vertex_limits_warn_or_error():
    data = load_beir(SAMPLES / "guide_example", limits="off")  # 5 queries, 5 documents, train only
    problems = check_limits(data, "off")
    assert any("5 queries" in p for p in problems) and any("5 documents" in p for p in problems)
    with pytest.warns(UserWarning, match="Vertex AI"):
        load_beir(SAMPLES / "guide_example", limits="warn")
    with pytest.raises(DataError, match="outside Vertex AI limits"):
        load_beir(SAMPLES / "guide_example", limits="error")
    assert check_limits(load_beir(SAMPLES / "pydocs"), "error") == []
    unlabelled = load_beir(SAMPLES / "pydocs", limits="off")
    unlabelled.qrels = {}  # a corpus-only run: label counts are not Vertex's business, nothing to warn of
    assert check_limits(unlabelled, "error") == []
    unlabelled.qrels = {"test": {"q": {"d": 1}}}
    assert check_limits(unlabelled, "off") == ["1 query ids in all splits; Vertex AI tuning needs at least 9",
                                               "1 query ids in split 'test'; Vertex AI tuning needs at least 3"]


def test_samples_load_in_chinese_and_english():
    guide = load_beir(SAMPLES / "guide_example", limits="off")
    assert guide.queries["query4"] == "什么是文本嵌入？"
    assert guide.qrels["train"]["query3"] == {"doc3": 2, "doc5": 1}
    pydocs = load_beir(SAMPLES / "pydocs")
    assert set(pydocs.qrels) == {"train", "dev", "test"}
    assert len(pydocs.corpus) > len({q for s in pydocs.qrels.values() for q in s})  # distractors


def test_a_byte_order_mark_is_accepted(tmp_path):
    folder = write_beir(tmp_path / "data", corpus=DOC, queries='{"_id": "q0", "text": "x"}',
                        qrels={"test": HEADER + "q0\td0\t1\n"})  # fmt: skip
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())  # as Excel and Notepad write
    data = load_beir(folder, limits="off")
    assert list(data.corpus) == ["d0"] and data.qrels["test"] == {"q0": {"d0": 1}}


@pytest.mark.parametrize("case", ["truncated", "not gzip"])
def test_a_broken_gzip_corpus_is_one_line(tmp_path, case):
    folder = write_beir(tmp_path / "data")
    text = (folder / "corpus.jsonl").read_bytes()
    (folder / "corpus.jsonl").unlink()
    packed = gzip.compress(text * 50)
    (folder / "corpus.jsonl.gz").write_bytes(packed[: len(packed) // 2] if case == "truncated" else text)
    with pytest.raises(DataError) as err:
        load_beir(folder, limits="off")
    message = str(err.value)
    assert "corpus.jsonl.gz" in message and "Fix: " in message and "\n" not in message
    assert ("ends early" in message) if case == "truncated" else ("not a gzip file" in message)


def test_dev_is_sized_to_decide_and_never_starves_training():
    """15 % of the labelled queries, at least 50 and at most 300, never more than a quarter; none under 40."""
    from embtune.data import dev_size

    assert [dev_size(n) for n in (30, 100, 288, 809, 5000)] == [0, 25, 50, 121, 300]
    assert dev_size(809, 0.1) == 80  # dev_fraction forces it


def test_legal_but_wrong_input_is_warned_of_counted_and_kept_out_of_training(tmp_path):
    """Empty queries and documents (one a train positive), a query that is its positive's very text, a dev split
    too small to choose on: each gets a warning naming it; the empty ones and their pairs stay out of training."""
    from embtune.data import split_train_dev, training_labels

    docs = [{"_id": f"d{i}", "title": "", "text": f"document number {i}"} for i in range(40)]
    docs[3]["text"] = " "  # empty title and text, and the positive of q3
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(40)]
    queries[5]["text"] = ""
    queries[7]["text"] = "Document number 7."  # the positive's text, up to case and punctuation
    train = "".join(f"q{i}\td{i}\t1\n" for i in range(20))
    dev = "".join(f"q{i}\td{i}\t1\n" for i in range(20, 40))
    folder = write_beir(tmp_path / "data", "\n".join(map(json.dumps, docs)), "\n".join(map(json.dumps, queries)),
                        {"train": "query-id\tcorpus-id\tscore\n" + train, "dev": "query-id\tcorpus-id\tscore\n" + dev})
    with pytest.warns(UserWarning, match=r"1 empty queries \(q5\); 1 empty documents \(d3\): left out of training"):
        data = load_beir(folder, limits="off")
    assert data.empty() == {"queries": ["q5"], "documents": ["d3"]}
    with pytest.warns(UserWarning) as caught:
        labels = training_labels(data, tmp_path / "run")
        split_train_dev(data, labels)
    said = [str(w.message) for w in caught]
    assert any("2 training pairs with an empty query or document left out" in m for m in said), said
    assert any("1 training queries are the very text of their positive (q7)" in m for m in said), said
    assert any("only 20 dev queries" in m and "noise under 30" in m for m in said), said
    assert "q3" not in labels.qrels and "q5" not in labels.qrels and len(labels.qrels) == 18
    assert labels.labelled == set(labels.qrels)
