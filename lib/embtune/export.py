"""Notebook 07: export the fine-tuned models for serving (ONNX, int8 ONNX, GGUF) and write how to serve them.

    RUN/export/
      onnx/          the embedder as sentence-transformers' ONNX layout: onnx/model.onnx + the model's own configs
      onnx-int8/     the same, int8 weights (weight-only; "onnx-int8-dynamic": int8 arithmetic too)
      gguf/          model-<outtype>.gguf and an Ollama Modelfile, when llama.cpp's converter is at hand
      SERVING.md     TEI, vLLM, llama.cpp / Ollama commands and the client code, from the model's own prompts
      reranker/      the same for RUN/reranker/model, when notebook 06 wrote it
      parity.json    the served-equals-trained check of every export (embtune.serving)

Why not sentence-transformers' own export functions: `SentenceTransformer(path, backend="onnx")`,
`export_optimized_onnx_model` and `export_dynamic_quantized_onnx_model` all run through optimum-onnx, whose
newest release (0.1.0) requires transformers < 4.58 and fails to import under transformers 5 (it imports
`transformers.modeling_utils.get_parameter_dtype`, gone in 5). So the graph is exported here with torch's own
ONNX exporter and quantised by onnxruntime's own quantizers (`quantize_dynamic` is what optimum's ORTQuantizer
wraps), into the folder layout sentence-transformers' ONNX backend reads. The pipeline around the graph
(tokenizer with its post-processor, prompts, pooling, normalisation) is the folder's own configuration, so
last-token pooling, left padding and the appended end token survive the export: `embtune.serving` proves it by
reading the folder the way a consumer does (`embtune.consumer`, also SERVING.md's ONNX client).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import StepConfig, at_least, each, one_of
from .files import replace_dir, write_text
from .llama_cpp import VERSION as LLAMA_CPP_PYTHON
from .llama_cpp import NoLlamaCpp, converter, server_command, stage_tokenizer

FORMATS = ("onnx", "onnx-int8", "onnx-int8-dynamic", "gguf")
DEFAULT_FORMATS = ("onnx", "onnx-int8", "gguf")
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.onnx", "*.onnx_data", "*.onnx.data", "*.gguf")
OUTPUT_NAME = {"feature-extraction": "last_hidden_state", "sequence-classification": "logits",
               "text-generation": "logits"}  # fmt: skip


@dataclass(kw_only=True)
class ExportConfig(StepConfig):
    # any of "onnx" (float32), "onnx-int8" (weight-only int8), "onnx-int8-dynamic" (int8 weights and arithmetic:
    # fastest on a CPU, less exact) and "gguf"
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    gguf_outtype: str = "f16"  # convert_hf_to_gguf.py --outtype: "f32", "f16", "bf16" or "q8_0"
    # A llama.cpp folder holding convert_hf_to_gguf.py; "pypi": the one vendored in llama-cpp-python's source
    # distribution, fetched with pip once (embtune.llama_cpp); None: no GGUF (the notebook says why).
    llama_cpp: str | None = "pypi"
    # The llama-server that checks the GGUF files: "build" (built once from the same source, about 10 minutes on
    # two cores, cached in ~/.cache/embtune), a binary's path, or None (the row says the file was not checked).
    llama_server: str | None = "build"
    serve_url: str | None = None  # a running OpenAI-compatible server (…/v1) to check against the model
    served_model: str | None = None  # the `model` name that server expects (None: the model folder's path)
    rerank_url: str | None = None  # a running /rerank (TEI, Cohere-style) or /score (vLLM) endpoint to check
    batch_size: int = 16  # texts per request / forward pass in the parity check

    RULES = {"formats": each(one_of(*FORMATS)), "gguf_outtype": one_of("f32", "f16", "bf16", "q8_0"),
             "batch_size": at_least(1)}


def export_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "export"


# ---------------------------------------------------------------------------------------------------- ONNX


class _Graph(torch.nn.Module):
    """The transformer as sentence-transformers calls it: token ids in, the one tensor its next module reads out.

    Only that tensor is exported (no cache, no attentions): pooling and normalisation stay in the
    sentence-transformers modules beside it. For a causal-LM reranker only the last position's logits leave the
    graph: sentence-transformers' LogitScore reads nothing else, and (batch, length, vocabulary) floats would be
    most of the run time. Left padding makes the last position the last real token."""

    def __init__(self, model, task: str, inputs: list[str]):
        super().__init__()
        self.model, self.task, self.inputs = model, task, inputs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.task == "text-generation":
            hidden = self.model.model(**kwargs).last_hidden_state[:, -1:]
            return self.model.lm_head(hidden)
        out = self.model(**kwargs)
        return out.last_hidden_state if self.task == "feature-extraction" else out.logits


def _task(model) -> str:
    return model[0].transformer_task


def _copy_configs(src: Path, dst: Path, tokenizer) -> None:
    """Everything of the model folder but its weights, and the tokenizer as loaded (left padding and the
    appended end token that `embtune.encode.prepare` ensures), so a server reading this folder tokenizes as
    training did."""
    ignore = shutil.ignore_patterns(*WEIGHTS, "checkpoint-*", "README.md")
    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
    tokenizer.save_pretrained(str(dst))


def export_onnx(model, model_dir: str | Path, out: str | Path) -> Path:
    """`out/`: the model's configs + `onnx/model.onnx` (float32), the layout `SentenceTransformer(out,
    backend="onnx")` / `CrossEncoder(out, backend="onnx")` loads; weights over 2 GB go to `model.onnx.data`.
    `model` is the loaded SentenceTransformer or CrossEncoder (`load_embedder` / `load_reranker`)."""
    task = _task(model)
    tokenizer = model.tokenizer
    sample = tokenizer(["a short text", "a somewhat longer text, so that the batch is padded"], padding=True,
                       return_tensors="pt")  # fmt: skip
    inputs = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    graph = _Graph(model[0].auto_model.float().cpu(), task, inputs).eval()
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with replace_dir(out) as tmp:
        _copy_configs(Path(model_dir), tmp, tokenizer)
        (tmp / "onnx").mkdir()
        with torch.no_grad(), warnings.catch_warnings():
            # "The axis name: batch will not be used, since it shares the same shape constraints": inputs of one
            # batch share their axes, so torch keeps one name for them; nothing a user can act on
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            torch.onnx.export(graph, tuple(sample[n] for n in inputs), str(tmp / "onnx" / "model.onnx"),
                              input_names=inputs, output_names=[OUTPUT_NAME[task]], dynamo=True,
                              dynamic_shapes=tuple({0: batch, 1: length} for _ in inputs),
                              external_data=True, verbose=False)  # fmt: skip
    return Path(out)


def quantize_int8(onnx_folder: str | Path, out: str | Path, dynamic: bool = False) -> Path:
    """`out/`: the same folder with int8 weights in `onnx/model.onnx`, no calibration data needed. Named
    model.onnx so every ONNX reader (TEI, transformers.js, sentence-transformers) takes it by default.

    Default: weight-only int8 (onnxruntime's MatMulNBits: 8-bit weights in blocks of 32 with a scale each,
    computed in float32): the MatMul weights 4x smaller and the embeddings the trained ones (cosine >= 0.999
    on all-MiniLM-L6-v2, same top 10). `dynamic`: sentence-transformers' `export_dynamic_quantized_onnx_model`
    recipe (per-channel int8 weights, activations quantised at run time, int8 arithmetic): about twice as fast
    on a CPU again, but it moves the embeddings (cosine down to ~0.99 on MiniLM) and reorders close results;
    the parity check and bench/export.py measure by how much. Embedding tables stay float either way."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    MatMulNBitsQuantizer = _import_quietly()  # noqa: N806
    src = Path(onnx_folder)
    model_file = src / "onnx" / "model.onnx"
    large = model_file.stat().st_size + sum(p.stat().st_size for p in (src / "onnx").glob("*data")) > 2**31 - 2**27
    with replace_dir(out) as tmp:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("onnx"), dirs_exist_ok=True)
        (tmp / "onnx").mkdir()
        if dynamic:
            quantize_dynamic(model_file, tmp / "onnx" / "model.onnx", op_types_to_quantize=["MatMul"],
                             per_channel=True, weight_type=QuantType.QInt8,
                             use_external_data_format=large)  # fmt: skip
        else:
            import onnx

            quantizer = MatMulNBitsQuantizer(onnx.load(str(model_file)), bits=8, block_size=32, is_symmetric=True,
                                             accuracy_level=0, op_types_to_quantize=("MatMul",))  # fmt: skip
            quantizer.process()
            quantizer.model.save_model_to_file(str(tmp / "onnx" / "model.onnx"), use_external_data_format=large)
    return Path(out)


def _import_quietly():
    """onnxruntime's MatMulNBitsQuantizer, imported without the `logging.basicConfig(level=INFO)` its module
    runs, which would turn on every library's INFO messages for the rest of the process (a notebook's too)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


# ---------------------------------------------------------------------------------------------------- GGUF


class NoGGUF(RuntimeError):
    """No GGUF file could be written; the message says why and what works instead."""


def find_converter(llama_cpp: str | None) -> Path:
    """convert_hf_to_gguf.py from `llama_cpp` (a folder, or "pypi": fetched once into the cache); NoGGUF says
    why not."""
    try:
        return converter(llama_cpp)
    except NoLlamaCpp as e:
        raise NoGGUF(str(e)) from None


# Runs llama.cpp's converter with two things it cannot be told on its command line. (1) llama.cpp names a BPE
# pre-tokenizer by a hash of the ids a fixed text gets, so a vocabulary it has not seen stops it even when the
# pre-tokenizer is exactly Qwen's (`pre`, given only then). (2) For a Qwen3 reranker it stores a rerank template
# with Qwen's web-search instruction hard-coded: the instruction the reranker was trained with replaces it.
_CONVERT = """
import runpy, sys
folder, pre, old, new, *args = sys.argv[1:]
sys.path[:0] = [folder, folder + "/gguf-py"]
import gguf
import conversion.base
if pre:
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
add = gguf.GGUFWriter.add_chat_template
def add_chat_template(self, value):
    if isinstance(value, list) and new:
        value = [dict(t, template=t["template"].replace(old, new)) if t.get("name") == "rerank" else t for t in value]
    add(self, value)
gguf.GGUFWriter.add_chat_template = add_chat_template
sys.argv = [folder + "/convert_hf_to_gguf.py", *args]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# The staging folder's name and card: what llama.cpp's converter reads to tell a Qwen3 reranker from a chat model
# (its yes/no head, rank pooling and rerank template follow from that).
RERANKER_NAME = "Qwen3-Reranker-finetuned"


def rerank_template(path: str | Path) -> str | None:
    """The rerank template stored in a GGUF file (what llama-server fills with query and document), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template.rerank")
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def export_gguf(model, model_dir: str | Path, out_file: str | Path, converter: Path, outtype: str = "f16",
                reranker: bool = False, instruction: str | None = None) -> Path:  # fmt: skip
    """One GGUF file by llama.cpp's own converter, which reads the pooling from the sentence-transformers
    configs (modules.json, 1_Pooling) into the file. It converts from a staging folder: the weights linked, the
    tokenizer as loaded (with its appended end token), so llama.cpp tokenizes as training did. A causal-LM
    reranker is staged under a Qwen3-Reranker name and card, so the converter writes a reranker (yes/no head,
    rank pooling, rerank template carrying `instruction`); a file that would not be one is not written."""
    from .encode import WEB_SEARCH_TASK

    out_file = Path(out_file)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / (RERANKER_NAME if reranker else "model")
        _copy_configs(Path(model_dir), staged, model.tokenizer)
        if reranker:
            write_text(staged / "README.md", f"# {RERANKER_NAME}\n\nFine-tuned by embtune from {model_dir}.\n")
        for pattern in ("*.safetensors", "*.safetensors.index.json"):
            for weights in Path(model_dir).glob(pattern):
                (staged / weights.name).symlink_to(weights.resolve())
        partial = Path(tmp) / out_file.name
        new = instruction.strip() if reranker and instruction and instruction.strip() != WEB_SEARCH_TASK else ""
        pre = stage_tokenizer(staged / "tokenizer.json") if (staged / "tokenizer.json").exists() else ""
        # The converter's own gguf-py, not an installed gguf package of another version.
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        done = subprocess.run([sys.executable, "-c", _CONVERT, str(converter.parent), pre, WEB_SEARCH_TASK, new,
                               str(staged), "--outfile", str(partial), "--outtype", outtype],
                              capture_output=True, text=True, env=env)  # fmt: skip
        if done.returncode:
            lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
            raise NoGGUF(f"llama.cpp's converter failed: {lines[-1] if lines else done.returncode}")
        if reranker:
            template = rerank_template(partial)
            if template is None:
                raise NoGGUF("llama.cpp's converter did not make a reranker of it (no rerank template): llama-server "
                             "would serve it as a plain language model")  # fmt: skip
            if (new or WEB_SEARCH_TASK) not in template:
                raise NoGGUF("the GGUF's rerank template does not carry the instruction the reranker was trained "
                             f"with ({new or WEB_SEARCH_TASK!r})")  # fmt: skip
        out_file.parent.mkdir(parents=True, exist_ok=True)
        landing = out_file.with_name(f".{out_file.name}.partial")  # /tmp may be another disk: move, then rename
        shutil.move(partial, landing)
        os.replace(landing, out_file)
    # Ollama's context is 2048 by default and shared by nothing else: the model's own length suffices
    context = model.max_seq_length
    write_text(out_file.parent / "Modelfile", f"FROM ./{out_file.name}\nPARAMETER num_ctx {context}\n")
    return out_file


# ---------------------------------------------------------------------------------------------------- all


def export_model(model, model_dir: str | Path, out: str | Path, config: ExportConfig) -> dict:
    """Every format asked for, into `out/`; {format: path} for what was written and {format: reason} under
    "skipped" for what was not (a GGUF converter missing or refusing the model). `model` is the loaded
    SentenceTransformer or CrossEncoder (a reranker)."""
    from sentence_transformers import CrossEncoder

    out = Path(out)
    reranker = isinstance(model, CrossEncoder)
    written, skipped = {}, {}
    unknown = set(config.formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; choose from {FORMATS}")
    if any(f.startswith("onnx") for f in config.formats):
        written["onnx"] = str(export_onnx(model, model_dir, out / "onnx"))
        for fmt in ("onnx-int8", "onnx-int8-dynamic"):
            if fmt in config.formats:
                written[fmt] = str(quantize_int8(out / "onnx", out / fmt, dynamic=fmt.endswith("dynamic")))
        if "onnx" not in config.formats:
            shutil.rmtree(out / "onnx")
            del written["onnx"]
    if "gguf" in config.formats:
        from .rerank import is_causal

        causal_reranker = reranker and is_causal(model)
        try:
            gguf = out / "gguf" / f"model-{config.gguf_outtype}.gguf"
            written["gguf"] = str(export_gguf(model, model_dir, gguf, find_converter(config.llama_cpp),
                                              config.gguf_outtype, causal_reranker, config.instruction))  # fmt: skip
        except NoGGUF as e:
            skipped["gguf"] = str(e)
    return {"written": written, "skipped": skipped}


def exportable(config: ExportConfig) -> dict[str, Path]:
    """What this run has to export: {"embedder": RUN/model} once notebook 03 wrote it, and {"reranker":
    RUN/reranker/model} once notebook 06 did."""
    from .rundir import RunDir

    run = RunDir(config.run_dir)
    found = {"embedder": run.model, "reranker": run.reranker_model}
    return {name: path for name, path in found.items() if path.is_dir()}


def out_dir(config: ExportConfig, name: str) -> Path:
    """RUN/export/ for the embedder, RUN/export/reranker/ for the reranker."""
    return export_dir(config.run_dir) / ("" if name == "embedder" else name)


def load(name: str, path: str | Path):
    """The model as training left it, the way the suite loads it: the embedder through `load_embedder`
    (left padding, the end token), the reranker through `load_reranker` (Qwen's template)."""
    if name == "embedder":
        from .models import load_embedder

        return load_embedder(str(path))
    from .rerank import load_reranker

    return load_reranker(str(path))


# ---------------------------------------------------------------------------------------------------- checks


def check_exports(config: ExportConfig, name: str, model_dir: str | Path, model, written: dict) -> list[dict]:
    """The parity check (`embtune.serving`) of every export written (the GGUF file through llama-server), and of
    the servers named in the config: one dict per target. A target that could not be run is a failed row with
    its `error`; the other rows are kept."""
    from . import serving

    reranker = name == "reranker"
    run = serving.check_reranker if reranker else serving.check
    kw = {"instruction": config.instruction, "model": model, **({} if reranker else {"batch_size": config.batch_size})}
    targets = [(written[f], "int8" if "int8" in f else "float") for f in FORMATS if f in written and f != "gguf"]
    if "gguf" in written:
        quantized = config.gguf_outtype not in ("f32", "f16", "bf16")
        targets.append((written["gguf"], "int8" if quantized else "float"))
    results = [run(model_dir, target, precision=precision, llama_server=config.llama_server, **kw).to_dict()
               for target, precision in targets]  # fmt: skip
    url = config.rerank_url if reranker else config.serve_url
    if url:
        results.append(run(model_dir, url, served_model=config.served_model, **kw).to_dict())
    return results


def parity_table(results: list[dict]) -> str:
    """The markdown table of `check_exports` results."""
    from .serving import Parity, table

    return table([Parity(**r) for r in results])


# ---------------------------------------------------------------------------------------------------- SERVING.md


def _consumer_source() -> str:
    from . import consumer

    return Path(consumer.__file__).read_text()


def _consumer_block() -> list[str]:
    """consumer.py shown in SERVING.md (and written beside it): the client code the parity check itself runs."""
    return ["<details><summary>consumer.py (written beside this file; the parity check runs this exact code)"
            "</summary>", "", "```python", _consumer_source().rstrip(), "```", "</details>"]  # fmt: skip


def serving_markdown(name: str, model_dir: str | Path, model, result: dict, config: ExportConfig) -> str:
    """SERVING.md for one exported model, written from the model's own configuration (prompts, pooling,
    maximum length, end token): the client code (`embtune.consumer`, copied beside it), and the commands for
    the ONNX client, TEI, vLLM, llama.cpp and Ollama."""
    if name == "reranker":
        return _reranker_markdown(model_dir, model, result, config)
    from .encode import end_token, query_prompt, uses_last_token
    from .llama_cpp import embedding_context
    from .serving import llama_pooling, pooling_mode

    model_dir = Path(model_dir).resolve()
    prompt = query_prompt(model, config.instruction)
    doc_prompt = model.prompts.get("document") or ""
    pooling = pooling_mode(model) or "the model's own"
    length = model.max_seq_length
    gguf = result["written"].get("gguf")
    tag = re.sub(r"[^a-z0-9]+", "-", f"{model_dir.parent.name}-{model_dir.name}".lower()).strip("-")  # Ollama's name
    tei_pool = {"lasttoken": "last-token", "mean": "mean", "cls": "cls"}.get(pooling_mode(model) or "", "mean")
    end = (f"- The tokenizer appends `{end_token(model.tokenizer)}` to every text (tokenizer.json's post-processor, "
           "kept when a text is truncated) and pads on the left: serve with this folder's tokenizer files."
           if uses_last_token(model) else None)  # fmt: skip
    onnx = result["written"].get("onnx-int8") or result["written"].get("onnx")
    lines = [
        f"# Serving {model_dir.name}",
        "",
        f"Written by embtune (notebook 07) from the model's own configuration in `{model_dir}`; regenerate it "
        "rather than edit it.",
        "",
        "## What every server must do the way training did",
        f"- **Queries** get the query prompt {json.dumps(prompt)} written directly in front of the query (no "
        "space, no newline added); **documents** get " + (f"the document prompt {json.dumps(doc_prompt)}."
                                                          if doc_prompt else "nothing."),
        "  Servers see raw text: the prompt is the client's job (below). A query sent without it is the most "
        "common cause of served embeddings that retrieve worse than the fine-tuned model did.",
        f"- Pooling: **{pooling}**, then L2-normalised; {model.get_embedding_dimension()} dimensions "
        "(Matryoshka: keep the first d and normalise again).",
        end,
        f"- Inputs are truncated at **{length} tokens** (the model's max_seq_length), the end token kept. Servers "
        "read other limits (config.json's max_position_embeddings, their own flags), and llama-server embeds whole "
        "whatever fits its context (rounded up to a multiple of 256): the client below cuts long texts itself, "
        "where the model would.",
        "",
        "## Files",
    ]
    lines = [x for x in lines if x is not None]
    lines += [f"- `{fmt}`: `{Path(path).resolve()}`" for fmt, path in result["written"].items()]
    lines += [f"- `{fmt}`: not written: {why}." for fmt, why in result["skipped"].items()]
    lines += [
        f"- The safetensors model for TEI and vLLM is the run's own model folder: `{model_dir}`.",
        "- `consumer.py`: the client code below (numpy, tokenizers, onnxruntime; nothing of embtune).",
        "",
        "## Client",
        "```python",
        "from consumer import OnnxEmbedder, clipper, http_embed  # consumer.py, beside this file",
        "",
        f"QUERY_PROMPT = {json.dumps(prompt)}  # from the model's config_sentence_transformers.json",
        "",
        "# ONNX, in-process: tokenizers + onnxruntime + the folder's own pooling and normalisation",
        *([f'onnx = OnnxEmbedder("{Path(onnx).resolve()}")',
           "query_vectors = onnx.embed([QUERY_PROMPT + q for q in queries])",
           "document_vectors = onnx.embed(documents)"] if onnx else ["# (no ONNX export was written)"]),  # fmt: skip
        "",
        "# Any OpenAI-compatible server: batches of 32 with a timeout and retries; texts cut where the model cuts",
        f'clip = clipper("{model_dir}")',
        'URL, MODEL = "http://localhost:8080/v1", None  # TEI and llama-server (they serve one model)',
        f'# vLLM: "http://localhost:8000/v1", "{model_dir}"; Ollama: "http://localhost:11434/v1", "{tag}"',
        "query_vectors = http_embed(URL, [clip(QUERY_PROMPT + q) for q in queries], MODEL)",
        "document_vectors = http_embed(URL, [clip(d) for d in documents], MODEL)",
        "```",
        *_consumer_block(),
        "",
        "## text-embeddings-inference (TEI)",
        "```bash",
        f"docker run -p 8080:80 -v {model_dir}:/model ghcr.io/huggingface/text-embeddings-inference:cpu-1.8 \\",
        f"    --model-id /model --pooling {tei_pool} --auto-truncate",
        "# on a GPU: the image tag for your card from TEI's README (e.g. 1.8 for A100, hopper-1.8), with --gpus all",
        "```",
        f"Check `curl localhost:8080/info`: `max_input_length` must be {length}. TEI takes at most 32 inputs a request "
        "by default (`--max-client-batch-size`); the client sends 32. Never start TEI with "
        "`--default-prompt-name query`: it would prompt documents too.",
        "",
        "## vLLM",
        "```bash",
        f"vllm serve {model_dir} --runner pooling --max-model-len {length}   # vLLM before 0.10: --task embed",
        "```",
        "vLLM reads the pooling and normalisation from the sentence-transformers files and rejects inputs longer "
        "than `--max-model-len`: the client's `clip` keeps them within it.",
        "",
        "## llama.cpp and Ollama (GGUF)",
    ]
    context = embedding_context(length)
    if gguf:
        gguf = Path(gguf).resolve()
        lines += [
            "```bash",
            shlex.join(server_command(gguf, length=context, pooling=llama_pooling(model))),
            f"cd {gguf.parent} && ollama create {tag} -f Modelfile",
            "```",
            "One slot (`-np 1`): llama-server splits `-c` among its slots, and a text must fit one physical batch "
            "(`-ub`). The query prompt is the client's job here too. Ollama answers at "
            f'http://localhost:11434/v1 with `model="{tag}"` (the name given to `ollama create`).',
        ]
    else:
        lines += [
            "No GGUF file was written here (see Files). llama.cpp's converter makes one from the model folder:",
            "```bash",
            f"pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON}",
            f"tar xzf llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz   # its vendor/llama.cpp: the converter and server",
            f"python llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/convert_hf_to_gguf.py {model_dir} "
            "--outfile model-f16.gguf --outtype f16",
            shlex.join(server_command("model-f16.gguf", length=context, pooling=llama_pooling(model))),
            f"printf 'FROM ./model-f16.gguf\\nPARAMETER num_ctx {length}\\n' > Modelfile",
            f"ollama create {tag} -f Modelfile",
            "```",
            "The converter identifies the tokenizer by a hash of its pre-tokenizer: a tokenizer it does not know "
            "stops it (\"BPE pre-tokenizer was not recognized\"); Qwen3's and BERT's are known.",
        ]
    lines += [
        "",
        "## Prove it: served = trained",
        "```python",
        "from embtune.serving import check",
        f'print(check("{model_dir}", "http://localhost:8080/v1"))  # vLLM / Ollama: served_model=MODEL',
        "```",
        "It encodes fixed queries (with the prompt) and documents (some longer than the limit, sent clipped and "
        "once unclipped) with plain sentence-transformers and through the server, and names the cause of any "
        "difference: instruction missing, query prompt on every text, pooling, padding side, end token missing, "
        "truncation, not normalised. This run's checks of the exported files are in `parity.json`.",
        "",
    ]
    return "\n".join(lines)


def _reranker_markdown(model_dir, model, result: dict, config: ExportConfig) -> str:
    from .encode import WEB_SEARCH_TASK
    from .rerank import PREFIX, SUFFIX, is_causal

    model_dir = Path(model_dir).resolve()
    causal = is_causal(model)
    task = WEB_SEARCH_TASK if config.instruction is None else config.instruction
    onnx = result["written"].get("onnx-int8") or result["written"].get("onnx")
    gguf = result["written"].get("gguf")
    lines = [f"# Serving the reranker {model_dir.name}", "",
             f"Written by embtune (notebook 07) from `{model_dir}`; regenerate it rather than edit it.", "",
             "## Files"]  # fmt: skip
    lines += [f"- `{fmt}`: `{Path(path).resolve()}`" for fmt, path in result["written"].items()]
    lines += [f"- `{fmt}`: not written: {why}." for fmt, why in result["skipped"].items()]
    lines += [f"- The safetensors model for vLLM and TEI: `{model_dir}`.",
              "- `consumer.py`: the client code below (nothing of embtune)."]  # fmt: skip
    if causal:
        lines += [
            "",
            "A Qwen3-Reranker-style causal LM: the score is P(yes), the softmax of the `yes`/`no` logits after "
            f"Qwen's prompt, with the instruction it was trained with: {json.dumps(task)}.",
            "",
            "## Client",
            "```python",
            "from consumer import OnnxReranker, http_rerank  # consumer.py, beside this file",
            "",
            f"TASK = {json.dumps(task)}",
            f"PREFIX = {json.dumps(PREFIX)}",
            f"SUFFIX = {json.dumps(SUFFIX)}",
            "",
            *([f'onnx = OnnxReranker("{Path(onnx).resolve()}")  # in-process: the model card\'s prompt',
               "scores = onnx.scores([(query, d) for d in documents], TASK)"] if onnx else []),  # fmt: skip
            "# llama-server --reranking: the GGUF's rerank template carries TASK; send the texts as they are",
            'scores = http_rerank("http://localhost:8080/v1/rerank", query, documents)',
            "# vLLM /score: the client writes Qwen's template around the texts",
            'scores = http_rerank("http://localhost:8000/score", f"{PREFIX}<Instruct>: {TASK}\\n<Query>: {query}\\n",',
            '                     [f"<Document>: {d}{SUFFIX}" for d in documents],',
            f"                     model={json.dumps(str(model_dir))})",
            "```",
            *_consumer_block(),
            "",
            "## vLLM (/score)",
            "```bash",
            f"vllm serve {model_dir} --runner pooling --hf-overrides "
            "'{\"architectures\": [\"Qwen3ForSequenceClassification\"], \"classifier_from_token\": [\"no\", "
            "\"yes\"], \"is_original_qwen3_reranker\": true}'   # vLLM before 0.10: --task score",
            "```",
            "",
            "## llama.cpp (/v1/rerank)",
        ]
        if gguf:
            command = server_command(Path(gguf).resolve(), length=model.max_seq_length, rerank=True)
            lines += ["```bash", shlex.join(command), "```",
                      "The converter was given the reranker's name and card, so the file holds the yes/no head, rank "
                      "pooling and the rerank template, with the instruction above in place of Qwen's default one; "
                      "llama-server fills in query and document and returns P(yes)."]  # fmt: skip
        else:
            lines.append("No GGUF file was written (see Files).")
    else:
        lines += [
            "",
            "A cross-encoder (sequence classification): servers take (query, document) pairs as they are.",
            "",
            "## text-embeddings-inference (/rerank)",
            "```bash",
            f"docker run -p 8080:80 -v {model_dir}:/model ghcr.io/huggingface/text-embeddings-inference:cpu-1.8 "
            "--model-id /model --auto-truncate",
            "```",
            "```python",
            "from consumer import http_rerank  # consumer.py, beside this file",
            'scores = http_rerank("http://localhost:8080/rerank", query, documents)  # raw_scores=false: P(relevant)',
            "```",
            *_consumer_block(),
            "## vLLM (/score)",
            f"`vllm serve {model_dir} --runner pooling` (before 0.10: `--task score`), then "
            'http_rerank("http://localhost:8000/score", query, documents).',
        ]
    check = f'print(check_reranker("{model_dir}", "http://localhost:8000/score"))  # or …/v1/rerank, …/rerank'
    lines += ["", "## Prove it", "```python", "from embtune.serving import check_reranker", check, "```", ""]
    return "\n".join(lines)


def write_serving(name: str, model_dir, model, result: dict, config: ExportConfig) -> Path:
    """SERVING.md and, beside it, consumer.py: the client it shows."""
    write_text(out_dir(config, name) / "consumer.py", _consumer_source())
    return write_text(out_dir(config, name) / "SERVING.md", serving_markdown(name, model_dir, model, result, config))
