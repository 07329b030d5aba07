"""embtune: the library under the notebook suite for fine-tuning Qwen3-Embedding / Qwen3-Reranker
(or any sentence-transformers model) for retrieval on one GPU."""

__version__ = "0.1.0"


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
