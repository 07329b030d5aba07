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
wraps), into the folder layout sentence-transformers' ONNX backend reads; `load_onnx` reads it back through
sentence-transformers' own loading code with onnxruntime in optimum's place. The pipeline around the graph
(tokenizer with its post-processor, prompts, pooling, normalisation) stays sentence-transformers' own, so
last-token pooling, left padding and the appended end token survive the export: `embtune.serving` proves it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import StepConfig
from .files import replace_dir, write_text

FORMATS = ("onnx", "onnx-int8", "onnx-int8-dynamic", "gguf")
DEFAULT_FORMATS = ("onnx", "onnx-int8", "gguf")
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.onnx", "*.onnx_data", "*.onnx.data", "*.gguf")
# llama.cpp's converter travels in the source distribution of llama-cpp-python on PyPI (vendor/llama.cpp).
LLAMA_CPP_PYTHON = "0.3.36"
OUTPUT_NAME = {"feature-extraction": "last_hidden_state", "sequence-classification": "logits",
               "text-generation": "logits"}  # fmt: skip


@dataclass(kw_only=True)
class ExportConfig(StepConfig):
    # any of "onnx" (float32), "onnx-int8" (weight-only int8), "onnx-int8-dynamic" (int8 weights and arithmetic:
    # fastest on a CPU, less exact) and "gguf"
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    gguf_outtype: str = "f16"  # convert_hf_to_gguf.py --outtype: "f32", "f16", "bf16" or "q8_0"
    # A llama.cpp folder holding convert_hf_to_gguf.py; "pypi": the one vendored in llama-cpp-python's source
    # distribution, fetched with pip; None: $LLAMA_CPP_DIR, else no GGUF (the notebook says why).
    llama_cpp: str | None = None
    serve_url: str | None = None  # a running OpenAI-compatible server (…/v1) to check against the model
    served_model: str | None = None  # the `model` name that server expects (None: the model folder's path)
    rerank_url: str | None = None  # a running /rerank (TEI, Cohere-style) or /score (vLLM) endpoint to check
    batch_size: int = 16  # texts per request / forward pass in the parity check


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


class OnnxRuntimeModel(torch.nn.Module):
    """What optimum's ORTModel is to sentence-transformers: the transformer's forward, run by onnxruntime.

    Threads: as many as torch uses ($OMP_NUM_THREADS, else one per core), so the two compare fairly."""

    def __init__(self, path: Path, config, output_name: str):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=ort.get_available_providers())
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.config, self.output_name, self.path = config, output_name, path

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=True):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feeds = {k: v.cpu().numpy().astype(np.int64) for k, v in given.items() if k in self.input_names}
        if "token_type_ids" in self.input_names and token_type_ids is None:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        (out,) = self.session.run([self.output_name], feeds)
        return {self.output_name: torch.from_numpy(out)}


def _load_onnx_model(model_name_or_path, config, task_name, **model_kwargs):
    """sentence-transformers' `load_onnx_model` with onnxruntime in optimum's place: the same file lookup
    (`model.onnx`, else `onnx/model.onnx`, or `model_kwargs["file_name"]`)."""
    from sentence_transformers.backend.utils import backend_should_export

    path = Path(model_name_or_path)
    export, kwargs = backend_should_export(path, True, dict(model_kwargs), "model.onnx", "*.onnx", "ONNX")
    if export:
        raise FileNotFoundError(f"no ONNX model in {path}: export it first (embtune.export.export_onnx)")
    file = path / (kwargs.get("subfolder") or "") / kwargs.get("file_name", "model.onnx")
    return OnnxRuntimeModel(file, config, OUTPUT_NAME[task_name])


@contextmanager
def _onnxruntime_backend():
    import sentence_transformers.base.modules.transformer as st_transformer

    original = st_transformer.load_onnx_model
    st_transformer.load_onnx_model = _load_onnx_model
    try:
        yield
    finally:
        st_transformer.load_onnx_model = original


def load_onnx(folder: str | Path, reranker: bool = False):
    """An exported folder as a SentenceTransformer (or, `reranker`, a CrossEncoder) on onnxruntime, loaded by
    sentence-transformers' own code (`backend="onnx"`): its tokenizer, prompts, pooling and normalisation are
    the folder's, so this is what any ONNX server reading the folder computes."""
    with _onnxruntime_backend():
        if reranker:
            from .rerank import load_reranker

            return load_reranker(str(folder), device="cpu", backend="onnx")
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(folder), device="cpu", backend="onnx")


# ---------------------------------------------------------------------------------------------------- GGUF


class NoGGUF(RuntimeError):
    """No GGUF file could be written; the message says why and what works instead."""


def fetch_llama_cpp(dest: str | Path, version: str = LLAMA_CPP_PYTHON) -> Path:
    """llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/) from the source distribution of
    llama-cpp-python on PyPI, which vendors llama.cpp: pip is the only client needed."""
    dest = Path(dest)
    if (dest / "convert_hf_to_gguf.py").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                        tmp, f"llama-cpp-python=={version}"], check=True, capture_output=True)  # fmt: skip
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(sdist) as tar, replace_dir(dest) as out:
            for member in tar.getmembers():
                rel = member.name.split("/vendor/llama.cpp/", 1)[-1] if "/vendor/llama.cpp/" in member.name else ""
                if member.isfile() and rel.startswith(keep):
                    member.name = rel
                    tar.extract(member, out, filter="data")
    return dest


def find_converter(llama_cpp: str | None, cache: Path | None = None) -> Path:
    """convert_hf_to_gguf.py from `llama_cpp` (a folder, or "pypi": fetched once into `cache`, by default
    ~/.cache/embtune/llama.cpp-<version>), else $LLAMA_CPP_DIR; NoGGUF says why not."""
    source = llama_cpp or os.environ.get("LLAMA_CPP_DIR")
    if not source:
        raise NoGGUF("no llama.cpp converter: set `llama_cpp` to a llama.cpp folder, or to \"pypi\" to fetch the "
                     "one vendored in llama-cpp-python's source distribution")  # fmt: skip
    if source == "pypi":
        try:
            folder = fetch_llama_cpp(cache or Path.home() / ".cache" / "embtune" / f"llama.cpp-{LLAMA_CPP_PYTHON}")
        except (subprocess.CalledProcessError, OSError, ValueError) as e:
            detail = getattr(e, "stderr", b"") or b""
            raise NoGGUF(f"could not fetch llama.cpp's converter from PyPI: {detail.decode()[-300:] or e}") from None
    else:
        folder = Path(source).expanduser()
    if not (folder / "convert_hf_to_gguf.py").exists():
        raise NoGGUF(f"{folder} holds no convert_hf_to_gguf.py (a llama.cpp checkout has it at its root)")
    return folder / "convert_hf_to_gguf.py"


def export_gguf(model, model_dir: str | Path, out_file: str | Path, converter: Path, outtype: str = "f16") -> Path:
    """One GGUF file by llama.cpp's own converter, which reads the pooling from the sentence-transformers
    configs (modules.json, 1_Pooling) into the file. It converts from a staging folder: the weights linked, the
    tokenizer as loaded (with its appended end token), so llama.cpp tokenizes as training did."""
    out_file = Path(out_file)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        _copy_configs(Path(model_dir), staged, model.tokenizer)
        for pattern in ("*.safetensors", "*.safetensors.index.json"):
            for weights in Path(model_dir).glob(pattern):
                (staged / weights.name).symlink_to(weights.resolve())
        partial = Path(tmp) / out_file.name
        # The converter's own gguf-py, not an installed gguf package of another version.
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        done = subprocess.run([sys.executable, str(converter), str(staged), "--outfile", str(partial), "--outtype",
                               outtype], capture_output=True, text=True, env=env)  # fmt: skip
        if done.returncode:
            lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
            raise NoGGUF(f"llama.cpp's converter failed: {lines[-1] if lines else done.returncode}")
        out_file.parent.mkdir(parents=True, exist_ok=True)
        landing = out_file.with_name(f".{out_file.name}.partial")  # /tmp may be another disk: move, then rename
        shutil.move(partial, landing)
        os.replace(landing, out_file)
    write_text(out_file.parent / "Modelfile", f"FROM ./{out_file.name}\n")
    return out_file


# ---------------------------------------------------------------------------------------------------- all


def export_model(model, model_dir: str | Path, out: str | Path, config: ExportConfig, reranker: bool = False) -> dict:
    """Every format asked for, into `out/`; {format: path} for what was written and {format: reason} under
    "skipped" for what was not (a GGUF converter missing or refusing the model)."""
    out = Path(out)
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
        try:
            converter = find_converter(config.llama_cpp)
            gguf = out / "gguf" / f"model-{config.gguf_outtype}.gguf"
            written["gguf"] = str(export_gguf(model, model_dir, gguf, converter, config.gguf_outtype))
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
    """The parity check (`embtune.serving`) of every export written, and of the servers named in the config:
    one dict per target, the numbers or {"target", "skipped": why}."""
    from . import serving

    results = []
    reranker = name == "reranker"
    run = serving.check_reranker if reranker else serving.check
    kw = {"instruction": config.instruction, "batch_size": config.batch_size, "model": model}
    for fmt in ("onnx", "onnx-int8", "onnx-int8-dynamic"):
        if fmt in written:
            results.append(run(model_dir, written[fmt], precision="int8" if "int8" in fmt else "float", **kw))
    if "gguf" in written:
        quantized = config.gguf_outtype not in ("f32", "f16", "bf16")
        if reranker:
            results.append({"target": Path(written["gguf"]).name, "skipped": "check a GGUF reranker through "
                            "llama-server --reranking with rerank_url (SERVING.md)"})  # fmt: skip
        elif importlib.util.find_spec("llama_cpp") is None:
            results.append({"target": Path(written["gguf"]).name, "skipped": "llama-cpp-python is not installed "
                            "(pip install llama-cpp-python: it compiles llama.cpp); or serve the file with "
                            "llama-server and set serve_url"})  # fmt: skip
        else:
            results.append(run(model_dir, written["gguf"], precision="int8" if quantized else "float", **kw))
    url = config.rerank_url if reranker else config.serve_url
    if url:
        results.append(run(model_dir, url, served_model=config.served_model, **kw))
    return [r if isinstance(r, dict) else r.to_dict() for r in results]


def parity_table(results: list[dict]) -> str:
    """The markdown table of `check_exports` results (skipped targets as a row saying why)."""
    from .serving import Parity, table

    checked = [Parity(**r) for r in results if "skipped" not in r]
    lines = table(checked).splitlines()
    lines += [f"| {r['target']} | | | | | | skipped | {r['skipped']} |" for r in results if "skipped" in r]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- SERVING.md


def _pooling(model) -> str | None:
    from sentence_transformers.sentence_transformer.modules import Pooling

    return next((m.pooling_mode for m in model if isinstance(m, Pooling)), None)


def serving_markdown(name: str, model_dir: str | Path, model, result: dict, config: ExportConfig) -> str:
    """SERVING.md for one exported model, written from the model's own configuration (prompts, pooling,
    maximum length, end token): the commands for TEI, vLLM, llama.cpp and Ollama, and the client code."""
    if name == "reranker":
        return _reranker_markdown(model_dir, model, result, config)
    from .encode import end_token, query_prompt, uses_last_token

    model_dir = Path(model_dir).resolve()
    prompt = query_prompt(model, config.instruction)
    doc_prompt = model.prompts.get("document") or ""
    pooling = _pooling(model) or "the model's own"
    last = uses_last_token(model)
    length = model.max_seq_length
    tokenizer = model.tokenizer
    added = len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])
    gguf = result["written"].get("gguf")
    served = config.served_model or str(model_dir)
    pool_flag = {"lasttoken": "last", "mean": "mean", "cls": "cls"}.get(_pooling(model) or "", "mean")
    tei_pool = {"lasttoken": "last-token", "mean": "mean", "cls": "cls"}.get(_pooling(model) or "", "mean")
    end = (f"- The tokenizer appends `{end_token(model.tokenizer)}` to every text (tokenizer.json's post-processor, "
           "kept when a text is truncated) and pads on the left: serve with this folder's tokenizer files.\n"
           if last else "")  # fmt: skip
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
        end.rstrip("\n"),
        f"- Inputs are truncated at **{length} tokens** (the model's max_seq_length), the end token kept. Servers "
        "truncate at their own limits, and llama.cpp after appending the end token, which cuts it: the client "
        "below cuts long texts itself, where the model would.",
        "",
        "## Files",
    ]
    lines = [x for x in lines if x is not None]
    for fmt, path in result["written"].items():
        lines.append(f"- `{fmt}`: `{Path(path).resolve()}`")
    for fmt, why in result["skipped"].items():
        lines.append(f"- `{fmt}`: not written: {why}.")
    lines += [
        "- The safetensors model for TEI and vLLM is the run's own model folder: " f"`{model_dir}`.",
        "",
        "## Client: any OpenAI-compatible server (TEI, vLLM, llama.cpp, Ollama)",
        "```python",
        "import json, urllib.request",
        "",
        "from tokenizers import Tokenizer  # the model's own tokenizer, to cut long texts where the model does",
        "",
        f"QUERY_PROMPT = {json.dumps(prompt)}  # from the model's config_sentence_transformers.json",
        'URL = "http://localhost:8080/v1/embeddings"  # vLLM: port 8000; Ollama: 11434',
        f'TOKENIZER = Tokenizer.from_file("{model_dir / "tokenizer.json"}")',
        f"MAX_TOKENS = {length - added}  # max_seq_length {length}, less the {added} token(s) the tokenizer adds",
        "",
        "def clip(text):  # servers truncate otherwise: llama.cpp after appending the end token, which cuts it",
        "    enc = TOKENIZER.encode(text, add_special_tokens=False)",
        "    return text if len(enc.ids) <= MAX_TOKENS else text[: enc.offsets[MAX_TOKENS - 1][1]]",
        "",
        "def embed(texts):",
        f'    body = json.dumps({{"model": {json.dumps(served)}, "input": [clip(t) for t in texts]}}).encode()',
        '    request = urllib.request.Request(URL, body, {"Content-Type": "application/json"})',
        "    data = json.loads(urllib.request.urlopen(request).read())[\"data\"]",
        '    return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]',
        "",
        "query_vectors = embed([QUERY_PROMPT + q for q in queries])  # queries: with the prompt",
        "document_vectors = embed(documents)  # documents: as they are",
        "```",
        "",
        "## text-embeddings-inference (TEI)",
        "```bash",
        f"docker run -p 8080:80 -v {model_dir}:/model ghcr.io/huggingface/text-embeddings-inference:cpu-1.8 \\",
        f"    --model-id /model --pooling {tei_pool} --auto-truncate",
        "# on a GPU: the image tag for your card from TEI's README (e.g. 1.8 for A100, hopper-1.8), with --gpus all",
        "```",
        f"Check `curl localhost:8080/info`: `max_input_length` must be {length}. TEI's native `/embed` also takes "
        '`"prompt_name": "query"` and adds the query prompt itself (it reads config_sentence_transformers.json); '
        "never start TEI with `--default-prompt-name query`, which would prompt documents too.",
        "",
        "## vLLM",
        "```bash",
        f"vllm serve {model_dir} --runner pooling --max-model-len {length}   # vLLM before 0.10: --task embed",
        "```",
        "vLLM reads the pooling and normalisation from the sentence-transformers files. It rejects inputs longer "
        f"than `--max-model-len` unless the request sets `truncate_prompt_tokens`; keep documents under {length} "
        "tokens (or check how your vLLM version truncates with `embtune.serving.check`).",
        "",
        "## llama.cpp and Ollama (GGUF)",
    ]
    if gguf:
        gguf = Path(gguf).resolve()
        lines += [
            "```bash",
            f"llama-server -m {gguf} --embedding --pooling {pool_flag} -c {length} -ub {length} --port 8080",
            f"cd {gguf.parent} && ollama create {model_dir.name.lower()} -f Modelfile",
            "```",
            "Ollama answers at http://localhost:11434/v1/embeddings with "
            f'`"model": "{model_dir.name.lower()}"`; the client above works for both, the query prompt included.',
        ]
    else:
        lines += [
            "No GGUF file was written here (see Files). llama.cpp's converter makes one from the model folder:",
            "```bash",
            "git clone https://github.com/ggml-org/llama.cpp   # or: pip download --no-deps --no-binary :all: "
            f"llama-cpp-python=={LLAMA_CPP_PYTHON} (vendor/llama.cpp)",
            f"python llama.cpp/convert_hf_to_gguf.py {model_dir} --outfile model-f16.gguf --outtype f16",
            f"llama-server -m model-f16.gguf --embedding --pooling {pool_flag} -c {length} -ub {length} --port 8080",
            f"echo 'FROM ./model-f16.gguf' > Modelfile && ollama create {model_dir.name.lower()} -f Modelfile",
            "```",
            "The converter reads the pooling from modules.json / 1_Pooling. It identifies the tokenizer by a hash "
            "of its pre-tokenizer: a tokenizer it does not know stops it (\"BPE pre-tokenizer was not "
            "recognized\"); Qwen3's and BERT's are known.",
        ]
    lines += [
        "",
        "## Prove it: served = trained",
        "```python",
        "from embtune.serving import check",
        f'print(check("{model_dir}", "http://localhost:8080/v1", served_model={json.dumps(served)}))',
        "```",
        "It encodes fixed queries (with the prompt) and documents (some longer than the limit) both ways and names "
        "the cause of any difference: instruction missing, pooling, padding side, end token missing, truncation. "
        "This run's checks of the exported files are in `parity.json`.",
        "",
    ]
    return "\n".join(lines)


def _reranker_markdown(model_dir, model, result: dict, config: ExportConfig) -> str:
    from .encode import WEB_SEARCH_TASK
    from .rerank import PREFIX, SUFFIX, is_causal

    model_dir = Path(model_dir).resolve()
    causal = is_causal(model)
    task = WEB_SEARCH_TASK if config.instruction is None else config.instruction
    lines = [f"# Serving the reranker {model_dir.name}", "",
             f"Written by embtune (notebook 07) from `{model_dir}`; regenerate it rather than edit it.", "",
             "## Files"]  # fmt: skip
    lines += [f"- `{fmt}`: `{Path(path).resolve()}`" for fmt, path in result["written"].items()]
    lines += [f"- `{fmt}`: not written: {why}." for fmt, why in result["skipped"].items()]
    lines.append(f"- The safetensors model for vLLM and TEI: `{model_dir}`.")
    if causal:
        lines += [
            "",
            "A Qwen3-Reranker-style causal LM: the score is P(yes) read from the `yes`/`no` logits after Qwen's "
            "prompt. Servers do not build that prompt: the client sends the query part and the document part.",
            "",
            "## vLLM (/score)",
            "```bash",
            f"vllm serve {model_dir} --runner pooling --hf-overrides "
            "'{\"architectures\": [\"Qwen3ForSequenceClassification\"], \"classifier_from_token\": [\"no\", "
            "\"yes\"], \"is_original_qwen3_reranker\": true}'   # vLLM before 0.10: --task score",
            "```",
            "```python",
            "import json, urllib.request",
            "",
            f"PREFIX = {json.dumps(PREFIX)}",
            f"SUFFIX = {json.dumps(SUFFIX)}",
            f"TASK = {json.dumps(task)}",
            "",
            "def scores(query, documents, url=\"http://localhost:8000/score\"):",
            '    body = {"text_1": f"{PREFIX}<Instruct>: {TASK}\\n<Query>: {query}\\n",',
            '            "text_2": [f"<Document>: {d}{SUFFIX}" for d in documents]}',
            '    headers = {"Content-Type": "application/json"}',
            '    request = urllib.request.Request(url, json.dumps(body).encode(), headers)',
            '    data = json.loads(urllib.request.urlopen(request).read())["data"]',
            '    return [d["score"] for d in sorted(data, key=lambda d: d["index"])]  # P(relevant)',
            "```",
            "",
            "## llama.cpp",
            "`llama-server -m <the GGUF> --reranking` answers `/v1/rerank`; the converter stores the yes/no head "
            "and the rerank template in the file.",
        ]
    else:
        lines += [
            "",
            "A cross-encoder (sequence classification): servers take (query, document) pairs as they are.",
            "",
            "## text-embeddings-inference (/rerank)",
            "```bash",
            f"docker run -p 8080:80 -v {model_dir}:/model ghcr.io/huggingface/text-embeddings-inference:cpu-1.8 "
            "--model-id /model --auto-truncate",
            "curl localhost:8080/rerank -H 'Content-Type: application/json' \\",
            "    -d '{\"query\": \"...\", \"texts\": [\"...\", \"...\"], \"raw_scores\": false}'",
            "```",
            "## vLLM (/score)",
            f"`vllm serve {model_dir} --runner pooling` (before 0.10: `--task score`), then POST /score with "
            '`{"text_1": query, "text_2": [documents]}`.',
        ]
    check = f'print(check_reranker("{model_dir}", "http://localhost:8000/score"))  # or …/rerank'
    lines += ["", "## Prove it", "```python", "from embtune.serving import check_reranker", check, "```", ""]
    return "\n".join(lines)


def write_serving(name: str, model_dir, model, result: dict, config: ExportConfig) -> Path:
    return write_text(out_dir(config, name) / "SERVING.md", serving_markdown(name, model_dir, model, result, config))
