"""embtune: the library under the notebook suite for fine-tuning Qwen3-Embedding / Qwen3-Reranker
(or any sentence-transformers model) for retrieval on one GPU."""

import logging
import os

__version__ = "0.1.0"

# Warnings that read like errors in an executed notebook and mean nothing here: torchao still registers enums with
# torch's pytree (deprecated, harmless), and bitsandbytes fails to fetch an optional CPU kernel from the hub, a
# kernel training turns off anyway (embtune.lora.keep_4bit_differentiable).
for _name in ("torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def _import_unsloth_first() -> None:
    """unsloth patches transformers and peft and asks to be imported before them (else it may run slower or use
    more memory). On a CUDA machine that has it, importing embtune does that; EMBTUNE_UNSLOTH=0 opts out (to time
    plain sentence-transformers + peft). A CPU machine never imports it here."""
    import importlib.util
    import sys

    if os.environ.get("EMBTUNE_UNSLOTH") == "0" or "unsloth" in sys.modules or not importlib.util.find_spec("unsloth"):
        return
    import torch

    if torch.cuda.is_available():
        try:
            import unsloth  # noqa: F401
        except Exception:  # unsloth raises more than ImportError when it cannot patch; the plan says why
            pass


_import_unsloth_first()


def environment() -> str:
    """One line on what this process runs on: Python, torch, and the device (GPU name and memory)."""
    import platform

    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        device = f"cpu: {torch.get_num_threads()} threads"
    return f"python {platform.python_version()} | torch {torch.__version__} | {device}"
