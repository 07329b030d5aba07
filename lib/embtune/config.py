"""What every step's configuration shares, and how a notebook turns its parameters cell into one.

Each notebook's parameters cell names exactly the fields of its step's config class (plus a few notebook-only
knobs), and the notebook builds the config with `StepConfig.from_params(globals())`: one list of knobs, with
the defaults in one place, that the tests compare against every notebook.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Self

from .data import DEFAULT_DOC_TEMPLATE


@dataclass(kw_only=True)
class StepConfig:
    data_dir: str
    run_dir: str
    base_model: str
    # None: the model's own default (Qwen3-Embedding's query prompt and Qwen3-Reranker's instruction are both
    # Qwen's web-search task; a model without one gets none); "": no instruction; else your task, in English.
    instruction: str | None = None
    doc_template: str = DEFAULT_DOC_TEMPLATE
    seed: int = 42

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides) -> Self:
        """The config from a notebook's namespace (`globals()`): every field the namespace defines."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in params.items() if k in names}, **overrides})


@dataclass(kw_only=True)
class Reuse:
    """For the steps whose artifacts a rerun may reuse (embtune.rundir): journals, mined negatives, checkpoints."""

    reuse: str = "matching"  # "matching": reuse what was made from the same inputs, else rebuild; "never"; "error"


@dataclass(kw_only=True)
class TrainingData:
    """For the steps that read the training labels."""

    split_overlap: str = "error"  # a query labelled in train and in dev/test: "error" stops; "drop" trains without it


@dataclass(kw_only=True)
class DevSplit:
    """For the steps that choose on the dev queries (all hold out the same ones: `data.split_train_dev`)."""

    dev_fraction: float | None = None  # held out of train without a dev split; None: 15 %, 50 to 300 queries
