"""What every step's configuration shares, and how a notebook turns its parameters cell into one.

Each notebook's parameters cell names exactly the fields of its step's config class (plus a few notebook-only
knobs), and the notebook builds the config with `StepConfig.from_params(globals())`: one list of knobs, with
the defaults in one place, that the tests compare against every notebook.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from .data import DEFAULT_DOC_TEMPLATE
from .rundir import REUSE


class OptionError(ValueError):
    """A parameter value the step cannot use; the message is one line: the parameter, the value, what is allowed."""


@dataclass(frozen=True)
class Rule:
    """What a parameter's value (when not None) must satisfy, beyond its type, and how to say so."""

    test: Callable[[Any], bool]
    allowed: str


def one_of(*values) -> Rule:
    return Rule(lambda v: v in values, "one of " + ", ".join(map(repr, values)))


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f"a number of at least {low}")


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    def test(v):
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Rule(test, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def each(rule: Rule) -> Rule:
    return Rule(lambda v: all(x is None or rule.test(x) for x in v), f"a list of which each item is {rule.allowed}")


POSITIVE = Rule(lambda v: v > 0, "a number above 0")
STEPS = Rule(lambda v: v == -1 or v > 0, "-1 (the epochs decide) or a number of steps above 0")


def _fits(value, hint) -> bool:
    """Whether a value has the annotated type: int, float (an int too), str, bool, None, lists and unions of them."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    return True


def _name(hint) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_name(typing.get_args(hint)[0])}"
    return "None" if hint is type(None) else {int: "an integer", float: "a number", str: "a string",
                                              bool: "True or False"}.get(hint, str(hint))  # fmt: skip


def check_options(config) -> None:
    """Every field of a step's config against its type and its class's RULES (gathered along the class's bases):
    OptionError, one line, for the first that fails. Run on construction, so the notebooks, `make run-all` (before
    any notebook starts) and `python -m embtune.train` check the same way."""
    hints = typing.get_type_hints(type(config))
    rules = {}
    for klass in reversed(type(config).__mro__):
        rules.update(vars(klass).get("RULES", {}))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _fits(value, hints[f.name]):
            raise OptionError(f"{f.name}={value!r} is not allowed: expected {_name(hints[f.name])}")
        rule = rules.get(f.name)
        if rule is not None and value is not None and not rule.test(value):
            raise OptionError(f"{f.name}={value!r} is not allowed: expected {rule.allowed}")


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

    RULES = {"doc_template": Rule(lambda v: "{text}" in v, 'a template holding "{text}" (and "{title}" if you like)')}

    def __post_init__(self):
        check_options(self)

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides) -> Self:
        """The config from a notebook's namespace (`globals()`): every field the namespace defines."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in params.items() if k in names}, **overrides})


@dataclass(kw_only=True)
class Reuse:
    """For the steps whose artifacts a rerun may reuse (embtune.rundir): journals, mined negatives, checkpoints."""

    reuse: str = "matching"  # "matching": reuse what was made from the same inputs, else rebuild; "never"; "error"

    RULES = {"reuse": one_of(*REUSE)}


@dataclass(kw_only=True)
class TrainingData:
    """For the steps that read the training labels."""

    split_overlap: str = "error"  # a query labelled in train and in dev/test: "error" stops; "drop" trains without it

    RULES = {"split_overlap": one_of("error", "drop")}


@dataclass(kw_only=True)
class DevSplit:
    """For the steps that choose on the dev queries (all hold out the same ones: `data.split_train_dev`)."""

    dev_fraction: float | None = None  # held out of train without a dev split; None: 15 %, 50 to 300 queries

    RULES = {"dev_fraction": between(0, 1, low_open=True, high_open=True)}
