"""Judging a pool (embtune.judging): the pool, the journal a kill cannot corrupt, resuming, undo and skip, the
qrels it becomes, and the agreement of two judges against Cohen's formula written out. No browser: the notebook's
buttons call exactly these."""

import numpy as np
import pytest

from embtune.judging import Journal, agreement, next_pair, pool, to_qrels, write_qrels

RUNS = {"dense": {"q1": {"a": 0.9, "b": 0.8, "c": 0.1}, "q2": {"d": 0.9, "e": 0.5}},
        "bm25": {"q1": {"b": 3.0, "x": 2.0}, "q2": {"e": 1.0, "f": 0.5}}}  # fmt: skip


def test_the_pool_is_the_union_of_each_system_s_top_k_in_an_order_blind_to_the_systems():
    pairs = pool(RUNS, ["q1", "q2"], k=2)
    assert sorted(pairs) == [("q1", "a"), ("q1", "b"), ("q1", "x"), ("q2", "d"), ("q2", "e"), ("q2", "f")]
    assert [q for q, _ in pairs] == ["q1"] * 3 + ["q2"] * 3  # query by query, each document once
    assert pool(dict(reversed(RUNS.items())), ["q1", "q2"], k=2) == pairs  # which system came first: invisible
    assert pool(RUNS, ["q1", "q2"], k=2) == pairs  # the same order on every resume
    orders = {tuple(pool(RUNS, ["q1"], k=2, seed=s)) for s in range(20)}
    assert len(orders) > 1  # shuffled, not in any system's order
    assert ("q1", "c") not in pairs and ("q1", "c") in pool(RUNS, ["q1"], k=3)


def test_grades_are_saved_as_they_are_made_and_judging_resumes(tmp_path):
    path = tmp_path / "judging" / "grades.tsv"
    pairs = pool(RUNS, ["q1", "q2"], k=2)
    journal = Journal(path)
    assert next_pair(pairs, journal) == pairs[0]
    journal.grade(*pairs[0], 3)
    journal.skip(*pairs[1])
    journal.grade(*pairs[2], 0)
    assert path.read_text().count("\n") == 4  # header and three acts, on disk already
    resumed = Journal(path)  # a new kernel
    assert resumed.grades() == {pairs[0]: 3, pairs[2]: 0} and next_pair(pairs, resumed) == pairs[3]
    # a kill while writing leaves a line without its end: not an act, and the next act starts a line of its own
    with open(path, "a") as f:
        f.write(f"{pairs[3][0]}\t{pairs[3][1]}\t2\tper")
    assert Journal(path).grades() == resumed.grades()
    # a new system's documents join the pools: only they are asked for
    more = pool({**RUNS, "tuned": {"q1": {"n": 1.0}}}, ["q1", "q2"], k=2)
    done = Journal(path)
    for p in pairs[3:]:
        done.grade(*p, 1)
    assert next_pair(pairs, done) is None and next_pair(more, done) == ("q1", "n")


def test_a_half_written_line_is_not_merged_with_the_next_act(tmp_path):
    path = tmp_path / "grades.tsv"
    Journal(path).grade("q1", "a", 2)
    with open(path, "a") as f:
        f.write("q1\tb\t1\tperson")  # killed here
    Journal(path).grade("q2", "d", 1)
    assert Journal(path).grades() == {("q1", "a"): 2, ("q2", "d"): 1}


def test_undo_takes_back_the_judge_s_latest_act_and_only_theirs(tmp_path):
    journal = Journal(tmp_path / "grades.tsv")
    journal.grade("q1", "a", 3)
    journal.grade("q1", "b", 1)
    journal.grade("q1", "b", 2, judge="llm:qwen")
    journal.skip("q1", "x")
    assert journal.undo() == ("q1", "x") and journal.undo() == ("q1", "b")
    assert journal.grades() == {("q1", "a"): 3} and journal.grades("llm:qwen") == {("q1", "b"): 2}
    assert Journal(journal.path).grades() == {("q1", "a"): 3}  # undo is in the journal too
    journal.grade("q1", "a", 0)  # a second grade of a pair replaces the first
    assert journal.grades() == {("q1", "a"): 0} and journal.judges() == ["llm:qwen", "person"]
    assert journal.undo() == ("q1", "a") and journal.grades() == {("q1", "a"): 3}
    assert journal.undo() == ("q1", "a") and journal.undo() is None
    with pytest.raises(ValueError, match="grade 4"):
        journal.grade("q1", "a", 4)


def test_a_file_that_is_not_a_journal_is_named_with_its_line(tmp_path):
    path = tmp_path / "grades.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(ValueError, match=rf"{path}:1: not a judging journal"):
        Journal(path)
    path.write_text("query-id\tcorpus-id\tgrade\tjudge\ttime\nq1\td1\t2\tperson\t1\nq1\td2\tyes\tperson\t2\n")
    with pytest.raises(ValueError, match=rf"{path}:3: 'q1\\td2\\tyes\\tperson\\t2' is not query-id"):
        Journal(path)


def test_grades_become_dev_and_test_qrels_split_by_query(tmp_path):
    from embtune.data import load_beir

    grades = {(f"q{i}", f"d{j}"): (i + j) % 4 for i in range(10) for j in range(3)}
    grades.update({("q10", "d0"): 0, ("q10", "d1"): 0})  # nothing relevant: cannot score
    qrels = to_qrels(grades, seed=1)
    assert set(qrels["dev"]) | set(qrels["test"]) == {f"q{i}" for i in range(10)}  # q10 cannot score
    assert len(qrels["dev"]) == len(qrels["test"]) == 5 and not set(qrels["dev"]) & set(qrels["test"])
    assert all(docs == {f"d{j}": (int(q[1:]) + j) % 4 for j in range(3)} for split in qrels.values()
               for q, docs in split.items())  # every grade of the query, 0 included  # fmt: skip
    assert to_qrels(grades, seed=1) == qrels and to_qrels(grades, seed=2) != qrels
    assert len(to_qrels(grades, dev_share=0.2)["dev"]) == 2
    folder = tmp_path / "data"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(f'{{"_id": "d{j}", "text": "doc {j}"}}\n' for j in range(3)))
    (folder / "queries.jsonl").write_text("".join(f'{{"_id": "q{i}", "text": "query {i}"}}\n' for i in range(11)))
    for split, rows in qrels.items():
        write_qrels(folder / "qrels" / f"{split}.tsv", rows)
    data = load_beir(folder, limits="off")
    assert data.qrels["test"] == qrels["test"]  # BEIR's layout, read back, grade 0 included
    assert data.relevant("dev") == {q: {d: g for d, g in docs.items() if g} for q, docs in qrels["dev"].items()}


def test_agreement_is_cohen_s_linearly_weighted_kappa():
    """Against the formula: kappa = 1 - sum(w O) / sum(w E), w = |i - j| / 3, O the observed and E the expected
    (chance) table of the two judges' grades."""
    a = [3, 2, 0, 1, 3, 0, 2, 2]
    b = [3, 1, 0, 1, 2, 0, 2, 3]
    observed = np.zeros((4, 4))
    for i, j in zip(a, b, strict=True):
        observed[i, j] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / len(a)
    weights = np.abs(np.subtract.outer(range(4), range(4))) / 3
    kappa = 1 - (weights * observed).sum() / (weights * expected).sum()
    got = agreement({("q", str(n)): g for n, g in enumerate(a)}, {("q", str(n)): g for n, g in enumerate(b)})
    assert got["pairs"] == 8 and got["kappa"] == pytest.approx(kappa, abs=1e-4)
    assert got["confusion"] == observed.astype(int).tolist()
    only = agreement({("q", "0"): 1}, {("q", "1"): 1})
    assert only == {"pairs": 0, "kappa": None, "confusion": None}
