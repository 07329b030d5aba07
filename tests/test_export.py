"""Exports for serving (embtune.export) and the served-equals-trained check (embtune.serving): the ONNX exports
embed what the model embeds, and servers that get one detail wrong fail the check with that detail named."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from embtune.encode import encode, query_prompt
from embtune.export import ExportConfig, NoGGUF, export_model, export_onnx, find_converter, quantize_int8
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


def test_the_onnx_export_of_the_tiny_qwen3_embedder_embeds_what_the_model_does(tiny, tiny_embedding, tiny_onnx):
    result = check(tiny_embedding, tiny_onnx / "onnx", model=tiny)
    assert result.passed and result.precision == "float" and result.cause is None
    assert result.min_cosine >= 0.999 and result.identical == 1.0
    # what must survive the export: left padding, and the end token appended by the tokenizer itself
    tokenizer = json.loads((tiny_onnx / "onnx" / "tokenizer.json").read_text())
    assert tokenizer["post_processor"]["single"][-1] == {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    assert json.loads((tiny_onnx / "onnx" / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert not list((tiny_onnx / "onnx").glob("*.safetensors"))  # the graph only, not the torch weights again


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
            vectors = embed(body["input"])
            data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
            reply = json.dumps({"object": "list", "data": data[::-1]}).encode()  # any order: clients sort by index
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", server.shutdown


def _last_position(model, texts, padding_side, special_tokens=True):
    """A hand-written server: tokenize, run the transformer, read the last position (no pooling module)."""
    tokenizer = model.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=model.max_seq_length,
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


# ---------------------------------------------------------------------------------------------------- the rest


def test_the_onnx_export_of_the_tiny_qwen3_reranker_scores_what_the_model_does(tiny_models, tmp_path):
    """The causal-LM reranker's graph (last position's logits only) gives the same P(yes) as the model."""
    from embtune.rerank import load_reranker

    reranker = load_reranker(str(tiny_models[1]), device="cpu")
    export_onnx(reranker, tiny_models[1], tmp_path / "onnx")
    result = check_reranker(tiny_models[1], tmp_path / "onnx", model=reranker)
    assert result.passed and result.max_abs_diff < 1e-4 and result.identical == 1.0, table([result])


def test_without_a_converter_no_gguf_is_written_and_the_reason_is_given(tiny, tiny_embedding, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    with pytest.raises(NoGGUF, match="no llama.cpp converter"):
        find_converter(None)
    with pytest.raises(NoGGUF, match="convert_hf_to_gguf.py"):
        find_converter(str(tmp_path))
    config = ExportConfig(data_dir="", run_dir=str(tmp_path), base_model="", formats=["gguf"])
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
    config = ExportConfig(data_dir="", run_dir=str(tmp_path), base_model="", instruction="Find code")
    custom = serving_markdown("embedder", tiny_embedding, tiny, result, config)
    assert json.dumps("Instruct: Find code\nQuery:") in custom
