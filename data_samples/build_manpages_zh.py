#!/usr/bin/env python3
"""Build the ``manpages_zh`` sample dataset (Chinese retrieval).

What it builds
--------------
``data_samples/manpages_zh/`` -- a small Chinese retrieval dataset in BEIR
layout::

    corpus.jsonl      {"_id": "d0001", "title": "ls(1)", "text": ...}
    queries.jsonl     {"_id": "q0001", "text": "列出目录内容"}
    qrels/train.tsv   query-id <TAB> corpus-id <TAB> score   (score is always 1)
    qrels/dev.tsv
    qrels/test.tsv
    README.md
    LICENSE           (the GNU Free Documentation License 1.2 text)
    NOTICES.md        (per document: source page, its notices, translators)

Each labelled pair comes from one Simplified-Chinese manual page of the Debian
package ``manpages-zh``: the query is the one-line summary of the page's NAME
section (``ls \\- 列出目录内容`` gives the query ``列出目录内容``) and the
document is the page's DESCRIPTION section rendered to plain text, titled
``name(section)``.  The NAME line is not part of the document, and a summary
that still occurs verbatim in the description gives no query, so the task is
not string matching.  Pages whose summary is unusable (untranslated English,
too short, naming the command, shared with another page) stay in the corpus
as unlabelled distractor documents.  Pages whose description is mostly
untranslated English are skipped.  Queries are split with a fixed seed into
about 60 % train, 15 % dev and 25 % test.

Source
------
The manual pages are not in this repository.  Get them from Debian (any
machine with apt; no root needed)::

    apt-get download manpages-zh          # manpages-zh_1.6.4.0-1_all.deb
    dpkg -x manpages-zh_*_all.deb /tmp/manpages-zh

(without dpkg: ``ar x manpages-zh_*_all.deb data.tar.xz && mkdir -p
/tmp/manpages-zh && tar -xf data.tar.xz -C /tmp/manpages-zh``) and pass the
extracted root (the folder that holds ``usr/``)::

    python3 data_samples/build_manpages_zh.py /tmp/manpages-zh

The committed sample was built from ``manpages-zh`` 1.6.4.0-1 (Debian 12
"bookworm"); another version of the package gives a similar, not identical
dataset.

Licence
-------
``/usr/share/doc/manpages-zh/copyright`` in the package says the pages are
under the GNU Free Documentation License 1.2 or later (no Invariant Sections,
no Front-Cover Texts, no Back-Cover Texts), except ``kill.1`` (GPL-2.0),
``intro.6`` (GPL-2+) and ``epoll.7`` (GPL-2+), which this script leaves out.
The derived dataset is a modified version under the same licence: the
README names the source, the copyright holders and the changes, the licence
text is copied next to the data as ``LICENSE``, and ``NOTICES.md`` keeps, for
every document, the copyright and licence notices of its source page (the
notices of the original English pages: BSD, Tcl, GPL, Linux man-pages
licences...) and its translator credits.

Determinism
-----------
Standard library only.  Files are read in sorted order, random choices use
fixed seeds and the output folder is written under a temporary name that is
renamed into place when complete, so running the script twice on the same
package gives byte-identical files.

Usage::

    python3 data_samples/build_manpages_zh.py SOURCE_ROOT [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import sys
import tempfile

SEED = 20240612
LANG_DIR = os.path.join("usr", "share", "man", "zh_CN")
COPYRIGHT_FILE = os.path.join("usr", "share", "doc", "manpages-zh", "copyright")
CHANGELOG_FILE = os.path.join("usr", "share", "doc", "manpages-zh", "changelog.Debian.gz")
GFDL_FILES = ("/usr/share/common-licenses/GFDL-1.2",)

# Package versions this script was run on, with the sha256 of the .deb.
KNOWN_DEBS = {"1.6.4.0-1": "81bae29495f6445db290e3f329f1203eb19b651c2a7ea165b74ebdc853a32ac1"}

# Pages that the Debian copyright file puts under the GPL instead of the GFDL.
EXCLUDED_PAGES = {"man1/kill.1.gz", "man6/intro.6.gz", "man7/epoll.7.gz"}

MAX_DOC_CHARS = 1500
MIN_DOC_CHARS = 50
SHORT_DOC_CHARS = 200  # a shorter description is followed by the OPTIONS section
# A document counts as Chinese when Han characters make up at least half of
# Han characters + 2 x Latin words (a Chinese word is about two characters),
# and runs of six or more Latin words (untranslated English sentences) make up
# at most a third of it.
MIN_DOC_HAN_SHARE = 0.5
MAX_DOC_ENGLISH_SHARE = 0.33
MIN_QUERY_HAN = 3  # Han characters in a query
MIN_QUERY_HAN_SHARE = 0.5  # same measure as MIN_DOC_HAN_SHARE, for a query
MAX_QUERY_CHARS = 60
MAX_LABELLED = 480  # cap on labelled (query, document) pairs
SPLITS = (("train", 0.60), ("dev", 0.15), ("test", 0.25))

HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
WS_RE = re.compile(r"\s+")
# A space between two CJK characters (or CJK punctuation) comes from a line
# break in the source; Chinese text has no spaces there.
CJK_CHARS = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
CJK_SPACE_RE = re.compile(rf"(?<=[{CJK_CHARS}]) +(?=[{CJK_CHARS}])")
PUNCT_RE = re.compile(r"[\s\W_]+", re.UNICODE)
LATIN_WORD_RE = re.compile(r"[A-Za-z]+")
ENGLISH_RUN_RE = re.compile(r"[A-Za-z][A-Za-z'’-]*(?:[ ,;:]+[A-Za-z][A-Za-z'’-]*){5,}")

NAME_HEADINGS = ("NAME", "名称", "名字", "名 称", "命令名")
DESCRIPTION_HEADINGS = ("DESCRIPTION", "描述", "描叙", "说明", "描 述", "介绍", "INTRODUCTION", "OVERVIEW")
OPTIONS_HEADINGS = ("OPTIONS", "选项")

# troff special characters \(xx and \[xx] that occur in the pages.
SPECIAL_CHARS = {
    "em": "—",
    "en": "–",
    "hy": "-",
    "mi": "-",
    "lq": "“",
    "rq": "”",
    "oq": "‘",
    "cq": "’",
    "aq": "'",
    "dq": '"',
    "bu": "•",
    "co": "©",
    "rg": "®",
    "tm": "™",
    "de": "°",
    "+-": "±",
    "mu": "×",
    "di": "÷",
    "<=": "≤",
    ">=": "≥",
    "!=": "≠",
    "->": "→",
    "<-": "←",
    "ua": "↑",
    "da": "↓",
    "ti": "~",
    "ha": "^",
    "rs": "\\",
    "sl": "/",
    "ba": "|",
    "or": "|",
    "pl": "+",
    "eq": "=",
    "fm": "′",
    "sd": "″",
    "dg": "†",
    "sc": "§",
    "ps": "¶",
    "ct": "¢",
    "Po": "£",
    "Eu": "€",
    "aa": "´",
    "ga": "`",
    "at": "@",
    "sh": "#",
    "Do": "$",
    "ul": "_",
    "ru": "_",
    "br": "|",
    "lh": "☜",
    "rh": "☞",
    "es": "∅",
    "if": "∞",
    "**": "*",
}
STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "(Tm": "™", "(lq": "“", "(rq": "”"}
FONT_REQUESTS = {"B", "I", "SM", "SB", "BR", "RB", "BI", "IB", "IR", "RI", "CW", "R"}
PARAGRAPH_REQUESTS = {"PP", "P", "LP", "TP", "TQ", "IP", "SS", "HP", "EX", "Sp"}


# --------------------------------------------------------------------------
# troff -> plain text
# --------------------------------------------------------------------------


def split_args(text: str) -> list[str]:
    """Split the arguments of a troff request (double quotes group words)."""
    args, cur, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            if quoted and i + 1 < len(text) and text[i + 1] == '"':
                cur.append('"')
                i += 2
                continue
            quoted = not quoted
        elif ch in " \t" and not quoted:
            if cur:
                args.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
        i += 1
    if cur:
        args.append("".join(cur))
    return args


ESCAPE_RE = re.compile(
    r"""\\(?:
        \((?P<special2>..)          # \(xx
      | \[(?P<special>[^\]]*)\]      # \[name]
      | \*(?:\((?P<str2>..)|\[(?P<strn>[^\]]*)\]|(?P<str1>.))   # \*x \*(xx \*[name]
      | [fFmMgY](?:\(..|\[[^\]]*\]|.)  # font, colour, register-format escapes
      | s[-+]?(?:\d|\(\d\d|\[\d+\])  # size change
      | [hvwlLNoDbxXkZRSA]'[^']*'    # escapes with a quoted argument
      | n(?:\(..|\[[^\]]*\]|.)       # number register
      | (?P<char>.)                  # any other single-character escape
    )""",
    re.VERBOSE,
)
SINGLE_ESCAPES = {
    "-": "-",
    "e": "\\",
    "\\": "\\",
    "&": "",
    "|": "",
    "^": "",
    ",": "",
    "/": "",
    "%": "",
    "c": "",
    " ": " ",
    "~": " ",
    "0": " ",
    "t": " ",
    "'": "'",
    "`": "`",
    ".": ".",
    "!": "",
    ":": "",
    "p": "",
    "{": "",
    "}": "",
    "z": "",
    "d": "",
    "u": "",
    "r": "",
}


def render_inline(text: str) -> str:
    """Replace troff escapes in one line of text with plain characters."""
    # \" starts a comment that runs to the end of the line.
    text = re.sub(r'\\".*$', "", text)

    def repl(m):
        if m.group("special2") is not None:
            return SPECIAL_CHARS.get(m.group("special2"), "")
        if m.group("special") is not None:
            return SPECIAL_CHARS.get(m.group("special"), "")
        for key in ("str2", "strn", "str1"):
            if m.group(key) is not None:
                return STRINGS.get(m.group(key), "")
        if m.group("char") is not None:
            return SINGLE_ESCAPES.get(m.group("char"), "")
        return ""

    return ESCAPE_RE.sub(repl, text)


def join_lines(lines: list[str]) -> str:
    """Join rendered lines the way a formatter fills them, then drop the
    spaces that a line break leaves between two CJK characters."""
    text = WS_RE.sub(" ", " ".join(lines)).strip()
    # Old pages quote ``like this''.
    text = text.replace("``", "“").replace("''", "”")
    return CJK_SPACE_RE.sub("", text)


def parse_sections(source: str) -> list[tuple[str, str]]:
    """Return the page's sections as (heading, plain text) pairs."""
    sections: list[tuple[str, list[str]]] = []
    heading, lines = None, []
    skipping_until = None
    in_table = False
    for raw in source.splitlines():
        line = raw.rstrip()
        if skipping_until is not None:
            if line.strip() == skipping_until:
                skipping_until = None
            continue
        if in_table:
            if line.startswith(".TE"):
                in_table = False
            continue
        if line.startswith(("'\\\"", '.\\"', '\\"', "'.\\\"")) or line in (".", "'"):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.'](\S*)\s*(.*)$", line)
            request, rest = m.group(1), m.group(2)
            if request in ("de", "de1", "am"):
                skipping_until = ".."
                continue
            if request == "ig":
                skipping_until = ".."
                continue
            if request == "TS":
                in_table = True
                continue
            if request == "SH":
                if heading is not None:
                    sections.append((heading, lines))
                heading = join_lines([render_inline(a) for a in split_args(rest)])
                lines = []
                continue
            if request in FONT_REQUESTS:
                args = [render_inline(a) for a in split_args(rest)]
                if request in ("B", "I", "SM", "SB", "CW", "R"):
                    lines.append(" ".join(args))
                else:  # alternating fonts: the words are joined without spaces
                    lines.append("".join(args))
                continue
            if request in PARAGRAPH_REQUESTS:
                lines.append("\n")
                if request in ("IP", "SS") and rest:
                    args = split_args(rest)
                    if args:
                        tag = render_inline(args[0])
                        if tag.strip() and tag.strip() not in ("•", "*", "-", "o"):
                            lines.append(tag)
                continue
            if request in ("UR", "MT"):
                lines.append(render_inline(rest))
                continue
            # Everything else (layout requests, unknown macros) adds no text.
            continue
        lines.append(render_inline(line))
    if heading is not None:
        sections.append((heading, lines))

    out = []
    for head, body in sections:
        paragraphs, cur = [], []
        for piece in body:
            if piece == "\n":
                if cur:
                    paragraphs.append(join_lines(cur))
                cur = []
            else:
                cur.append(piece)
        if cur:
            paragraphs.append(join_lines(cur))
        text = join_lines([p for p in paragraphs if p])
        out.append((head, text))
    return out


def heading_is(heading: str, names) -> bool:
    head = heading.upper().replace('"', "")
    return any(name in head for name in names)


# --------------------------------------------------------------------------
# Pages -> labelled pairs
# --------------------------------------------------------------------------


def han_share(text: str) -> float:
    """Han characters / (Han characters + 2 x Latin words): about the share
    of Chinese words, since a Chinese word is about two characters long."""
    han = len(HAN_RE.findall(text))
    words = len(LATIN_WORD_RE.findall(text))
    return han / (han + 2 * words) if han + words else 0.0


def is_chinese_document(text: str) -> bool:
    """False for descriptions that are mostly untranslated English (or mostly
    code and symbol lists)."""
    if han_share(text) < MIN_DOC_HAN_SHARE:
        return False
    english = sum(len(m.group()) for m in ENGLISH_RUN_RE.finditer(text))
    return english / len(text) <= MAX_DOC_ENGLISH_SHARE


def cap(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters at a sentence end."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    for ends in ("。", "；！？", ".;!?"):
        pos = max(cut.rfind(ch) for ch in ends)
        if pos > limit // 2:
            return cut[: pos + 1].rstrip()
    cut = text[: limit - 1]
    return cut.rstrip() + "…"


def split_name_line(text: str) -> tuple[list[str], str] | None:
    """``'ls, dir - 列出目录内容'`` -> (['ls', 'dir'], '列出目录内容')."""
    m = re.match(r"^(.*?)\s+[-–—]+\s+(.*)$", text) or re.match(r"^(.*?)\s*[-–—]\s+(.*)$", text)
    if not m:
        m = re.match(r"^([\w.,:+\-\s]+?)\s*[-–—]+\s*(.*)$", text)
    if not m:
        return None
    names = [n.strip() for n in re.split(r"[,，]\s*|\s+", m.group(1)) if n.strip()]
    return names, m.group(2).strip()


def clean_summary(summary: str) -> str:
    """Tidy a NAME summary into a query: strip the trailing full stop and
    parentheses around it, and drop an untranslated English lead-in
    (``'list directory contents 列出目录内容'``)."""
    # Pages documenting several commands list them all on the NAME line
    # ("显示或设置系统的主机名 domainname - 显示或设置..."): keep the first.
    s = re.split(r"\s+[\w.+-]+\s+[-–—]\s+", summary.strip(), maxsplit=1)[0]
    s = s.strip().strip("。.;；").strip()
    # "GNU Bourne-Again SHell (GNU 命令解释程序 “Bourne二世”)": keep the Chinese
    # part when the English and Chinese versions sit side by side.
    m = re.match(r"^([A-Za-z0-9 ,.'/:+\-]+)[(（]([^()（）]*[\u4e00-\u9fff][^()（）]*)[)）]$", s)
    if m and not HAN_RE.search(m.group(1)):
        s = m.group(2).strip()
    # "listen for connections on a socket 在一个套接字上倾听连接": an English
    # phrase (at least three lower-case words) followed by its translation.
    m = re.match(r"^([A-Za-z][A-Za-z0-9 ,'/:+\-]{12,}?)\s+(?=[\u4e00-\u9fff])(.*)$", s)
    if m and sum(w.isalpha() and w.islower() for w in m.group(1).split()) >= 3:
        s = m.group(2).strip()
    # Revision stamps: "...，v0.9.5", "... (2003/11/23 08:02:29)", "(版本0.90)".
    s = re.sub(r"\s*[(（]\s*\d{4}/\d\d/\d\d[^)）]*[)）]$", "", s)
    s = re.sub(r"\s*[(（]\s*(?:版本|version\s*|v)?\d+(?:\.\d+)+\s*[)）]$", "", s)
    s = re.sub(r"\s*[,，]\s*(?:版本|version\s*|v)\d+(?:\.\d+)+$", "", s)
    return WS_RE.sub(" ", s).strip()


def summary_problem(summary: str, names: list[str], text: str) -> str | None:
    """Why a summary cannot be used as a query (None if it can)."""
    if not summary:
        return "no summary"
    if len(HAN_RE.findall(summary)) < MIN_QUERY_HAN:
        return "too short or untranslated"
    if han_share(summary) < MIN_QUERY_HAN_SHARE:
        return "mostly untranslated"
    if len(summary) > MAX_QUERY_CHARS:
        return "too long"
    low = summary.lower()
    for name in names:
        if len(name) >= 2 and re.search(rf"(?<![\w]){re.escape(name.lower())}(?![\w])", low):
            return "names the page"
    key = PUNCT_RE.sub("", summary).lower()
    if key and key in PUNCT_RE.sub("", text).lower():
        return "repeated in text"
    return None


def read_page(path: str) -> str:
    with gzip.open(path, "rb") as fh:
        return fh.read().decode("utf-8")


def iter_pages(root: str):
    """Yield (relative path, source text) in sorted order."""
    base = os.path.join(root, LANG_DIR)
    if not os.path.isdir(base):
        raise SystemExit(
            f"error: {base} not found.\n"
            "Extract the Debian package first:\n"
            "    apt-get download manpages-zh && dpkg -x manpages-zh_*_all.deb /tmp/manpages-zh\n"
            "and pass the extracted folder: build_manpages_zh.py /tmp/manpages-zh"
        )
    for sub in sorted(os.listdir(base)):
        folder = os.path.join(base, sub)
        if not (sub.startswith("man") and os.path.isdir(folder)):
            continue
        for name in sorted(os.listdir(folder)):
            rel = f"{sub}/{name}"
            path = os.path.join(folder, name)
            if os.path.islink(path) or not name.endswith(".gz") or rel in EXCLUDED_PAGES:
                continue
            source = read_page(path)
            if re.match(r"^\.so\s", source.lstrip()):
                continue  # an alias of another page
            yield rel, source


def page_to_record(rel: str, source: str):
    """Return (title, names, summary, description) or None."""
    sections = parse_sections(source)
    name_text = next((t for h, t in sections if heading_is(h, NAME_HEADINGS)), None)
    desc_text = next((t for h, t in sections if heading_is(h, DESCRIPTION_HEADINGS)), None)
    if not name_text or not desc_text:
        return None
    if len(desc_text) < SHORT_DOC_CHARS:
        # A one-line description: what a reader sees next are the options.
        options = next((t for h, t in sections if heading_is(h, OPTIONS_HEADINGS)), "")
        desc_text = f"{desc_text} {options}".strip()
    parsed = split_name_line(name_text)
    page_name, page_section = os.path.basename(rel)[: -len(".gz")].rsplit(".", 1)
    if parsed is None:
        names, summary = [page_name], ""
    else:
        names, summary = parsed
    if page_name not in names:
        names = [page_name] + names
    return f"{page_name}({page_section})", names, clean_summary(summary), desc_text


def remove_name_line(text: str, names: list[str], summary: str) -> str:
    """Drop a repeated ``name - summary`` opening from a description."""
    for name in names:
        prefix = re.match(rf"^{re.escape(name)}\s*[-–—]+\s*", text)
        if prefix and summary and text[prefix.end() :].startswith(summary):
            return text[prefix.end() + len(summary) :].lstrip(" 。.")
    return text


COMMENT_RE = re.compile(r"""^(?:[.']\s*\\"|\\")\s?(.*)$""")
BOILERPLATE_RE = re.compile(r"DO NOT MODIFY|generated (?:by|with)|Translate the source|^\*+$|^-+$|^=+$", re.I)
LICENCE_WORDS_RE = re.compile(
    r"copyright|\(c\)|©|licen[cs]|permission|permitted|distribut|warrant|public domain|rights reserved"
    r"|free software|free documentation|notice|版权|许可",
    re.I,
)
COPYRIGHT_HEADINGS = ("COPYRIGHT", "版权")
TRANSLATOR_HEADINGS = ("中文版维护人", "译者", "翻译")


def page_notices(rel: str, source: str) -> dict:
    """The notices of one page that must travel with text derived from it:
    the troff comments before its first section (copyright and licence of the
    original page), its COPYRIGHT section and its translator credits."""
    # Comment paragraphs before the first section; keep the span from the
    # first to the last paragraph that speaks of copyright or licence (the
    # rest documents macros or the page's history).
    paragraphs, cur = [], []
    for line in source.splitlines():
        if line.startswith(".SH"):
            break
        m = COMMENT_RE.match(line)
        if not m:
            continue
        text = m.group(1).rstrip()
        if BOILERPLATE_RE.search(text.strip()):
            continue
        if text.strip():
            cur.append(text)
        elif cur:
            paragraphs.append(cur)
            cur = []
    if cur:
        paragraphs.append(cur)
    marked = [i for i, par in enumerate(paragraphs) if LICENCE_WORDS_RE.search(" ".join(par))]
    header = []
    if marked:
        for par in paragraphs[marked[0] : marked[-1] + 1]:
            header += par + [""]
    header = header[:-1]
    sections = parse_sections(source)
    copyright_text = " ".join(t for h, t in sections if heading_is(h, COPYRIGHT_HEADINGS) and t)
    translators = " ".join(t for h, t in sections if heading_is(h, TRANSLATOR_HEADINGS) and t)
    return {
        "source": f"{LANG_DIR}/{rel}",
        "header": "\n".join(header),
        "copyright": copyright_text,
        "translators": translators,
    }


def check_copyright(root: str) -> None:
    """Stop unless the package's copyright file still puts every page under
    GFDL-1.2+ apart from the pages in EXCLUDED_PAGES (a new package version
    could change that)."""
    path = os.path.join(root, COPYRIGHT_FILE)
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: cannot check the licence of the pages")
    with open(path, encoding="utf-8") as fh:
        stanzas = fh.read().split("\n\n")
    exceptions = set()
    main_is_gfdl = False
    for stanza in stanzas:
        files = re.search(r"^Files:\s*((?:.*\n?)(?:^[ \t].*\n?)*)", stanza, re.M)
        licence = re.search(r"^License:\s*(\S+)", stanza, re.M)
        if not files or not licence:
            continue
        patterns = files.group(1).split()
        if patterns == ["*"]:
            main_is_gfdl = licence.group(1) == "GFDL-1.2+"
            continue
        for pattern in patterns:
            m = re.match(r"^src/(man\d\w*/[^/]+)$", pattern)
            if m and licence.group(1) != "GFDL-1.2+":
                exceptions.add(m.group(1) + ".gz")
    if not main_is_gfdl or exceptions != EXCLUDED_PAGES:
        raise SystemExit(
            f"error: {path} no longer says what this script expects (Files: * under GFDL-1.2+, "
            f"other licences only for {sorted(EXCLUDED_PAGES)}; found {sorted(exceptions)}): "
            "review the licence before building"
        )


def build(root: str):
    check_copyright(root)
    candidates = []
    notices = {}
    seen_texts: set[str] = set()
    stats = {
        "pages": 0,
        "no_name_or_description": 0,
        "description_short": 0,
        "description_not_chinese": 0,
        "duplicate_description": 0,
    }
    for rel, source in iter_pages(root):
        stats["pages"] += 1
        rec = page_to_record(rel, source)
        if rec is None:
            stats["no_name_or_description"] += 1
            continue
        title, names, summary, desc = rec
        desc = remove_name_line(desc, names, summary)
        if len(desc) < MIN_DOC_CHARS:
            stats["description_short"] += 1
            continue
        text = cap(desc, MAX_DOC_CHARS)
        if not is_chinese_document(text):
            stats["description_not_chinese"] += 1
            continue
        if text in seen_texts:
            stats["duplicate_description"] += 1
            continue
        seen_texts.add(text)
        candidates.append((title, names, summary, text))
        notices[title] = page_notices(rel, source)
    titles = [c[0] for c in candidates]
    assert len(set(titles)) == len(titles), "duplicate document titles"

    summary_counts: dict[str, int] = {}
    for _, _, summary, _ in candidates:
        key = PUNCT_RE.sub("", summary).lower()
        summary_counts[key] = summary_counts.get(key, 0) + 1
    labelled, distractors, problems = [], [], {}
    for title, names, summary, text in candidates:
        problem = summary_problem(summary, names, text)
        if problem is None and summary_counts[PUNCT_RE.sub("", summary).lower()] > 1:
            problem = "shared summary"
        if problem is None:
            labelled.append((title, summary, text))
        else:
            problems[problem] = problems.get(problem, 0) + 1
            distractors.append((title, text))

    rng = random.Random(SEED)
    capped = max(0, len(labelled) - MAX_LABELLED)
    if capped:
        dropped = set(rng.sample(range(len(labelled)), capped))
        distractors += [(t, x) for i, (t, _, x) in enumerate(labelled) if i in dropped]
        labelled = [p for i, p in enumerate(labelled) if i not in dropped]

    docs = [(t, x) for t, _, x in labelled] + distractors
    docs.sort(key=lambda d: d[0])
    doc_id = {title: f"d{i:04d}" for i, (title, _) in enumerate(docs, 1)}
    corpus = [{"_id": doc_id[t], "title": t, "text": x} for t, x in docs]

    labelled.sort(key=lambda p: p[0])
    queries, qrels_pairs = [], []
    for i, (title, summary, _) in enumerate(labelled, 1):
        qid = f"q{i:04d}"
        queries.append({"_id": qid, "text": summary})
        qrels_pairs.append((qid, doc_id[title]))

    order = list(range(len(qrels_pairs)))
    random.Random(SEED + 1).shuffle(order)
    n = len(order)
    n_train = round(n * SPLITS[0][1])
    n_dev = round(n * SPLITS[1][1])
    bounds = {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "test": order[n_train + n_dev :]}
    qrels = {name: sorted(qrels_pairs[i] for i in idx) for name, idx in bounds.items()}
    stats.update(
        {
            "documents": len(corpus),
            "labelled_documents": len(labelled),
            "distractors": len(distractors),
            "capped_pairs": capped,
            "distractor_reasons": dict(sorted(problems.items())),
            "queries": len(queries),
            **{f"{name}_queries": len(pairs) for name, pairs in qrels.items()},
            "mean_document_chars": round(sum(len(d["text"]) for d in corpus) / len(corpus)),
            "mean_query_chars": round(sum(len(q["text"]) for q in queries) / len(queries), 1),
        }
    )
    corpus_notices = [(d["_id"], d["title"], notices[d["title"]]) for d in corpus]
    return corpus, queries, qrels, stats, corpus_notices


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def package_version(root: str) -> str:
    path = os.path.join(root, CHANGELOG_FILE)
    if os.path.exists(path):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            m = re.match(r"^\S+ \(([^)]+)\)", fh.readline())
            if m:
                return m.group(1)
    return "unknown"


def gfdl_text(previous_dir: str) -> str:
    """The GFDL 1.2 text: Debian's copy, else the one of a previous build."""
    for path in GFDL_FILES + (os.path.join(previous_dir, "LICENSE"),):
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            if "GNU Free Documentation License" in text[:200] and "Version 1.2" in text[:200]:
                return text
    raise SystemExit(
        "error: the GFDL 1.2 text (/usr/share/common-licenses/GFDL-1.2 on Debian and Ubuntu) was not "
        "found; it must be shipped with the data"
    )


def render_notices(corpus_notices, version: str) -> str:
    out = [
        "# manpages_zh: notices of the source pages",
        "",
        "Every document of `corpus.jsonl` is derived from one manual page of the Debian package",
        f"`manpages-zh` {version}.",
        "For each document this file gives that page's path in the package and, verbatim, the comments at the top of",
        "the page source (the copyright and licence of the original, usually English, page), the page's COPYRIGHT",
        "section and its translator credits, where the page has them.  All pages are also covered by the",
        "package-wide notice quoted in README.md (GFDL 1.2 or later); the Chinese pages are maintained by the",
        "Chinese man-pages project, https://github.com/man-pages-zh/manpages-zh.",
        "",
    ]
    for doc_id, title, notice in corpus_notices:
        out.append(f"## {doc_id} `{title}`")
        out.append("")
        out.append(f"Source: `{notice['source']}`")
        out.append("")
        if notice["header"]:
            out.append("```text")
            out.append(notice["header"].replace("```", "` ` `"))
            out.append("```")
            out.append("")
        if notice["copyright"]:
            out.append(f"Copyright section: {notice['copyright']}")
            out.append("")
        if notice["translators"]:
            out.append(f"Translation: {notice['translators']}")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Move a finished temporary folder into place, replacing the old one."""
    old = None
    if os.path.exists(final_dir):
        old = final_dir + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    if old:
        shutil.rmtree(old)


README = """\
# manpages_zh: Chinese retrieval sample built from Chinese manual pages

A small Simplified-Chinese retrieval dataset in BEIR layout, for checking
that every step works on a script written without spaces between words.
Every file is UTF-8; ids are stable across rebuilds.

| file | content |
|---|---|
| `corpus.jsonl` | `{{"_id", "title", "text"}}`, {documents} documents |
| `queries.jsonl` | `{{"_id", "text"}}`, {queries} queries |
| `qrels/train.tsv` | {train_queries} queries |
| `qrels/dev.tsv` | {dev_queries} queries |
| `qrels/test.tsv` | {test_queries} queries |
| `LICENSE` | the GNU Free Documentation License, Version 1.2 |
| `NOTICES.md` | per document: its source page, that page's original copyright and licence notices, its translators |

The qrels files are tab-separated with the header `query-id corpus-id score`.
Each query has exactly one relevant document (score 1).  The corpus holds
{labelled_documents} labelled documents and {distractors} distractors that no
query points to.  Documents average {mean_document_chars} characters, queries
{mean_query_chars}.

Example: the query `列出目录内容` ("list directory contents") has as its one
relevant document `ls(1)`, the DESCRIPTION section of the `ls` manual page.

## Source

The Simplified-Chinese manual pages (`/usr/share/man/zh_CN/`) of the Debian
package `manpages-zh` {version} (upstream https://github.com/man-pages-zh/manpages-zh),
translations of Linux, GNU, Tcl/Tk and other manual pages by the CMPP
project (China Linux Forum man-page translation project) and later
contributors.

## How it was built

```bash
apt-get download manpages-zh            # manpages-zh_{version}_all.deb{deb_hash}
dpkg -x manpages-zh_*_all.deb /tmp/manpages-zh
python3 data_samples/build_manpages_zh.py /tmp/manpages-zh
```

(Without dpkg: `ar x manpages-zh_*_all.deb data.tar.xz`, then
`mkdir -p /tmp/manpages-zh && tar -xf data.tar.xz -C /tmp/manpages-zh`.)

Standard library only, deterministic (running it twice on the same package
gives byte-identical files).

* the {pages} zh_CN pages (aliases and `.so` links skipped; `kill.1`,
  `intro.6` and `epoll.7` left out because they are under the GPL, not the
  GFDL) are rendered from troff to plain text;
* query = the summary of the page's NAME line (`ls \\- 列出目录内容` gives
  `列出目录内容`), a trailing full stop and an English lead-in dropped;
* document = the page's DESCRIPTION section (followed by its OPTIONS
  section when the description is shorter than {short_chars} characters),
  whitespace collapsed (no spaces left between Chinese characters), a
  repeated NAME line removed, cut at a sentence end (`。`) to at most
  {max_chars} characters, titled `name(section)`;
* pages without both sections (including the few written with the `mdoc`
  macros) or whose document is shorter than {min_chars} characters are
  skipped ({no_name_or_description} and {description_short} pages), and so
  are documents that are mostly untranslated English or code (Han characters
  under {min_han:.0%} of Han characters + 2 × Latin words, or runs of six or
  more Latin words over {max_english:.0%} of the text;
  {description_not_chinese} pages) and duplicate documents
  ({duplicate_description});
* a summary gives no query when it has fewer than {min_query_han} Han
  characters or is mostly English, is longer than {max_query} characters,
  contains the page's name, occurs verbatim in the document (punctuation and
  spaces ignored) or is shared by several pages; those documents stay in the
  corpus as distractors ({distractor_reason_text});
* the labelled pairs are capped at {max_labelled} (a fixed-seed sample;
  {capped_pairs} pairs over the cap also stay as distractors);
* document ids `d0001`... follow the sorted titles, query ids `q0001`...
  follow the titles of their documents; queries are split with a fixed seed
  into about 60 % train, 15 % dev and 25 % test.

Many pages mention command names, options and paths in Latin letters inside
the Chinese text, as real Chinese technical writing does.

## Licence

The Debian copyright file of `manpages-zh`
(`/usr/share/doc/manpages-zh/copyright`) says, for all pages used here:

    Copyright: 2005, Carlos Z.F. Liu <carlosliu@users.sourceforge.net>
               2008, LI Daobing <lidaobing@gmail.com>
               2008, Ji ZhengYu <zhengyuji@gmail.com>
               2000-2004, CMPP Project <http://cmpp.linuxforum.net>
               2016-2020, Boyuan Yang <073plan@gmail.com>
    License: GFDL-1.2+
     Permission is granted to copy, distribute and/or modify this document
     under the terms of the GNU Free Documentation License, Version 1.2
     or any later version published by the Free Software Foundation;
     with no Invariant Sections, no Front-Cover Texts, and no Back-Cover Texts.

This dataset is a modified version of those pages (sections extracted,
rendered to plain text, shortened, paired and split as described above; the
modifications were made by the embtune project), made from `manpages-zh`
{version}, and is distributed under the same licence:

    Permission is granted to copy, distribute and/or modify this dataset
    under the terms of the GNU Free Documentation License, Version 1.2 or any
    later version published by the Free Software Foundation; with no
    Invariant Sections, no Front-Cover Texts, and no Back-Cover Texts.  A
    copy of the license is included in the file LICENSE.

What this means: the folder may be redistributed, modified or not, provided
it stays under the GFDL, keeps this notice, `LICENSE` and `NOTICES.md`, and
modified versions say what was changed.  The GFDL is copyleft; it covers
this folder, not the code of the repository (Apache-2.0), which only reads
the files.

The Chinese pages are translations of English pages whose own notices are
kept, verbatim, in `NOTICES.md` (one entry per document): BSD-style and
Tcl/Tk (`license.terms`) licences, the Linux man-pages "verbatim copying"
licence, the GPL (e.g. the GNU coreutils pages: "License GPLv3+"), the LDP
licence and others.  All of them allow redistribution of modified versions
when the notices travel with the text, which `NOTICES.md` does; the GPL and
the Linux man-pages licence also ask that derived text stay under their
terms.  Debian's copyright file records the whole package, apart from the
three excluded pages, as GFDL-1.2+; the per-page notices are given here so
that whoever reuses a single document can honour the original one too.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="folder where manpages-zh_*_all.deb was extracted with dpkg -x (holds usr/)")
    parser.add_argument(
        "--out-dir",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="folder that receives manpages_zh/",
    )
    args = parser.parse_args(argv)
    root = os.path.abspath(args.source)
    out_dir = os.path.abspath(args.out_dir)
    corpus, queries, qrels, stats, corpus_notices = build(root)
    licence = gfdl_text(os.path.join(out_dir, "manpages_zh"))
    version = package_version(root)
    os.makedirs(out_dir, exist_ok=True)

    tmp = tempfile.mkdtemp(prefix=".manpages_zh.tmp-", dir=out_dir)
    try:
        write_jsonl(os.path.join(tmp, "corpus.jsonl"), corpus)
        write_jsonl(os.path.join(tmp, "queries.jsonl"), queries)
        os.makedirs(os.path.join(tmp, "qrels"))
        for name, pairs in qrels.items():
            with open(os.path.join(tmp, "qrels", f"{name}.tsv"), "w", encoding="utf-8", newline="\n") as fh:
                fh.write("query-id\tcorpus-id\tscore\n")
                for qid, did in pairs:
                    fh.write(f"{qid}\t{did}\t1\n")
        reasons = ", ".join(f"{why}: {n}" for why, n in stats["distractor_reasons"].items())
        write_text(
            os.path.join(tmp, "README.md"),
            README.format(
                version=version,
                deb_hash=f"\n# sha256 {KNOWN_DEBS[version]}" if version in KNOWN_DEBS else "",
                max_chars=MAX_DOC_CHARS,
                min_chars=MIN_DOC_CHARS,
                min_han=MIN_DOC_HAN_SHARE,
                max_english=MAX_DOC_ENGLISH_SHARE,
                short_chars=SHORT_DOC_CHARS,
                min_query_han=MIN_QUERY_HAN,
                max_query=MAX_QUERY_CHARS,
                max_labelled=MAX_LABELLED,
                distractor_reason_text=reasons or "none",
                **stats,
            ),
        )
        write_text(os.path.join(tmp, "LICENSE"), licence)
        write_text(os.path.join(tmp, "NOTICES.md"), render_notices(corpus_notices, version))
        os.chmod(tmp, 0o755)
        replace_dir(tmp, os.path.join(out_dir, "manpages_zh"))
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)

    print(json.dumps(stats, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
