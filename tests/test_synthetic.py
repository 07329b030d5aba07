"""Notebook 01's library: generators (a real loopback HTTP server speaking the OpenAI chat API, the tiny Qwen3
causal LM in process, ICT and cropping), reply parsing, the filters on planted cases, BEIR output and resume."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import send_json, write_beir
from embtune.data import load_beir, training_labels
from embtune.generators import Endpoint, GeneratorError, LocalLM, crop, ict, identifier_words, parse_queries, prose
from embtune.synthetic import SynthConfig, cosine_floor, generate, read_journal

DOCS = {
    "eiffel": "The Eiffel Tower in Paris was completed in 1889 for the World's Fair. It is made of wrought iron.",
    "cell": "The mitochondria is the powerhouse of the cell. It produces ATP through cellular respiration.",
    "rust": "Rust is a systems programming language focused on memory safety. It has no garbage collector.",
    "search": "A binary search halves the search interval at every step. It needs a sorted array.",
    "coffee": "Coffee beans are roasted seeds of the Coffea plant. Roasting changes their flavour and colour.",
    "volcano": "A volcano erupts when magma rises through the crust. Lava flows can reach 1200 degrees Celsius.",
    "tower": "Paris's wrought-iron lattice tower by Gustave Eiffel was finished in 1889 and is 330 metres tall.",
}
# The fake LLM's reply for each document (found by a word of the document in the prompt).
REPLIES = {
    "eiffel": '```json\n{"queries": ["When was the Eiffel Tower in Paris completed?"]}\n```',
    "cell": '{"queries": ["ATP?"]}',  # too short
    "rust": '{"queries": ["Which programming language focuses on memory safety without a garbage collector?"]}',
    "search": '{"queries": ["recipe for chocolate cake with strawberries"]}',  # off-topic: the filters drop it
    "coffee": '{"queries": ["When was the Eiffel Tower in Paris completed?"]}',  # good elsewhere, not here
    "tower": '{"queries": ["When was the Eiffel Tower in Paris completed?"]}',  # a duplicate of eiffel's
    "volcano": '{"queries": ["What happens when magma rises through the crust of a volcano?"]}',
}


class FakeLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions; `script` is a list of failures to serve before answering."""

    script: list = []
    requests: list = []
    delay = 0.0
    refuse = ""  # a word: prompts holding it are refused (HTTP 400)

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"body": body, "auth": self.headers.get("Authorization")})
        action = type(self).script.pop(0) if type(self).script else "ok"
        if action == "timeout":
            time.sleep(1.5)
        if action in ("500", "timeout"):
            return self._send(500, b'{"error": "overloaded"}')
        if action == "400":
            return self._send(400, b'{"error": "unknown model"}')
        if action == "malformed":
            return self._send(200, b"<html>bad gateway</html>")
        if action == "429":
            return self._send(429, b'{"error": "slow down"}', {"Retry-After": "1"})
        time.sleep(type(self).delay)
        prompt = body["messages"][-1]["content"]
        if type(self).refuse and type(self).refuse in prompt:
            return self._send(400, b'{"error": "content filter"}')
        if prompt.startswith("Rate how well"):
            content = "Score: 5" if prompt.count("Eiffel") >= 2 else "2"
        else:
            content = next(reply for key, reply in REPLIES.items() if DOCS[key][:30] in prompt)
        reply = {"choices": [{"message": {"role": "assistant", "content": content}}], "usage": {"total_tokens": 10}}
        self._send(200, json.dumps(reply).encode())

    def _send(self, code, payload, headers=None):
        send_json(self, code, payload, headers)


@pytest.fixture
def llm_server():
    FakeLLM.script, FakeLLM.requests, FakeLLM.delay, FakeLLM.refuse = [], [], 0.0, ""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture
def corpus(tmp_path):
    """A BEIR folder with a test split only: no training labels, as most users have."""
    docs = "\n".join(json.dumps({"_id": k, "title": "", "text": v}) for k, v in DOCS.items())
    queries = json.dumps({"_id": "t1", "text": "Eiffel Tower completion"})
    return write_beir(tmp_path / "data", docs, queries, {"test": "query-id\tcorpus-id\tscore\nt1\teiffel\t1\n"})


def synth_config(run_dir, generator, data_dir="unused", **kw):
    return SynthConfig(data_dir=str(data_dir), run_dir=str(run_dir), base_model="unused", generator_model=generator,
                       **kw)  # fmt: skip


def endpoint_config(run_dir, url, **kw):
    return synth_config(run_dir, "openai:fake", base_url=url, batch_size=2, max_retries=3, **kw)


def test_parse_queries_from_json_anywhere_in_the_reply_and_never_from_prose():
    assert parse_queries('{"queries": ["a b", " c "]}') == ["a b", "c"]
    assert parse_queries('Sure!\n```json\n{"query": "x y"}\n```') == ["x y"]
    assert parse_queries('<think>let me think {"queries": ["no"]}</think>["p q", {"query": "r s"}]') == ["p q", "r s"]
    # not the JSON asked for: prose, numbered lines, an error page hold no query whatever the filters would say
    assert parse_queries('1. "first query"\n2) second query\n- Query: third\nHere are queries:') == []
    assert parse_queries("<html><body>502 Bad Gateway: the upstream timed out</body></html>") == []
    assert parse_queries('{"queries": [{"query": "cut off", "x": 1}, {"query": "never fin') == ["cut off"]
    assert parse_queries('{"queries":[{"query":{"type":"1","description":"Doc') == []  # no query in it
    # reasoning cut off by the token limit, never closed: nothing in it is a query
    assert parse_queries('<think>maybe {"queries": ["not this"]} or a line\nlike this') == []
    assert parse_queries("") == []


def test_endpoint_retries_500s_timeouts_and_malformed_replies(llm_server, monkeypatch):
    FakeLLM.script = ["500", "timeout", "malformed"]
    client = Endpoint(llm_server, "fake", api_key="sk-test", timeout=0.5, backoff=0.01)
    assert client.chat("Document:\n" + DOCS["rust"]) == REPLIES["rust"]
    assert len(FakeLLM.requests) == 4 and FakeLLM.requests[-1]["auth"] == "Bearer sk-test"
    assert FakeLLM.requests[-1]["body"]["model"] == "fake" and client.tokens_used == 10


def test_endpoint_gives_up_with_a_clear_error(llm_server):
    FakeLLM.script = ["400"]
    with pytest.raises(GeneratorError, match="refused the request: HTTP 400"):
        Endpoint(llm_server, "fake", backoff=0.01).chat("hi")
    assert len(FakeLLM.requests) == 1  # a client error is not retried
    FakeLLM.script = ["500"] * 3
    with pytest.raises(GeneratorError, match="failed 3 times, last: HTTP 500.*rerun to resume"):
        Endpoint(llm_server, "fake", max_retries=2, backoff=0.01).chat("hi")


def test_filters_on_planted_cases_and_beir_output(llm_server, corpus, minilm, minilm_path, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    data = load_beir(corpus, limits="off")
    config = endpoint_config(tmp_path / "run", llm_server, min_cosine=0.3, round_trip_k=2, data_dir=corpus)
    stats = generate(minilm, minilm_path, data, config)
    journal = {r["doc_id"]: r for r in read_journal(tmp_path / "run" / "synthetic" / "generations.jsonl")}
    verdict = {d: [q["dropped_by"] for q in r["queries"]] for d, r in journal.items()}
    assert verdict == {
        "eiffel": [None],
        "cell": ["length"],
        "rust": [None],
        "search": ["cosine"],
        "coffee": ["cosine"],
        "volcano": [None],
        "tower": ["duplicate"],
    }
    assert stats["removed"] == {"length": 1, "cosine": 2, "round_trip": 0, "judge": 0, "duplicate": 1}
    assert stats["kept"] == 3 and stats["tokens_used"] == len(DOCS) * 10
    assert FakeLLM.requests[0]["auth"] == "Bearer sk-from-env"  # the key comes from the environment
    assert journal["eiffel"]["reply"] == REPLIES["eiffel"] and "Document:" in journal["eiffel"]["prompt"]
    labels = training_labels(data, tmp_path / "run")  # the suite reads it as BEIR, ids prefixed
    assert labels.qrels == {"synthetic:eiffel#0": {"eiffel": 1}, "synthetic:rust#0": {"rust": 1},
                            "synthetic:volcano#0": {"volcano": 1}}  # fmt: skip
    assert labels.queries["synthetic:volcano#0"] == "What happens when magma rises through the crust of a volcano?"


def test_round_trip_and_judge_filters(llm_server, corpus, minilm, minilm_path, tmp_path):
    data = load_beir(corpus, limits="off")

    def verdicts(run, **filters):
        generate(minilm, minilm_path, data, endpoint_config(tmp_path / run, llm_server, **filters))
        return {r["doc_id"]: r["queries"][0]["dropped_by"] for r in read_journal(tmp_path / run / "synthetic" /
                "generations.jsonl") if r["queries"]}  # fmt: skip

    # Round trip, k=1: each good query finds its own document first; the off-topic ones, and the Eiffel query
    # asked of the coffee document or of the other Eiffel document, do not.
    assert verdicts("a", min_cosine=None, round_trip_k=1) == {
        "cell": "length",
        "coffee": "round_trip",
        "eiffel": None,
        "rust": None,
        "search": "round_trip",
        "tower": "round_trip",
        "volcano": None,
    }
    # The judge (the same fake LLM) rates 5 only an Eiffel query on an Eiffel document.
    assert verdicts("b", min_cosine=None, round_trip_k=None, judge_min_score=4) == {
        "cell": "length",
        "coffee": "judge",
        "eiffel": None,
        "rust": "judge",
        "search": "judge",
        "tower": "duplicate",
        "volcano": "judge",
    }


def test_killed_run_resumes_to_the_same_files(llm_server, corpus, minilm_path, tmp_path):
    script = (
        "import sys; from embtune.data import load_beir; from embtune.models import load_embedder;"
        "from embtune.synthetic import SynthConfig, generate;"
        f"data = load_beir({str(corpus)!r}, limits='off');"
        f"generate(load_embedder({minilm_path!r}), {minilm_path!r}, data, SynthConfig(data_dir='-', base_model='-',"
        f"run_dir=sys.argv[1], generator_model='openai:fake', base_url={llm_server!r}, batch_size=1, concurrency=1))"
    )
    run = [sys.executable, "-c", script]
    subprocess.run([*run, str(tmp_path / "whole")], check=True, capture_output=True)
    FakeLLM.delay = 0.5
    journal = tmp_path / "cut" / "synthetic" / "generations.jsonl"
    proc = subprocess.Popen([*run, str(tmp_path / "cut")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (journal.exists() and journal.read_text().count("\n") >= 2):
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(journal, "a") as f:
        f.write('{"doc_id": "half-writ')  # as if killed mid-write
    lines_before = journal.read_text().count("\n")
    assert lines_before < len(DOCS)
    FakeLLM.delay = 0.0
    n_requests = len(FakeLLM.requests)
    subprocess.run([*run, str(tmp_path / "cut")], check=True, capture_output=True)
    assert len(FakeLLM.requests) - n_requests == len(DOCS) - lines_before  # journaled documents are not redone
    for name in ("generations.jsonl", "queries.jsonl", "qrels/train.tsv"):
        whole = (tmp_path / "whole" / "synthetic" / name).read_text()
        assert (tmp_path / "cut" / "synthetic" / name).read_text() == whole, name


def test_ict_and_crop_are_seeded_and_take_the_query_out():
    doc = {"title": "Paris", "text": DOCS["eiffel"] + " " + DOCS["volcano"]}
    query, view, form = ict(doc, random.Random(1), keep=0.0)
    assert form == "sentences" and query in doc["text"] and query not in view["text"] and view["title"] == "Paris"
    assert ict(doc, random.Random(1), keep=0.0) == (query, view, form)
    assert ict({"title": "", "text": "One sentence only."}, random.Random(0)) is None
    q, v, _ = crop(doc, random.Random(2))
    assert q in doc["text"] and v["text"] in doc["text"] and 2 <= len(q.split()) <= len(doc["text"].split()) // 2
    chinese = {"title": "", "text": "埃菲尔铁塔位于巴黎，于一八八九年建成，是为了世界博览会而建造的铁塔。"}
    q, v, form = crop(chinese, random.Random(0))
    assert q in chinese["text"] and " " not in q and form == "characters"  # characters, not spaced words


# Documents with no sentence punctuation: source code, table rows, log lines, an identifier list.
UNPUNCTUATED = [
    "def read_config(path):\n    with open(path) as f:\n        data = json.load(f)\n    return validate(data)",
    "class LRUCache:\n    def __init__(self, size):\n        self.size = size\n        self.items = OrderedDict()",
    "name | role | since\nalice | admin | 2019\nbob | editor | 2021\ncarol | viewer | 2023",
    "2024-01-03 12:00:01 INFO starting worker 3\n2024-01-03 12:00:02 WARN queue depth 812\n"
    "2024-01-03 12:00:09 ERROR worker 3 timed out after 30 s",
    "SELECT user_id, count(*) FROM orders WHERE created_at > now() - interval 7 day GROUP BY user_id",
    "kubectl rollout restart deployment api-gateway --namespace production",
    "rsync -avz --delete ./build/ deploy@web01:/srv/www/site/ && systemctl reload nginx",
    "ERR_CONNECTION_RESET net::ERR_TIMED_OUT DNS_PROBE_FINISHED_NXDOMAIN SSL_ERROR_BAD_CERT_DOMAIN",
    "用户 订单 支付 退款 物流 仓库 库存 供应商 采购 财务 报表 审计",
    "import numpy as np\nimport pandas as pd\nfrom sklearn.model_selection import train_test_split\nX, y = load()",
]


@pytest.mark.parametrize("method", [ict, crop])
def test_no_llm_generators_make_pairs_for_documents_without_sentences(method):
    made = [method({"title": "", "text": t}, random.Random(i)) for i, t in enumerate(UNPUNCTUATED)]
    assert sum(m is not None for m in made) >= 0.9 * len(UNPUNCTUATED)
    for text, m in zip(UNPUNCTUATED, made, strict=True):
        if m:
            query, view, form = m
            assert query and view["text"] and form in ("lines", "words", "characters")
            pieces = [query] if form == "characters" else query.split()  # characters are joined without spaces
            assert all(p in text.replace(" " if form == "characters" else "\0", "") for p in pieces)
            assert len(query) < len(text)


CODE = """def read_config_file(path, encoding="utf-8"):
    # Read the whole file and parse it as TOML;
    # missing keys fall back to the defaults.
    with open(path, encoding=encoding) as f:  # text mode turns CRLF into LF
        text = f.read()
    x = 1  # noqa: F841
    return parse(text)
"""


def test_prose_queries_come_from_comments_and_names_and_leave_the_positive():
    made = {}
    for seed in range(40):
        query, view, form = prose({"title": "", "text": CODE}, random.Random(seed), keep=0.0)
        made[query] = (view["text"], form)
    comment = "Read the whole file and parse it as TOML; missing keys fall back to the defaults."
    assert set(made) == {comment, "text mode turns CRLF into LF", "read config file"}  # not "noqa: F841"
    paragraph, paragraph_form = made[comment]
    assert paragraph_form == "comments" and "TOML" not in paragraph and "missing keys" not in paragraph
    assert "CRLF" not in made["text mode turns CRLF into LF"][0] and "with open(path" in paragraph
    assert made["read config file"] == (CODE.strip("\n"), "names")  # the name stays: the query is its words
    c = "int main() {\n  /* 读取配置文件并解析 */\n  return load();\n}"
    query, view, form = prose({"title": "", "text": c}, random.Random(0), keep=0.0)
    assert (query, form) == ("读取配置文件并解析", "comments") and "读取" not in view["text"]
    assert prose({"title": "", "text": "x = 1\ny = 2  # ok\n#include <stdio.h>"}, random.Random(0)) is None
    assert prose({"title": "", "text": "A paragraph of prose, with no code in it at all."}, random.Random(0)) is None


def test_identifiers_split_into_the_words_people_type():
    assert identifier_words("read_config_file") == "read config file"
    assert identifier_words("readConfigFile") == "read config file"
    assert identifier_words("HTTPServerError") == "http server error"
    assert identifier_words("__init__") == "init" and identifier_words("parse2Json") == "parse2 json"


def test_ict_without_an_llm_writes_training_views(corpus, minilm, minilm_path, tmp_path):
    data = load_beir(corpus, limits="off")
    stats = generate(minilm, minilm_path, data, synth_config(tmp_path, "ict", corpus, min_cosine=None))
    assert stats["generator"] == "inverse cloze task (no LLM)"
    assert stats["kept"] == len(DOCS) and stats["documents_without_queries"] == 0
    # "tower" is one sentence: a span of its words is the query there
    assert stats["by_form"] == {"sentences": {"made": len(DOCS) - 1, "kept": len(DOCS) - 1},
                                "words": {"made": 1, "kept": 1}}  # fmt: skip
    labels = training_labels(data, tmp_path)
    for qid, docs in labels.qrels.items():
        [doc] = docs
        view = labels.views[qid]["text"]
        text = data.corpus[doc]["text"]
        assert labels.queries[qid] in text and all(word in text for word in view.split())


def test_local_causal_lm_generates_in_process(tiny_models, corpus, tiny_embedding, tmp_path):
    from embtune.models import load_embedder

    lm = LocalLM(str(tiny_models[1]), max_new_tokens=8)
    replies = lm.generate(["Document: a short one", "Document: a much longer document than the first one"])
    assert len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    config = synth_config(tmp_path, str(tiny_models[1]), min_chars=1, min_cosine=None, round_trip_k=None)
    model = load_embedder(str(tiny_embedding))
    # A random LM writes no JSON: every document is journaled with its reply, no query is kept, and the run
    # stops with one line saying so rather than training on nothing.
    with pytest.raises(GeneratorError, match="no synthetic query passed the filters.*no query parsed"):
        generate(model, str(tiny_embedding), load_beir(corpus, limits="off"), config, generator=lm)
    rows = read_journal(tmp_path / "synthetic" / "generations.jsonl")
    assert len(rows) == len(DOCS) and all(r["reply"] for r in rows)
    assert not (tmp_path / "synthetic" / "queries.jsonl").exists()


def test_token_and_document_budgets(llm_server, corpus, minilm, minilm_path, tmp_path):
    data = load_beir(corpus, limits="off")
    stats = generate(minilm, minilm_path, data, endpoint_config(tmp_path / "t", llm_server, max_total_tokens=25))
    assert stats["documents"] == 4 and stats["tokens_used"] == 40  # stopped once 25 were spent, batch by batch
    stats = generate(minilm, minilm_path, data, endpoint_config(tmp_path / "d", llm_server, max_documents=3))
    assert stats["documents"] == 3


def test_cosine_floor_is_the_guides_for_llm_queries_and_off_for_spans_of_the_document():
    assert cosine_floor(synth_config("r", "openai:qwen")) == 0.7
    assert cosine_floor(synth_config("r", "ict")) is None and cosine_floor(synth_config("r", "crop")) is None
    assert cosine_floor(synth_config("r", "ict", min_cosine=0.5)) == 0.5
    with pytest.raises(ValueError, match='"auto"'):
        cosine_floor(synth_config("r", "ict", min_cosine="high"))


# Qwen3's chat template (Qwen/Qwen3-0.6B tokenizer_config.json), the part that renders the assistant turn.
QWEN3_GENERATION_PROMPT = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def test_local_qwen3_generator_asks_for_no_thinking(tiny_models):
    lm = LocalLM(str(tiny_models[1]), max_new_tokens=4)
    lm.tokenizer.chat_template = QWEN3_GENERATION_PROMPT
    assert lm._chat("Write a query.").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_endpoint_honours_retry_after_and_never_shows_the_key(llm_server):
    FakeLLM.script = ["429"]
    client = Endpoint(llm_server, "fake", api_key="sk-secret-123", backoff=0.01)
    start = time.perf_counter()
    assert client.chat("Document:\n" + DOCS["rust"]) == REPLIES["rust"]
    assert time.perf_counter() - start >= 0.75  # Retry-After: 1 (jittered by at most a fifth), not the 0.01 back-off
    assert "sk-secret" not in repr(client) and "sk-secret" not in str(client.__dict__.get("_lock"))


def test_the_answered_replies_of_a_failed_batch_are_kept(llm_server, corpus, minilm, minilm_path, tmp_path,
                                                         monkeypatch):  # fmt: skip
    """One request of a batch refused: the others are journaled before the error stops the run, the key is in
    no file written, and the rerun asks only for the document that failed."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    data = load_beir(corpus, limits="off")
    config = synth_config(tmp_path / "run", "openai:fake", corpus, base_url=llm_server, batch_size=len(DOCS),
                          max_retries=0, round_trip_k=None)  # fmt: skip
    FakeLLM.refuse = DOCS["rust"][:30]
    with pytest.raises(GeneratorError, match="refused the request"):
        generate(minilm, minilm_path, data, config)
    journal = read_journal(tmp_path / "run" / "synthetic" / "generations.jsonl")
    assert sorted(r["doc_id"] for r in journal) == sorted(set(DOCS) - {"rust"})
    FakeLLM.refuse, FakeLLM.requests = "", []
    stats = generate(minilm, minilm_path, data, config)
    assert [r["body"]["messages"][-1]["content"] for r in FakeLLM.requests] == [
        next(r["prompt"] for r in read_journal(tmp_path / "run" / "synthetic" / "generations.jsonl")
             if r["doc_id"] == "rust")]  # fmt: skip
    assert stats["documents"] == len(DOCS)
    for path in (tmp_path / "run").rglob("*"):
        assert path.is_dir() or b"sk-secret" not in path.read_bytes(), path
