#!/usr/bin/env python3
"""Build the ``sts_general`` sample (semantic textual similarity, general skill).

What it builds
--------------
``data_samples/sts_general/`` -- sentence pairs with gold similarity scores,
for checking that a fine-tuned embedder kept the base model's general
ability (Spearman correlation of the cosine similarity with the gold score)::

    en.tsv        sentence1 <TAB> sentence2 <TAB> score      (header line)
    README.md
    .gitignore    (keeps a locally built zh.tsv out of git)

``en.tsv`` holds 300 English pairs drawn, with a fixed seed and stratified
over the score range, from the test split of STS Benchmark, restricted to
the two sources whose text licence allows redistribution: the ``images``
captions (Creative Commons Attribution-ShareAlike) and ``track5.en-en``
(SNLI sentences, CC BY-SA 4.0).  The scores are CC BY-SA 4.0.

Chinese (``zh.tsv``) is *not* bundled: the only Chinese STS data at hand,
Chinese STS-B (CNSD, distributed through GitHub ``zejunwang1/CSTS``), comes
without a licence and with the statement "本数据集只能用于学术研究，请勿用作商业"
(academic research only, no commercial use), and it translates all STS-B
sources, including those that may not be redistributed.  ``--with-zh``
builds the same kind of 300-pair sample from a local copy for local use; the
folder's ``.gitignore`` keeps it out of commits.

Source
------
The offline copies under ``../shared/data`` (next to the repository)::

    stsbenchmark/sts-test.csv        genre, file, years, id, score, sentence1, sentence2 [, source columns]
    stsbenchmark/LICENSE.txt, readme.txt
    chinese-stsb/sts-b-test.txt      sentence1, sentence2, score   (only with --with-zh)

The script refuses to run when they are missing.

Determinism
-----------
Standard library only; fixed seed; the output folder is written under a
temporary name and renamed into place when complete, so two runs on the
same files give byte-identical output.

Usage::

    python3 data_samples/build_sts_general.py [SOURCE_DIR] [--out-dir DIR] [--with-zh]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile

SEED = 20240613
N_PAIRS = 300
# Score bins for the stratified draw: [0,1), [1,2), [2,3), [3,4), [4,5].
BINS = 5
# STS Benchmark test sources whose text may be redistributed (LICENSE.txt):
# images: "The image captions of the data set are released under a
# CreativeCommons Attribution-ShareAlike license"; track5.en-en: SNLI,
# "licensed under a Creative Commons Attribution-ShareAlike 4.0 International
# License".  MSRvid and MSRpar need an agreement with Microsoft Research,
# headlines are news text under the EMM disclaimer, answer-answer needs
# per-post author attribution the files do not carry.
EN_FILES = ("images", "track5.en-en")
EN_TEST = os.path.join("stsbenchmark", "sts-test.csv")
EN_TEST_MD5 = "f8c608a4dcfeff4ea11912ea72aacd6e"
ZH_TEST = os.path.join("chinese-stsb", "sts-b-test.txt")
HEADER = "sentence1\tsentence2\tscore\n"
GITIGNORE = "# Chinese STS-B is academic-use only: build it locally, never commit it.\nzh.tsv\n"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def md5(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.md5(fh.read()).hexdigest()


def clean(text: str) -> str:
    return " ".join(text.split())


def read_en(path: str):
    """Rows (file, years, id, score string, sentence1, sentence2) of the
    allowed sources, in file order."""
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for n, rec in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(rec) < 7:
                fail(f"{path}:{n}: expected at least 7 tab-separated columns, got {len(rec)}")
            genre, file, years, rid, score, s1, s2 = rec[:7]
            if file not in EN_FILES:
                continue
            value = float(score)
            if not 0.0 <= value <= 5.0:
                fail(f"{path}:{n}: score {score} outside [0, 5]")
            # The file writes scores as "4.4", "4.40" or "4.400000" depending
            # on the source year: normalise to three decimals (no precision lost).
            rows.append((file, years, rid, f"{value:.3f}", clean(s1), clean(s2)))
    return rows


def read_zh(path: str):
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            rec = line.rstrip("\n").split("\t")
            if len(rec) != 3:
                fail(f"{path}:{n}: expected 3 tab-separated columns, got {len(rec)}")
            s1, s2, score = rec
            if not 0.0 <= float(score) <= 5.0:
                fail(f"{path}:{n}: score {score} outside [0, 5]")
            rows.append((score, clean(s1), clean(s2)))
    return rows


def score_bin(score: str, n_bins: int) -> int:
    return min(int(float(score) * n_bins / 5.0), n_bins - 1)


def allocate(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` as evenly as possible over bins of the given sizes
    (a bin never gets more than it holds)."""
    take = [0] * len(sizes)
    left = total
    open_bins = [i for i, s in enumerate(sizes) if s > 0]
    while left > 0 and open_bins:
        share, extra = divmod(left, len(open_bins))
        for rank, i in enumerate(open_bins):
            want = share + (1 if rank < extra else 0)
            got = min(want, sizes[i] - take[i])
            take[i] += got
            left -= got
        open_bins = [i for i in open_bins if take[i] < sizes[i]]
    if left:
        fail(f"only {total - left} pairs available, {total} wanted")
    return take


def stratified_sample(rows, score_of, n_bins: int, total: int, seed: int):
    """A fixed-seed sample of ``total`` rows, spread evenly over score bins,
    returned in source order; also the per-bin counts."""
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i, row in enumerate(rows):
        bins[score_bin(score_of(row), n_bins)].append(i)
    take = allocate([len(b) for b in bins], total)
    rng = random.Random(seed)
    chosen = []
    for members, k in zip(bins, take, strict=True):
        chosen += rng.sample(members, k)
    return [rows[i] for i in sorted(chosen)], take


def write_tsv(path: str, pairs) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(HEADER)
        for s1, s2, score in pairs:
            for text in (s1, s2):
                if "\t" in text or "\n" in text:
                    fail(f"sentence contains a tab or newline: {text!r}")
            fh.write(f"{s1}\t{s2}\t{score}\n")


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
# sts_general: general-skill STS sample

Sentence pairs with gold semantic-similarity scores, to check that a
fine-tuned embedder kept the base model's general ability: embed both
sentences, take the cosine similarity, and report the Spearman correlation
with the gold score (×100).  A drop against the base model means the model
lost general skill.

| file | content |
|---|---|
| `en.tsv` | {n_en} English pairs, scores 0–5 (three decimals) |
| `zh.tsv` | not bundled, see below (`--with-zh` builds it locally; `.gitignore` keeps it out of git) |

## Format

UTF-8, tab-separated, one header line `sentence1<TAB>sentence2<TAB>score`,
then one pair per line; `score` is a number from 0 (unrelated) to 5
(equivalent).  No quoting: sentences contain no tab or newline, and quote
characters are literal, so read it with `csv.reader(f, delimiter="\\t",
quoting=csv.QUOTE_NONE)` or by splitting each line on tabs.

## en.tsv

{n_en} pairs from the test split of STS Benchmark (SemEval-2017;
`sts-test.csv`, {en_pool} pairs in the two sources used), only from the two
sources whose text licence allows redistribution:

| source (STS-B `file`) | genre | years | pairs |
|---|---|---|---|
{en_sources}

Drawn with a fixed seed, stratified over the score range as evenly as the
bins allow:

| score | {en_bin_labels} |
|---|{en_bin_rules}
| pairs | {en_bin_counts} |

Sentences are whitespace-normalised and otherwise unchanged; scores are the
original ones, written with three decimals; rows keep the order of
`sts-test.csv`.

Left out, and why (from STS Benchmark's `LICENSE.txt`): `MSRvid` and
`MSRpar` ("researchers need to agree with the license terms from Microsoft
Research"), `headlines` (news text "subject to a disclaimer" of the European
Media Monitor), `answer-answer` (Stack Exchange, CC BY-SA 3.0 with per-post
author names and links that the files do not carry).

## Chinese: not bundled

The Chinese STS data at hand is Chinese STS-B (CNSD, a translation of STS
Benchmark with some manual correction; copied from GitHub
`zejunwang1/CSTS`, originally `pluto-junzeng/CNSD`).  Neither repository has
a licence file, and both READMEs end with a restriction:

    本数据集只能用于学术研究，请勿用作商业          (pluto-junzeng/CNSD)
    本仓库数据集只能用于学术研究，请勿用作商业      (zejunwang1/CSTS)

("this dataset may only be used for academic research, not commercially").
It also translates the STS Benchmark sources listed above as not
redistributable.  So no Chinese file is shipped.  With a local copy of
`../shared/data/chinese-stsb/sts-b-test.txt`,

```bash
python3 data_samples/build_sts_general.py --with-zh
```

also writes `zh.tsv`: {n_en} pairs of its 1,361-pair test split, drawn with a
fixed seed and stratified over the six integer scores, in the same format
(integer scores 0–5), for local evaluation under that restriction; do not
commit it.  A rebuild without `--with-zh` removes it.

## How it was built

```bash
python3 data_samples/build_sts_general.py            # reads ../shared/data
python3 data_samples/build_sts_general.py /path/to/data --out-dir DIR
```

Standard library only, deterministic (seed {seed}).  The script refuses to
run when `stsbenchmark/sts-test.csv` is missing (and, with `--with-zh`,
`chinese-stsb/sts-b-test.txt`); it warns when `sts-test.csv` is not the
file it was written for (md5 `{en_md5}`).

## Licence

`en.tsv` is distributed under the Creative Commons Attribution-ShareAlike
4.0 International licence (https://creativecommons.org/licenses/by-sa/4.0/),
as its parts are:

* the scores: "The scores are released under a "Commons Attribution - Share
  Alike 4.0 International License"" (STS Benchmark `LICENSE.txt`);
* `images` sentences: "The image captions of the data set are released under
  a CreativeCommons Attribution-ShareAlike license" (PASCAL VOC-2008 image
  descriptions, Rashtchian et al., 2010);
* `track5.en-en` sentences: "a subset of the Stanford Natural Language
  Inference (SNLI) corpus, by The Stanford NLP Group is licensed under a
  Creative Commons Attribution-ShareAlike 4.0 International License. Based
  on a work at http://shannon.cs.illinois.edu/DenotationGraph/".

The captions' licence does not state a version; every CC BY-SA version lets
adaptations be shared under a later version with the same elements, hence
4.0 for the whole file.

Attribution: STS Benchmark, http://ixa2.si.ehu.eus/stswiki — Eneko Agirre,
Daniel Cer, Mona Diab, Iñigo Lopez-Gazpio, Lucia Specia. SemEval-2017 Task 1:
Semantic Textual Similarity Multilingual and Crosslingual Focused
Evaluation. Proceedings of SemEval 2017.  Changes: a {n_en}-pair subset of
the test split, reduced to three columns.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        nargs="?",
        default=DEFAULT_SOURCE,
        help="folder holding stsbenchmark/ (and chinese-stsb/); default: ../shared/data next to the repository",
    )
    parser.add_argument(
        "--out-dir",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="folder that receives sts_general/",
    )
    parser.add_argument(
        "--with-zh",
        action="store_true",
        help="also write zh.tsv from chinese-stsb/sts-b-test.txt (academic use only; not for committing)",
    )
    args = parser.parse_args(argv)
    source = os.path.abspath(args.source)
    out_dir = os.path.abspath(args.out_dir)

    if not os.path.isdir(source):
        fail(
            f"STS source folder {source} not found.  This builder needs the offline copy of STS "
            "Benchmark (stsbenchmark/sts-test.csv, normally in ../shared/data next to the repository); "
            "pass its folder as the first argument."
        )
    en_path = os.path.join(source, EN_TEST)
    if not os.path.isfile(en_path):
        fail(f"{en_path} not found (STS Benchmark test split, tab-separated, 7 or 9 columns).")
    if md5(en_path) != EN_TEST_MD5:
        print(
            f"warning: {en_path} differs from the file this sample was built from (md5 {EN_TEST_MD5})", file=sys.stderr
        )
    zh_path = os.path.join(source, ZH_TEST)
    if args.with_zh and not os.path.isfile(zh_path):
        fail(f"--with-zh: {zh_path} not found (Chinese STS-B test split: sentence1, sentence2, score).")

    en_rows = read_en(en_path)
    en_sample, en_take = stratified_sample(en_rows, lambda r: r[3], BINS, N_PAIRS, SEED)
    stats = {
        "en_pairs": len(en_sample),
        "en_pool": len(en_rows),
        "en_per_bin": en_take,
        "en_per_source": {f: sum(r[0] == f for r in en_sample) for f in EN_FILES},
    }
    zh_sample = None
    if args.with_zh:
        zh_rows = read_zh(zh_path)
        zh_sample, zh_take = stratified_sample(zh_rows, lambda r: r[0], 6, N_PAIRS, SEED + 1)
        stats.update({"zh_pairs": len(zh_sample), "zh_pool": len(zh_rows), "zh_per_score": zh_take})

    years = {}
    for f, y, _, _, _, _ in en_rows:
        years.setdefault(f, set()).add(y)
    genre = {"images": "captions", "track5.en-en": "captions"}
    en_sources = "\n".join(
        f"| `{f}` | {genre[f]} | {', '.join(sorted(years.get(f, ())))} | {stats['en_per_source'][f]} |"
        for f in EN_FILES
    )
    labels = ["[0,1)", "[1,2)", "[2,3)", "[3,4)", "[4,5]"]
    en_bin_labels = " | ".join(labels)
    en_bin_rules = "---|" * len(labels)
    en_bin_counts = " | ".join(str(k) for k in en_take)

    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".sts_general.tmp-", dir=out_dir)
    try:
        write_tsv(os.path.join(tmp, "en.tsv"), [(s1, s2, score) for _, _, _, score, s1, s2 in en_sample])
        if zh_sample is not None:
            write_tsv(os.path.join(tmp, "zh.tsv"), [(s1, s2, score) for score, s1, s2 in zh_sample])
        write_text(os.path.join(tmp, ".gitignore"), GITIGNORE)
        write_text(
            os.path.join(tmp, "README.md"),
            README.format(
                n_en=len(en_sample),
                en_pool=len(en_rows),
                en_sources=en_sources,
                en_bin_labels=en_bin_labels,
                en_bin_rules=en_bin_rules,
                en_bin_counts=en_bin_counts,
                seed=SEED,
                en_md5=EN_TEST_MD5,
            ),
        )
        os.chmod(tmp, 0o755)
        replace_dir(tmp, os.path.join(out_dir, "sts_general"))
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)

    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
