"""Where notebook 01's queries come from: an LLM behind an OpenAI-compatible endpoint, a causal LM in this
process, or no LLM at all (inverse cloze task, independent cropping, and the prose inside source code).

The prompt follows the Qwen3-Embedding report's synthesis recipe: each document gets a persona, a query type,
a difficulty, a length and an output language, with the instructions in English, and the reply is asked for
as JSON. Replies are read as JSON wherever it stands in them (fenced, inside prose, cut off by the token limit);
a reply with no JSON gives no query, whatever the filters would say of its lines.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .config import at_least, check_options, each, one_of
from .data import spaceless

UNSUPERVISED = ("ict", "crop", "prose")
PERSONAS = [
    "a domain expert checking a detail",
    "a student new to the field",
    "a practitioner solving a problem at work",
    "a curious member of the public",
]
QUERY_TYPES = {
    "keyword": ("a keyword query, as typed into a search box", "2 to 6"),
    "question": ("a natural-language question", "6 to 20"),
    "long": ("a detailed description of an information need", "20 to 50"),
}
DIFFICULTIES = ["high school", "university", "PhD"]
SAME_LANGUAGE = "the same language as the document"


class GeneratorError(RuntimeError):
    """The generator cannot go on (endpoint refused or unreachable after retries, bad settings)."""


@dataclass(kw_only=True)
class PromptConfig:
    queries_per_doc: int = 1
    personas: list[str] | None = None  # None: PERSONAS, a few generic readers; or your users
    query_types: list[str] = field(default_factory=lambda: list(QUERY_TYPES))
    difficulties: list[str] = field(default_factory=lambda: list(DIFFICULTIES))
    language: str = SAME_LANGUAGE
    max_doc_chars: int = 4000  # the document is cut here in the prompt

    RULES = {"queries_per_doc": at_least(1), "query_types": each(one_of(*QUERY_TYPES)), "max_doc_chars": at_least(1)}

    def __post_init__(self):  # alone; inside SynthConfig, StepConfig's check comes first
        check_options(self)


def build_prompt(document: str, config: PromptConfig, rng: random.Random) -> str:
    kind, words = QUERY_TYPES[rng.choice(config.query_types)]
    n = config.queries_per_doc
    return (
        f"You are {rng.choice(config.personas or PERSONAS)}. Read the document below and write {n} search "
        f"quer{'y' if n == 1 else 'ies'} that this document answers.\n"
        f"- Query type: {kind}.\n"
        f"- Difficulty: {rng.choice(config.difficulties)} level.\n"
        f"- Length: {words} words.\n"
        f"- Language: {config.language}.\n"
        "- Do not copy sentences from the document; a reader must not need the document to understand the query.\n\n"
        f'Document:\n"""\n{document[: config.max_doc_chars]}\n"""\n\n'
        'Reply with JSON only, in this form: {"queries": ["..."]}'
    )


def judge_prompt(query: str, document: str, max_doc_chars: int = 4000) -> str:
    return (
        "Rate how well the document answers the search query, from 1 (not at all) to 5 (fully).\n\n"
        f'Query: {query}\n\nDocument:\n"""\n{document[:max_doc_chars]}\n"""\n\n'
        "Reply with the number only."
    )


def parse_score(reply: str) -> int | None:
    match = re.search(r"[1-5]", strip_thinking(reply))
    return int(match.group()) if match else None


def strip_thinking(reply: str) -> str:
    """The reply without reasoning: closed <think> blocks, and an unclosed one (cut off by the token limit) to
    the end."""
    return re.sub(r"<think>.*?(</think>|$)", "", reply or "", flags=re.S).strip()


def parse_queries(reply: str) -> list[str]:
    """Queries from a reply that is the JSON asked for: `{"queries": [...]}`, `{"query": ...}` or a list, inside
    a code fence or prose or not, and the complete queries of JSON cut off by the token limit. Anything else
    (prose, an error page, reasoning only) gives none: a reply that did not follow the instructions is not
    trusted to hold a query."""
    text = strip_thinking(reply)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            value = value.get("queries", value.get("query"))
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            found = [v.get("query") if isinstance(v, dict) else v for v in value]
            return [q.strip() for q in found if isinstance(q, str) and q.strip()]
    salvaged = re.findall(r'"query"\s*:\s*"((?:[^"\\]|\\.)+)"', text)  # from JSON cut off or malformed
    return [json.loads(f'"{q}"').strip() for q in salvaged]


@dataclass
class Endpoint:
    """An OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp server, a hosted API).

    Written on the standard library rather than the `openai` package: one POST route, and the retry, back-off
    and budget rules below are ours to state and test either way.
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # from the environment; never printed or journaled
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubles each time, jittered
    max_wait: float = 120.0  # the longest a Retry-After is honoured
    temperature: float = 0.7
    max_tokens: int = 256
    tokens_used: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def chat(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        problem, wait = "", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                # Retry-After when the server names a wait, else exponential back-off; jittered, so parallel
                # requests that failed together do not all come back at the same moment.
                time.sleep((wait or self.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2))
            wait = 0.0
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                content = reply["choices"][0]["message"]["content"]
                with self._lock:  # calls run in parallel threads
                    self.tokens_used += int((reply.get("usage") or {}).get("total_tokens", 0))
                return content or ""
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code} {e.read()[:200].decode(errors='replace')}"
                if e.code < 500 and e.code not in (408, 429):  # the request itself is wrong: retrying won't help
                    raise GeneratorError(f"{url} refused the request: {problem}") from None
                wait = _retry_after(e.headers.get("Retry-After"), self.max_wait)
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                problem = f"malformed response ({type(e).__name__}: {e})"
        raise GeneratorError(f"{url} failed {self.max_retries + 1} times, last: {problem}; rerun to resume")

    def generate(self, prompts: list[str]) -> list[str | GeneratorError]:
        """Replies in order; a request that failed after its retries is its GeneratorError, so the replies that
        arrived can be kept (journaled) before the error stops the run."""

        def reply(prompt):
            try:
                return self.chat(prompt)
            except GeneratorError as e:
                return e

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(reply, prompts))


def _retry_after(value: str | None, cap: float) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), at most `cap`; 0 when absent."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), cap)


class LocalLM:
    """A causal LM in this process: unsloth's FastLanguageModel in 4-bit on a GPU, else transformers.
    A `.gguf` file path is loaded by transformers with `gguf_file=` (de-quantised)."""

    def __init__(self, name: str, max_new_tokens: int = 256, temperature: float = 0.0, trust_remote_code=False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .lora import unsloth_problem

        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        kwargs = {"trust_remote_code": trust_remote_code}
        if name.endswith(".gguf"):
            name, kwargs["gguf_file"] = os.path.split(name)
        self.model = None
        if torch.cuda.is_available() and "gguf_file" not in kwargs and unsloth_problem() is None:
            from unsloth import FastLanguageModel

            self.model, self.tokenizer = FastLanguageModel.from_pretrained(name, load_in_4bit=True, **kwargs)
            FastLanguageModel.for_inference(self.model)
        if self.model is None:
            self.tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _chat(self, prompt: str) -> str:
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}]
            # Qwen3's template honours enable_thinking (no reasoning before the JSON); others ignore the flag.
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=False)  # fmt: skip
        return prompt

    def generate(self, prompts: list[str]) -> list[str]:
        import torch

        batch = self.tokenizer([self._chat(p) for p in prompts], return_tensors="pt", padding=True)
        batch = batch.to(self.model.device)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {}
        with torch.no_grad():
            out = self.model.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])")


def _units(text: str) -> tuple[str, list[str], str]:
    """The pieces a document is cut into for the no-LLM generators, by its form: (form, pieces, joiner).
    Sentences where there are two or more; else lines (source code, tables, logs, lists); else words, or
    characters in scripts written without spaces."""
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    if len(sentences) >= 2:
        return "sentences", sentences, " "
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) >= 2:
        return "lines", lines, "\n"
    if spaceless(text):  # Chinese or Japanese: characters are the words
        return "characters", list(text.replace(" ", "")), ""
    return "words", text.split(), " "


def ict(doc: dict, rng: random.Random, keep: float = 0.1, min_chars: int = 20):
    """Inverse cloze task (Lee et al., 2019): a piece of the document is the query, the rest its positive; the
    piece stays in with probability `keep`, so lexical matching is learned too. The piece is a sentence; in a
    document without sentences (code, tables, logs) a run of lines; in one line of text a span of words or
    characters. Returns (query, view, form), or None for a document too short to cut."""
    form, units, joiner = _units(doc["text"])
    if form in ("words", "characters"):
        n = len(units)
        if n < 4 or len("".join(units)) < min_chars:
            return None
        size = max(1, round(n * rng.uniform(0.1, 0.3)))  # a span, as a sentence is of a paragraph
        start = rng.randrange(n - size + 1)
        query, rest = joiner.join(units[start : start + size]), units[:start] + units[start + size :]
    else:
        # whole units; in code a line is often shorter than a query should be, so consecutive lines join
        spans = _spans(units, min_chars)
        if len(spans) < 2:
            return None
        i, j = rng.choice(spans)
        query, rest = joiner.join(units[i:j]), units[:i] + units[j:]
    view = units if rng.random() < keep else rest
    return query, {"title": doc["title"], "text": joiner.join(view)}, form


def _spans(units: list[str], min_chars: int) -> list[tuple[int, int]]:
    """(start, end) runs of consecutive units, each the shortest from its start holding `min_chars` characters
    and no more than a third of the document, so something is always left as the positive."""
    spans = []
    for i in range(len(units)):
        j, size = i, 0
        while j < len(units) and size < min_chars:
            size, j = size + len(units[j]), j + 1
        if size >= min_chars and (j - i) * 3 <= len(units) + 2:
            spans.append((i, j))
    return spans


def crop(doc: dict, rng: random.Random, low: float = 0.1, high: float = 0.5, min_units: int = 4):
    """Independent cropping (Contriever, Izacard et al., 2022): two random spans of the document, each 10-50 %
    of it, as query and positive. Spans are of words, or of characters in scripts written without spaces.
    Returns (query, view, form), or None for documents under `min_units` units."""
    text = doc["text"]
    spaced = not spaceless(text)  # Chinese or Japanese: crop characters
    units, joiner = (text.split(), " ") if spaced else (list(text.replace(" ", "")), "")
    if len(units) < min_units:
        return None

    def span():
        n = max(1, round(len(units) * rng.uniform(low, high)))
        start = rng.randrange(len(units) - n + 1)
        return joiner.join(units[start : start + n])

    return span(), {"title": "", "text": span()}, "words" if spaced else "characters"


_DOCSTRING = re.compile(r"(\"\"\"|\'\'\')(.*?)\1", re.S)
_BLOCK_COMMENT = re.compile(r"/\*+(.*?)\*+/", re.S)
_LINE_COMMENT = re.compile(r"^[ \t]*(?:#(?![!])|//)(.*)$|[ \t](?:#|//)[ \t](.*)$", re.M)
_DEFINED = re.compile(r"\b(?:def|class|function|func|fn|sub|struct|interface|trait|enum)\s+([A-Za-z_]\w*)")
_WORD = re.compile(r"[^\W\d_]{2,}")
_CASE_CHANGE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _is_prose(text: str) -> bool:
    """Words, not code or markers: 3 or more words making up most of the tokens (4 characters in a script without
    spaces). `#include <x.h>`, `# noqa: E501`, `// ---` and commented-out code mostly fail it."""
    if spaceless(text):
        return len(re.findall(r"[^\W\d_]", text)) >= 4
    tokens = text.split()
    words = [t for t in tokens if _WORD.fullmatch(t.strip(".,;:!?()'\"`"))]
    return len(words) >= 3 and len(words) * 2 > len(tokens)


def identifier_words(name: str) -> str:
    """`read_config_file`, `readConfigFile` and `HTTPServer` as `read config file`, `read config file` and
    `http server`: the words a person would type for the name."""
    return " ".join(w.lower() for part in name.split("_") for w in _CASE_CHANGE.split(part) if w)


def _prose_pieces(text: str) -> list[tuple[str, int, int, str]]:
    """(query, start, end, form) for each piece of prose in source code: docstrings and block comments, runs of
    comment lines, and the words of each defined name (start = end: the name stays in the positive)."""
    pieces = []
    for m in _DOCSTRING.finditer(text):
        pieces.append((" ".join(m.group(2).split()), m.start(), m.end(), "docstrings"))
    for m in _BLOCK_COMMENT.finditer(text):
        body = " ".join(line.strip().lstrip("*") for line in m.group(1).splitlines())
        pieces.append((" ".join(body.split()), m.start(), m.end(), "comments"))
    run = None  # consecutive whole-line comments are one piece, as a paragraph is
    for m in _LINE_COMMENT.finditer(text):
        whole, body = m.group(1) is not None, (m.group(1) or m.group(2) or "").strip()
        if whole and run and text[run[2] : m.start()].strip() == "":
            run = (run[0] + " " + body, run[1], m.end())
        else:
            if run:
                pieces.append((*run, "comments"))
            run = (body, m.start(), m.end()) if whole else None
            if not whole:
                pieces.append((body, m.start(), m.end(), "comments"))
    if run:
        pieces.append((*run, "comments"))
    pieces = [p for p in pieces if _is_prose(p[0])]
    for m in _DEFINED.finditer(text):
        words = identifier_words(m.group(1))
        if len(words.split()) >= 2:
            pieces.append((words, m.end(), m.end(), "names"))
    return pieces


def prose(doc: dict, rng: random.Random, keep: float = 0.1):
    """A query from the prose inside source code, which is how people describe code: a docstring or comment (taken
    out of the positive, as in the inverse cloze task), or a defined name split into words. The inverse cloze task
    cuts code by lines, and a line of code is rarely what anyone searches with. Returns (query, view, form), or
    None for a document with no prose in it."""
    pieces = _prose_pieces(doc["text"])
    if not pieces:
        return None
    query, start, end, form = rng.choice(pieces)
    text = doc["text"]
    rest = text if rng.random() < keep else re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", text[:start] + text[end:])
    if not rest.strip():
        return None
    return query, {"title": doc["title"], "text": rest.strip("\n")}, form
