"""Exports for serving (embtune.export) and the served-equals-trained check (embtune.serving): the reference is
plain sentence-transformers in its own process, the target is reached the way SERVING.md deploys it (the consumer
client on ONNX, llama-server on GGUF, HTTP on a server). A correct export passes; each way an export or a server
goes wrong fails with that way named."""

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from embtune import consumer
from embtune.encode import encode, query_prompt
from embtune.export import (
    ExportConfig,
    NoGGUF,
    check_exports,
    export_gguf,
    export_model,
    export_onnx,
    find_converter,  # fmt: skip
    quantize_int8,
    rerank_template,
)
from embtune.serving import check, check_reranker, table


@pytest.fixture(scope="module")
def tiny(tiny_embedding):
    from embtune.models import load_embedder

    return load_embedder(str(tiny_embedding), device="cpu")


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tiny_embedding, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export_onnx(tiny, tiny_embedding, out / "onnx")
    quantize_int8(out / "onnx", out / "onnx-int8")
    return out


def broken_copy(folder: Path, dest: Path, tokenizer=None, tokenizer_config=None, pooling=None) -> Path:
    """A copy of an exported folder with one file edited the way a broken export would have it."""
    shutil.copytree(folder, dest)
    for name, edit in (("tokenizer.json", tokenizer), ("tokenizer_config.json", tokenizer_config),
                       ("1_Pooling/config.json", pooling)):  # fmt: skip
        if edit:
            data = json.loads((dest / name).read_text())
            edit(data)
            (dest / name).write_text(json.dumps(data))
    return dest


def test_the_onnx_export_of_the_tiny_qwen3_embedder_embeds_what_the_model_does(tiny, tiny_embedding, tiny_onnx):
    result = check(tiny_embedding, tiny_onnx / "onnx", model=tiny)
    assert result.passed and result.precision == "float" and result.cause is None and result.error is None
    assert result.min_cosine >= 0.999 and result.identical == 1.0 and result.norm_error < 1e-4
    # what must survive the export: left padding, and the end token appended by the tokenizer itself
    tokenizer = json.loads((tiny_onnx / "onnx" / "tokenizer.json").read_text())
    assert tokenizer["post_processor"]["single"][-1] == {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    assert json.loads((tiny_onnx / "onnx" / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert not list((tiny_onnx / "onnx").glob("*.safetensors"))  # the graph only, not the torch weights again


def test_an_onnx_export_whose_tokenizer_lost_the_end_token_fails_and_says_so(tiny, tiny_embedding, tiny_onnx, tmp_path):
    """The check reads the folder as a consumer does, so a tokenizer.json without the post-processor that appends
    <|endoftext|> is what gets measured (the old check put the end token back in memory and passed)."""
    broken = broken_copy(tiny_onnx / "onnx", tmp_path / "onnx", tokenizer=lambda t: t.update(post_processor=None))
    result = check(tiny_embedding, broken, model=tiny)
    assert not result.passed and result.cause.startswith("end token missing"), table([result])


def test_an_onnx_export_pooling_the_mean_fails_and_says_so(tiny, tiny_embedding, tiny_onnx, tmp_path):
    broken = broken_copy(tiny_onnx / "onnx", tmp_path / "onnx", pooling=lambda c: c.update(pooling_mode="mean"))
    result = check(tiny_embedding, broken, model=tiny)
    assert not result.passed and result.cause.startswith("pooling: mean"), table([result])


def test_an_onnx_export_padding_right_is_read_right_by_a_mask_aware_client(tiny, tiny_embedding, tiny_onnx, tmp_path):
    """Right padding is harmless where last-token pooling follows the attention mask (sentence-transformers, the
    Qwen3 model card, SERVING.md's client): the check must not call it a failure. What right padding breaks is a
    server reading the last position: `test_a_server_that_gets_one_thing_wrong...[padding side: right]`."""
    right = {"tokenizer_config": lambda c: c.update(padding_side="right")}
    broken = broken_copy(tiny_onnx / "onnx", tmp_path / "onnx", **right)
    assert consumer.OnnxEmbedder(broken).tokenizer.padding["direction"] == "right"
    result = check(tiny_embedding, broken, model=tiny)
    assert result.passed, table([result])


def test_the_consumer_imports_nothing_of_embtune_and_serving_md_carries_it_verbatim(tiny, tiny_embedding, tiny_onnx,
                                                                                     tmp_path):
    from embtune.export import write_serving

    source = Path(consumer.__file__)
    command = [sys.executable, "-I", str(source), "onnx", str(tiny_onnx / "onnx")]
    done = subprocess.run(command, input=json.dumps({"texts": ["a text"]}), capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["imported_embtune"] is False
    assert "embtune" not in source.read_text().split('"""', 2)[2].replace("imported_embtune", "").replace(
        '"embtune"', "")  # no import of it anywhere below the docstring  # fmt: skip
    config = ExportConfig(data_dir="", run_dir=str(tmp_path), base_model="")
    result = {"written": {"onnx": str(tiny_onnx / "onnx")}, "skipped": {}}
    text = write_serving("embedder", tiny_embedding, tiny, result, config).read_text()
    assert source.read_text().rstrip() in text
    assert (tmp_path / "export" / "consumer.py").read_text() == source.read_text()


def test_int8_on_the_tiny_model_stays_within_its_threshold_and_noise_is_not_called_a_serving_mistake(
    tiny, tiny_embedding, tiny_onnx
):
    """Weight-only int8 keeps every cosine of the random tiny model above even the float threshold; the top 10
    of a random model are so close that int8 can reorder them, and then the cause is precision, not a bug."""
    result = check(tiny_embedding, tiny_onnx / "onnx-int8", model=tiny)
    assert result.precision == "int8" and result.min_cosine >= 0.999
    assert result.passed or result.cause.startswith("precision")


def test_the_int8_export_of_a_trained_model_passes(minilm, minilm_path, tmp_path):
    """On a trained model (all-MiniLM-L6-v2), weight-only int8 meets the int8 threshold and keeps the top 10."""
    export_onnx(minilm, minilm_path, tmp_path / "onnx")
    result = check(minilm_path, quantize_int8(tmp_path / "onnx", tmp_path / "onnx-int8"), model=minilm)
    assert result.passed and result.min_cosine >= 0.99 and result.identical >= 0.95, table([result])


# ---------------------------------------------------------------------------------------------------- servers


def serve(embed):
    """A loopback OpenAI-compatible /v1/embeddings server over `embed(texts) -> vectors`; (url, stop)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/v1/embeddings"
            try:
                vectors = embed(body["input"])
            except ValueError as e:  # what servers answer to an input they refuse
                status, reply = 400, json.dumps({"error": {"message": str(e)}}).encode()
            else:
                data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
                status, reply = 200, json.dumps({"object": "list", "data": data[::-1]}).encode()  # clients sort
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", server.shutdown


def _last_position(model, texts, padding_side, special_tokens=True, max_length="model"):
    """A hand-written server: tokenize, run the transformer, read the last position (no pooling module)."""
    tokenizer = model.tokenizer
    length = model.max_seq_length if max_length == "model" else max_length
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        enc = tokenizer(texts, padding=True, truncation=length is not None, max_length=length,
                        add_special_tokens=special_tokens, return_tensors="pt")  # fmt: skip
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        hidden = model[0].auto_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    vectors = hidden.last_hidden_state[:, -1].numpy()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _pooled(model, mode):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    other = SentenceTransformer(modules=[model[0], Pooling(model.get_embedding_dimension(), mode), Normalize()])
    return lambda texts: other.encode(texts, convert_to_numpy=True)


SERVERS = {
    # the prompt the client sent is lost on the way (e.g. a gateway that rewrites inputs)
    "instruction missing": lambda m: lambda texts: encode(m, [t.removeprefix(query_prompt(m)) for t in texts],
                                                          progress=False),  # fmt: skip
    # TEI started with --default-prompt-name query: the prompt goes in front of every input, documents too
    "query prompt on every text": lambda m: lambda texts: encode(m, [query_prompt(m) + t for t in texts],
                                                                 progress=False),  # fmt: skip
    "pooling: mean": lambda m: _pooled(m, "mean"),
    "pooling: first token": lambda m: _pooled(m, "cls"),
    "padding side: right": lambda m: lambda texts: _last_position(m, texts, "right"),
    "end token missing": lambda m: lambda texts: _last_position(m, texts, "left", special_tokens=False),
}


def test_a_server_that_embeds_like_the_model_passes(tiny, tiny_embedding):
    url, stop = serve(lambda texts: encode(tiny, texts, "document", progress=False))
    try:
        result = check(tiny_embedding, url, model=tiny, batch_size=8)
    finally:
        stop()
    assert result.passed and result.min_cosine >= 0.999 and result.cause is None, table([result])


@pytest.mark.parametrize("mistake", list(SERVERS))
def test_a_server_that_gets_one_thing_wrong_fails_with_that_thing_named(tiny, tiny_embedding, mistake):
    url, stop = serve(SERVERS[mistake](tiny))
    try:
        result = check(tiny_embedding, url, model=tiny, batch_size=8)
    finally:
        stop()
    assert not result.passed, table([result])
    assert result.cause.startswith(mistake), (result.cause, result.hypotheses)
    assert result.hypotheses[max(result.hypotheses, key=result.hypotheses.get)] > 0.999  # explained in full


def test_a_server_that_does_not_normalise_fails_and_says_so(tiny, tiny_embedding):
    """Same directions, other lengths: cosine alone would pass it (the old check normalised the target)."""
    url, stop = serve(lambda texts: 3 * encode(tiny, texts, "document", progress=False))
    try:
        result = check(tiny_embedding, url, model=tiny, batch_size=8)
    finally:
        stop()
    assert result.min_cosine >= 0.999 and not result.passed and result.norm_error > 1, table([result])
    assert result.cause.startswith("not normalised"), result.cause


def test_a_server_that_truncates_elsewhere_fails_on_the_long_texts_sent_unclipped(tiny, tiny_embedding):
    """The client clips, so every clipped text agrees; the long ones sent once unclipped show the server embeds
    more of them than the model does."""
    url, stop = serve(lambda texts: _last_position(tiny, texts, "left", max_length=None))
    try:
        result = check(tiny_embedding, url, model=tiny, batch_size=8)
    finally:
        stop()
    assert result.min_cosine >= 0.999 and not result.passed, table([result])
    assert result.cause.startswith("truncation: texts over 256 tokens, sent unclipped"), result.cause


def test_a_server_that_refuses_long_texts_passes_and_the_refusal_is_reported(tiny, tiny_embedding):
    """A server that rejects over-long inputs (vLLM without truncation, llama-server past its batch) is safe:
    the client clips. The row says what it did."""

    def embed(texts):
        lengths = [len(tiny.tokenizer(t)["input_ids"]) for t in texts]
        if max(lengths) > tiny.max_seq_length:
            raise ValueError("input is too long")
        return encode(tiny, texts, "document", progress=False)

    url, stop = serve(embed)
    try:
        result = check(tiny_embedding, url, model=tiny, batch_size=8)
    finally:
        stop()
    assert result.passed and result.long_texts.startswith("refused: "), table([result])


def test_a_bf16_chat_model_served_plain_text_is_diagnosed_as_such(tiny, tiny_embedding, tmp_path):
    """A model saved with a chat template (sentence-transformers 6 renders every text through it) served by a
    server that embeds the plain text: the cause named is the template, though every variant, tokenizing plain
    text, explains it as well; and in bf16 as loaded, the hypotheses are computed in float32 like the reference,
    so bf16's own drift does not decide between them."""
    from embtune.models import load_embedder

    folder = shutil.copytree(tiny_embedding, tmp_path / "chat-embedder")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    st_config = json.loads((folder / "sentence_bert_config.json").read_text())  # as sentence-transformers saves it
    st_config["modality_config"]["message"] = dict(st_config["modality_config"]["text"], format="flat")
    (folder / "sentence_bert_config.json").write_text(json.dumps(st_config))
    chat = load_embedder(str(folder), device="cpu").to(torch.bfloat16)
    assert "message" in chat[0].modality_config
    result = check(folder, lambda texts: encode(tiny, texts, "document", progress=False), model=chat)
    assert not result.passed and result.cause.startswith("chat template not applied"), (result.cause,
                                                                                          result.hypotheses)
    # float32 like the target: 0.99997 (computed in bf16 as loaded: 0.99987)
    assert result.hypotheses["chat template not applied"] > 0.99995, result.hypotheses


def test_an_unreachable_server_is_its_row_s_error_and_the_other_rows_are_kept(tiny, tiny_embedding, tiny_onnx,
                                                                               tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ExportConfig(data_dir="", run_dir=str(tmp_path), base_model="", serve_url=f"http://127.0.0.1:{port}/v1")
    rows = check_exports(config, "embedder", tiny_embedding, tiny, {"onnx": str(tiny_onnx / "onnx")})
    assert [r["passed"] for r in rows] == [True, False]
    assert "did not answer" in rows[1]["error"] and rows[1]["target"].endswith("/v1")


# ---------------------------------------------------------------------------------------------------- the rest


@pytest.fixture(scope="module")
def tiny_reranker(tiny_models, tmp_path_factory):
    """(folder, model): the tiny reranker saved as notebook 06 saves a trained one (with Qwen's template)."""
    from embtune.rerank import load_reranker

    folder = tmp_path_factory.mktemp("reranker") / "model"
    load_reranker(str(tiny_models[1]), device="cpu").save(str(folder))
    return folder, load_reranker(str(folder), device="cpu")


def test_the_onnx_export_of_the_tiny_qwen3_reranker_scores_what_the_model_does(tiny_reranker, tmp_path):
    """The causal-LM reranker's graph (last position's logits only), read by the consumer's reranker client with
    the model card's prompt, gives the P(yes) plain sentence-transformers gives."""
    folder, reranker = tiny_reranker
    export_onnx(reranker, folder, tmp_path / "onnx")
    result = check_reranker(folder, tmp_path / "onnx", model=reranker)
    assert result.passed and result.max_abs_diff < 1e-4 and result.identical == 1.0, table([result])
    assert result.min_spearman > 0.999


def test_the_onnx_export_of_a_cross_encoder_scores_what_it_does(minilm_path, tmp_path):
    """A cross-encoder (BERT-type, one logit): the consumer's reranker client encodes (query, document) as a pair
    and takes the sigmoid, as sentence-transformers' CrossEncoder does. A small random BERT with MiniLM's
    tokenizer (what is checked is the route, not the model's skill)."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=1)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(tmp_path / "cross")
    tokenizer.save_pretrained(tmp_path / "cross")
    reranker = CrossEncoder(str(tmp_path / "cross"), device="cpu")
    export_onnx(reranker, tmp_path / "cross", tmp_path / "onnx")
    assert not consumer.OnnxReranker(tmp_path / "onnx").causal
    result = check_reranker(tmp_path / "cross", tmp_path / "onnx", model=reranker)
    assert result.passed and result.max_abs_diff < 1e-4, table([result])


def _scores_like(reranker, change):
    def target(query, documents):
        return change(reranker.predict([(query, d) for d in documents], show_progress_bar=False))

    return target


@pytest.mark.parametrize("mistake, cause", [
    ("perturbed", "scores differ"),
    ("raw logits", "scores are not probabilities"),
])  # fmt: skip
def test_a_reranker_target_that_scores_otherwise_fails_and_says_so(tiny_reranker, mistake, cause):
    folder, reranker = tiny_reranker
    rng = np.random.default_rng(0)
    change = {"perturbed": lambda p: np.clip(p + rng.normal(0, 0.01, len(p)), 0, 1),
              "raw logits": lambda p: np.log(p / (1 - p))}[mistake]  # fmt: skip
    result = check_reranker(folder, _scores_like(reranker, change), model=reranker)
    assert not result.passed and result.cause.startswith(cause), table([result])
    same = check_reranker(folder, _scores_like(reranker, lambda p: p), model=reranker)
    assert same.passed, table([same])  # the same scores, through the same route, pass


# ---------------------------------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def converter():
    return find_converter("pypi")


def test_the_gguf_embedder_served_by_llama_server_embeds_what_the_model_does(tiny, tiny_embedding, converter,
                                                                             tmp_path):
    """The tiny model's GGUF (f32, so precision is not in question) through llama-server started with
    SERVING.md's command: texts clipped by the client, and the long ones unclipped, which llama-server refuses."""
    gguf = export_gguf(tiny, tiny_embedding, tmp_path / "model-f32.gguf", converter, "f32")
    result = check(tiny_embedding, gguf, model=tiny)
    assert result.error is None and result.passed and result.min_cosine >= 0.999, table([result])
    assert result.long_texts is not None


def test_the_gguf_reranker_is_a_qwen3_reranker_with_the_trained_instruction(tiny_reranker, converter, tmp_path):
    """Staged under a Qwen3-Reranker name and card, the converter writes a reranker (rank pooling, yes/no head,
    rerank template); the template carries the instruction trained with, and llama-server --reranking scores
    as plain sentence-transformers does with that instruction."""
    folder, reranker = tiny_reranker
    task = "Find the Python reference section that answers the question"
    gguf = export_gguf(reranker, folder, tmp_path / "model-f32.gguf", converter, "f32", reranker=True,
                       instruction=task)  # fmt: skip
    assert f"<Instruct>: {task}\n<Query>: {{query}}\n<Document>: {{document}}" in rerank_template(gguf)
    result = check_reranker(folder, gguf, model=reranker, instruction=task)
    assert result.error is None and result.passed, table([result])
    assert result.min_spearman >= 0.99 and result.identical >= 0.95
    default = check_reranker(folder, gguf, model=reranker)  # trained with the task, checked against the default
    assert not default.passed, table([default])


def test_without_a_converter_no_gguf_is_written_and_the_reason_is_given(tiny, tiny_embedding, tmp_path):
    with pytest.raises(NoGGUF, match="no llama.cpp converter"):
        find_converter(None)
    with pytest.raises(NoGGUF, match="convert_hf_to_gguf.py"):
        find_converter(str(tmp_path))
    config = ExportConfig(data_dir="", run_dir=str(tmp_path), base_model="", formats=["gguf"], llama_cpp=None)
    result = export_model(tiny, tiny_embedding, tmp_path / "export", config)
    assert result["written"] == {} and "llama_cpp" in result["skipped"]["gguf"]


def test_serving_md_is_written_from_the_model_s_own_prompts(tiny, tiny_embedding, tmp_path):
    from embtune.export import serving_markdown

    config = ExportConfig(data_dir="", run_dir=str(tmp_path), base_model="")
    result = {"written": {"onnx": str(tmp_path / "export" / "onnx")}, "skipped": {"gguf": "no converter"}}
    text = serving_markdown("embedder", tiny_embedding, tiny, result, config)
    prompt = json.dumps(tiny.prompts["query"])  # "Instruct: ...\nQuery:" exactly, escaped as in Python and JSON
    assert f"QUERY_PROMPT = {prompt}" in text and "QUERY_PROMPT + q for q in queries" in text
    assert "<|endoftext|>" in text and "--pooling last-token" in text and "--pooling last " in text
    assert "text-embeddings-inference" in text and "vllm serve" in text and "ollama" in text
    assert "gguf`: not written: no converter" in text and "256" in text  # the tiny model's max_seq_length
    # the recipes work as written: one llama-server slot, Ollama's port and model name, an ONNX client, batches
    tag = f"{tiny_embedding.parent.name}-{tiny_embedding.name}"  # the Ollama model name: the run and folder
    assert " -np 1 " in text and f'"http://localhost:11434/v1", "{tag}"' in text and f"ollama create {tag} " in text
    assert "OnnxEmbedder(" in text and "clip(QUERY_PROMPT + q)" in text and "BATCH = 32" in text
    config = ExportConfig(data_dir="", run_dir=str(tmp_path), base_model="", instruction="Find code")
    custom = serving_markdown("embedder", tiny_embedding, tiny, result, config)
    assert json.dumps("Instruct: Find code\nQuery:") in custom


def test_the_check_does_not_import_the_exporter():
    """serving.py reads exports only as a consumer does; export.py calls the check (one direction, no cycle)."""
    import ast

    import embtune.serving

    tree = ast.parse(Path(embtune.serving.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "export" not in imported and not any((m or "").endswith(".export") for m in imported)


def test_llama_cpp_is_told_a_pre_tokenizer_only_where_it_implements_that_one_exactly(tiny_embedding, tmp_path):
    """llama.cpp names pre-tokenizers by a hash of a vocabulary's ids, so a retrained vocabulary stops its
    converter (the tiny fixtures' retrained one does); the export names it only where llama.cpp has the same split."""
    from embtune.llama_cpp import QWEN2_SPLIT, stage_tokenizer

    qwen = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}  # fmt: skip
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spaced = dict(gpt2, add_prefix_space=True)  # a space before every text: not llama.cpp's "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, gpt2]}
    for expected, pre in [("qwen2", qwen), ("gpt-2", gpt2), ("", spaced), ("", digits),
                          ("", {"type": "BertPreTokenizer"})]:  # fmt: skip
        (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre}))
        assert stage_tokenizer(tmp_path / "tokenizer.json") == expected, pre
    shutil.copy(tiny_embedding / "tokenizer.json", tmp_path / "tokenizer.json")
    assert stage_tokenizer(tmp_path / "tokenizer.json") == "qwen2"  # Qwen2Tokenizer writes Qwen's split


def test_a_byte_level_bpe_staged_for_llama_cpp_loses_only_its_needless_byte_fallback(tiny_embedding, tmp_path):
    """transformers writes a byte-level BPE read from a GGUF file with `byte_fallback` set; llama.cpp's converter
    takes that for a SentencePiece vocabulary. The staged copy drops the flag and tokenizes every text as before;
    a SentencePiece-style BPE (no byte-level step) keeps it, as its unknown characters need it."""
    from tokenizers import Tokenizer

    from embtune.llama_cpp import stage_tokenizer

    data = json.loads((tiny_embedding / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    texts = ["Instruct: find code\nQuery:def f(x):", "函数使用 def 关键字定义", "naïve café 🙂 \t tabs", "x" * 300]
    before = [e.ids for e in Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode_batch(texts)]
    stage_tokenizer(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["byte_fallback"] is False
    assert [e.ids for e in Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode_batch(texts)] == before
    spm = {"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": {"type": "Metaspace"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spm))
    stage_tokenizer(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == spm


def test_a_llama_embedder_with_the_tokenizer_transformers_reads_from_gguf_is_served_by_llama_server(
        tiny, tiny_embedding, converter, tmp_path):  # fmt: skip
    """A Llama-architecture embedder (SmolLM2's shape) whose tokenizer is a byte-level BPE flagged byte_fallback
    with a Sequence decoder, kept as is (TokenizersBackend), as transformers writes one read from a GGUF file:
    converted without staging, its
    GGUF carried a SentencePiece vocabulary that llama-server cannot load (HTTP 500); staged, it embeds as the
    model does."""
    from transformers import LlamaConfig, LlamaModel

    from embtune.models import load_embedder

    folder = shutil.copytree(tiny_embedding, tmp_path / "tiny-llama-embedding")
    qwen = tiny[0].auto_model.config
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=qwen.vocab_size, hidden_size=qwen.hidden_size, num_hidden_layers=2,
                           intermediate_size=qwen.intermediate_size, num_attention_heads=qwen.num_attention_heads,
                           num_key_value_heads=qwen.num_key_value_heads, max_position_embeddings=512,
                           pad_token_id=qwen.pad_token_id)).save_pretrained(folder)  # fmt: skip
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    data["decoder"] = {"type": "Sequence", "decoders": [data["decoder"]]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "TokenizersBackend"}))
    model = load_embedder(str(folder), device="cpu")
    gguf = export_gguf(model, folder, tmp_path / "model-f32.gguf", converter, "f32")
    result = check(folder, gguf, model=model)
    assert result.error is None and result.passed and result.min_cosine >= 0.999, table([result])
