"""Judging a pool (embtune.judging): the pool, the journal a kill cannot corrupt, resuming, undo and skip, the
qrels it becomes, the agreement of two judges against Cohen's formula written out, and the LLM judge against a real
loopback HTTP server (grades, a refusal, prose, a timeout). No browser: the notebook's buttons call these."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import send_json
from embtune.data import DataError, load_beir
from embtune.judging import (
    UMBRELA_PROMPT,
    Journal,
    JudgeConfig,
    Judging,
    agreement,
    contributions,
    decide,
    judging_queries,
    llm_judge,
    next_pair,
    parse_grade,
    pool,
    read_grades,
    take_grades,
    to_qrels,
    write_judged,
    write_qrels,
)
from embtune.rundir import judged_dev_fingerprint

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


def test_each_system_s_share_of_the_pool_counts_what_only_it_found():
    pairs = pool(RUNS, ["q1", "q2"], k=2)
    assert contributions(RUNS, pairs, k=2) == {"dense": {"in its top k": 4, "found by no other system": 2},  # a, d
                                               "bm25": {"in its top k": 4, "found by no other system": 2}}  # x, f
    assert contributions(RUNS, pairs, k=1)["bm25"] == {"in its top k": 2, "found by no other system": 2}  # b, e


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
    assert qrels["dev"] and qrels["test"] and not set(qrels["dev"]) & set(qrels["test"])
    assert all(docs == {f"d{j}": (int(q[1:]) + j) % 4 for j in range(3)} for split in qrels.values()
               for q, docs in split.items())  # every grade of the query, 0 included  # fmt: skip
    assert to_qrels(grades, seed=1) == qrels and to_qrels(grades, seed=2) != qrels
    # judging more queries later never moves one between dev (which chose what ships) and test
    more = {**grades, **{(f"q{i}", "d0"): 2 for i in range(11, 200)}}
    grown = to_qrels(more, seed=1)
    assert all(q in grown[split] for split in qrels for q in qrels[split])
    assert 0.4 < len(grown["dev"]) / 199 < 0.6 and 0.1 < len(to_qrels(more, dev_share=0.2)["dev"]) / 199 < 0.3
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


# ---------------------------------------------------------------------------------------------------- the LLM judge

PASSAGES = {"answer": "The Eiffel Tower was completed in 1889.", "related": "Paris has many towers and bridges.",
            "refused": "A passage the model refuses to grade.", "garbage": "A passage the model answers in prose.",
            "slow": "A passage whose request never returns in time."}  # fmt: skip


class UmbrelaLike(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that answers UMBRELA's prompt by the passage it holds."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        passage = prompt.split("Passage: ", 1)[1].split("\n", 1)[0]
        key = next(k for k, v in PASSAGES.items() if v == passage)
        if key == "slow":
            time.sleep(1.5)
        content = {"answer": "<think>it says 1889</think>##final score: 3", "related": "M: 1, T: 2\n##Final Score: 1",
                   "refused": "I'm sorry, I can't help with that.", "garbage": "The score is three out of three.",
                   "slow": "##final score: 2"}[key]  # fmt: skip
        send_json(self, 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())


@pytest.fixture
def umbrela_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), UmbrelaLike)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_umbrela_replies_are_parsed_strictly():
    assert parse_grade("##final score: 2") == 2 and parse_grade("<think>##final score: 0</think>##final score: 3") == 3
    assert parse_grade("M: 2\nT: 1\n## Final Score : 1") == 1
    for reply in ("3", "Score: 3", "##final score: 4", "##final score: 1 ##final score: 2", "I cannot judge this.",
                  "<think>##final score: 2", ""):  # fmt: skip
        assert parse_grade(reply) is None, reply
    assert "Query: when?\nPassage: it was so" in UMBRELA_PROMPT.format(query="when?", passage="it was so")


def test_the_llm_judge_grades_counts_what_it_cannot_parse_and_resumes_after_a_timeout(umbrela_server, tmp_path):
    from embtune.generators import Endpoint, GeneratorError

    queries = {"q1": "When was the Eiffel Tower completed?"}
    pairs = [("q1", d) for d in PASSAGES]
    journal = Journal(tmp_path / "grades.tsv")
    endpoint = Endpoint(umbrela_server, "judge", timeout=0.5, max_retries=0, concurrency=2)
    with pytest.raises(GeneratorError, match="1 judging requests failed .* the 2 grades that arrived are saved"):
        llm_judge(endpoint, pairs, queries, PASSAGES, journal, "llm:judge", batch=5)
    assert Journal(journal.path).grades("llm:judge") == {("q1", "answer"): 3, ("q1", "related"): 1}
    assert Journal(journal.path).grades("person") == {}  # the LLM's grades are its own
    # the rerun asks only what is still open; the refusal and the prose are counted, never graded
    endpoint.timeout = 5.0
    stats = llm_judge(endpoint, pairs, queries, PASSAGES, journal, "llm:judge", batch=2)
    assert (stats["asked"], stats["graded"], stats["unparsed"]) == (3, 1, 2)
    assert stats["examples"] == ["I'm sorry, I can't help with that.", "The score is three out of three."]
    assert journal.grades("llm:judge") == {("q1", "answer"): 3, ("q1", "related"): 1, ("q1", "slow"): 2}


def beir_folder(folder, queries: dict[str, str], labelled: dict[str, str]):
    """A BEIR folder of three documents; `labelled` {query: its relevant doc} in qrels/test.tsv."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": f"document {d}"}) + "\n"
                                                 for d in ("a", "b", "c")))  # fmt: skip
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                  for q, t in queries.items()))  # fmt: skip
    if labelled:
        write_qrels(folder / "qrels" / "test.tsv", {q: {d: 1} for q, d in labelled.items()})
    return folder


def config(tmp_path, data, **kw):
    return JudgeConfig(data_dir=str(data), run_dir=str(tmp_path / "run"), base_model="unused", **kw)


def judging_of(data_dir, cfg, pairs=()):
    """A Judging over given pairs (what `start` pools with real models, tested in test_notebooks)."""
    data = load_beir(data_dir, limits="off")
    candidates = judging_queries(data, cfg)
    return Judging(data, candidates, candidates, {d: d for _, d in pairs}, {}, list(pairs),
                   Journal(Path(cfg.run_dir) / "judged" / "grades.tsv"))  # fmt: skip


def test_the_queries_to_judge_are_those_without_labels_or_the_lines_of_a_text_file(tmp_path):
    data_dir = beir_folder(tmp_path / "data", {"q1": "one", "q2": "two", "q3": " "}, {"q1": "a"})
    data = load_beir(data_dir, limits="off")
    assert judging_queries(data, config(tmp_path, data_dir)) == {"q2": "two"}  # q1 labelled, q3 empty
    lines = tmp_path / "queries.txt"
    lines.write_text("how do I reset it\n\n  how   do I reset it \n重置密码\n", encoding="utf-8")
    found = judging_queries(data, config(tmp_path, data_dir, queries_file=str(lines)))
    assert sorted(found.values()) == ["how do I reset it", "重置密码"]  # spacing ignored, kept once
    assert all(q.startswith("judged:") for q in found)
    assert judging_queries(data, config(tmp_path, data_dir, queries_file=str(lines))) == found  # stable ids
    lines.write_text("\n \n")
    with pytest.raises(DataError, match=f"{lines}: no queries"):
        judging_queries(data, config(tmp_path, data_dir, queries_file=str(lines)))
    labelled = beir_folder(tmp_path / "all", {"q1": "one"}, {"q1": "a"})
    with pytest.raises(DataError, match="every query already has a label.*queries_file="):
        judging_queries(load_beir(labelled, limits="off"), config(tmp_path, labelled))


def test_a_grades_file_is_checked_line_by_line_and_taken_in_once(tmp_path):
    data_dir = beir_folder(tmp_path / "data", {"q1": "one", "q2": "two", "q3": "three"}, {"q1": "a"})
    cfg = config(tmp_path, data_dir)
    judging = judging_of(data_dir, cfg, [("q2", "a"), ("q2", "b")])
    grades = tmp_path / "grades.tsv"
    grades.write_text("query-id\tcorpus-id\tgrade\nq2\ta\t3\nq2\tb\t0\nq3\tc\t2\n")
    assert take_grades(judging, grades) == 3 and take_grades(judging, grades) == 0  # once
    assert judging.journal.grades() == {("q2", "a"): 3, ("q2", "b"): 0, ("q3", "c"): 2}  # q3: outside the pool
    for body, where, what in [("q2\ta\t4\n", 2, "grade '4'"), ("q2\tz\t1\n", 2, "corpus-id 'z'"),
                              ("q2\ta\t1\nq1\ta\t1\n", 3, "query-id 'q1' is not a query to judge"),
                              ("q2\ta\n", 2, "2 tab-separated columns")]:  # fmt: skip
        grades.write_text("query-id\tcorpus-id\tgrade\n" + body)
        with pytest.raises(DataError, match=f"{grades}:{where}: {what}"):
            read_grades(grades, judging.candidates, judging.data.corpus)
    grades.write_text("qid\tdoc\tgrade\n")
    with pytest.raises(DataError, match=f"{grades}:1: header"):
        read_grades(grades, judging.candidates, judging.data.corpus)
    # a journal of this notebook passes as it is, its judges kept
    other = Journal(tmp_path / "colleague.tsv")
    other.grade("q2", "a", 1, "ana")
    other.grade("q2", "b", 2, "llm:m")
    assert read_grades(other.path, judging.candidates, judging.data.corpus) == {"ana": {("q2", "a"): 1},
                                                                                 "llm:m": {("q2", "b"): 2}}


def test_a_person_s_grade_stands_and_an_llm_that_disagrees_with_people_decides_nothing(tmp_path):
    journal = Journal(tmp_path / "grades.tsv")
    pairs = [(f"q{i}", "a") for i in range(40)]
    for i, (q, d) in enumerate(pairs):
        journal.grade(q, d, i % 4, "person")
    for q, d in pairs[:29]:
        journal.grade(q, d, 3, "llm:ok")  # 29 shared pairs: too few to measure, so used
    journal.grade("x", "a", 2, "llm:ok")
    grades, report = decide(journal, min_kappa=0.4)
    assert grades[("x", "a")] == 2 and grades[("q0", "a")] == 0  # the LLM fills in; the person stands
    assert report["left_out"] == [] and report["agreement"]["llm:ok"]["pairs"] == 29
    for i, (q, d) in enumerate(pairs):
        journal.grade(q, d, 3 - i % 4, "llm:contrary")  # 40 shared pairs, reversed: kappa far below 0.4
    journal.grade("y", "a", 1, "llm:contrary")
    grades, report = decide(journal, min_kappa=0.4)
    assert report["left_out"] == ["llm:contrary"] and ("y", "a") not in grades
    assert report["agreement"]["llm:contrary"]["kappa"] < 0
    agreeing = Journal(tmp_path / "agree.tsv")
    for i, (q, d) in enumerate(pairs):
        agreeing.grade(q, d, i % 4, "person")
        agreeing.grade(q, d, i % 4, "llm:same")
    agreeing.grade("z", "a", 3, "llm:same")
    grades, report = decide(agreeing, min_kappa=0.4)
    assert report["left_out"] == [] and grades[("z", "a")] == 3 and report["agreement"]["llm:same"]["kappa"] == 1


def test_judged_qrels_join_the_data_when_loaded_with_the_run_and_never_touch_the_data(tmp_path):
    data_dir = beir_folder(tmp_path / "data", {"q1": "one", "q2": "two", "q3": "three"}, {"q1": "a"})
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    lines = tmp_path / "queries.txt"
    lines.write_text("a real query\n")
    cfg = config(tmp_path, data_dir, queries_file=str(lines), dev_share=1.0)
    judging = judging_of(data_dir, cfg)
    [real] = judging.candidates
    judging.journal.grade(real, "b", 3)
    judging.journal.grade(real, "c", 0)
    assert judged_dev_fingerprint(cfg.run_dir) is None
    stats = write_judged(judging, cfg)
    assert (stats["dev"], stats["test"]) == (1, 0)
    run = tmp_path / "run"
    data = load_beir(data_dir, limits="off", run_dir=run)
    assert data.queries[real] == "a real query" and data.qrels["dev"] == {real: {"b": 3, "c": 0}}
    assert data.qrels["test"] == {"q1": {"a": 1}}  # the data's own labels, as they were
    assert load_beir(data_dir, limits="off").qrels == {"test": {"q1": {"a": 1}}}  # without the run: the data
    assert {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()} == before
    dev = judged_dev_fingerprint(run)
    (run / "judged" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq2\ta\t1\n")
    assert judged_dev_fingerprint(run) == dev  # judged test queries change no trained model
    judging.journal.grade(real, "a", 2)
    write_judged(judging, cfg)
    assert judged_dev_fingerprint(run) != dev
    # a query judged here and labelled in the data: two sources of truth, refused by name
    (run / "judged" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tb\t1\n")
    with pytest.raises(DataError, match="test.tsv: query-id 'q1' is judged here and labelled in .*data/qrels/test"):
        load_beir(data_dir, limits="off", run_dir=run)


def test_the_judging_screen_grades_skips_and_undoes_by_button_and_key_and_resumes(tmp_path):
    from embtune.judging_widget import JudgingScreen

    data_dir = beir_folder(tmp_path / "data", {"q1": "one", "q2": "two <b>"}, {})
    cfg = config(tmp_path, data_dir)
    pairs = [("q1", "a"), ("q1", "b"), ("q2", "c")]
    judging = judging_of(data_dir, cfg, pairs)
    screen = JudgingScreen(judging)
    buttons = {b.description.split()[0]: b for b in screen.box.children[3].children}
    assert screen.pair == ("q1", "a") and "0 of 3" in screen.progress.value
    buttons["3"].click()
    assert screen.pair == ("q1", "b") and judging.journal.grades() == {("q1", "a"): 3}
    buttons["skip"].click()
    assert screen.pair == ("q2", "c") and "2 of 3" in screen.progress.value and "(1 skipped)" in screen.progress.value
    assert "two &lt;b&gt;" in screen.query.value  # text shown as text, not markup
    screen.keys.value = "u"  # the skip taken back: its pair is on screen again
    assert screen.pair == ("q1", "b") and screen.keys.value == ""
    screen.keys.value = "1"
    buttons["0"].click()
    assert screen.pair is None and "All pairs judged" in screen.query.value
    assert judging.journal.grades() == {("q1", "a"): 3, ("q1", "b"): 1, ("q2", "c"): 0}
    screen.keys.value = "x"  # not a key: nothing happens
    assert judging.journal.grades() == {("q1", "a"): 3, ("q1", "b"): 1, ("q2", "c"): 0}
    # a new screen on the same journal (the notebook rerun after a crash) resumes where it stopped
    resumed = JudgingScreen(judging_of(data_dir, cfg, pairs))
    assert resumed.pair is None and "3 of 3" in resumed.progress.value
    buttons = {b.description.split()[0]: b for b in resumed.box.children[3].children}
    buttons["undo"].click()
    assert resumed.pair == ("q2", "c")
