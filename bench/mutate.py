"""Mutation testing of one library module with its own fast unit tests (`make mutate MODULE=merge`): mutmut
changes the module one operator, constant or call at a time and runs the tests that reach the changed function;
a mutant no test notices ("survived") is a claim the tests do not hold the code to.

Each module runs in a scratch folder of its own, build/mutate/<module>/ (mutmut writes its mutants/ and reads its
settings from the pyproject.toml there), with lib/ (as src/), tests/ and data_samples/ linked in. The score and the
surviving mutants land in docs/benchmarks/mutation.json and the "Mutation testing" section of docs/BENCHMARKS.md;
`mutmut show <name>` in the scratch folder prints a survivor's diff.

    python bench/mutate.py merge [search ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from common import markdown_table, save_results, saved

ROOT = Path(__file__).resolve().parents[1]
# Each module's fast tests (no notebook runs, no llama.cpp): pytest selections, run from the scratch folder.
TESTS = {
    "evaluate": ["tests/test_evaluate.py", "-k", "not notebook and not sentence_transformers_evaluator"],
    "merge": ["tests/test_merge.py"],
    "mine": ["tests/test_mine.py", "-k", "not no_labelled_positive_of_a_query"],  # its fixture encodes pydocs
    "rundir": ["tests/test_manifests.py"],
    "search": ["tests/test_search.py"],
    "serving": ["tests/test_parity_units.py"],  # in process; the checks end to end start processes
    "memory": ["tests/test_memory.py"],
}


# Survivors read one by one (`mutmut show`) and judged; a module not listed has not been read yet.
JUDGED = {
    "search": "the survivors read on 2026-12-05 are equivalent (`strict=` on zips of equal lengths, float32 "
              "casts of float32 input, progress bars, warning filters, ranx run names, ranx's own defaults restated: "
              "rrf's norm, wsum's method and min-max norm) but one, dense_search's default depth of 100, which "
              "callers always pass; dense_run and index_memory are reached by test_evaluate and test_mine, not by "
              "test_search (the 39 not reached)",
    "merge": "the survivors read on 2026-12-06 are equivalent on this CPU-only machine or cosmetic: the GPU branch of "
             "_device and the device argument of tensor reads (the GPU check's train rows merge on a GPU), '<q' for "
             "'<Q' (headers under 2**63 bytes), JSON separators (whitespace is valid in a safetensors header), a "
             "metadata default of None either way, the empty-buffer branch's dtype (viewed and reshaped the same), "
             "the config.json skip when copying an adapter folder (the base's is copied over it next), the message "
             "of a folder without safetensors, slerp's bounds at equality (t = 0.5 for integer tensors, eps, the "
             "angle's 1e-4 margins) and its t in (0, 1) shortcut (the formula gives the same tensors), and how many "
             "names two error messages list",
    "rundir": "the survivors read on 2026-12-06 are equivalent: the manifest's encoding='utf-8' on a UTF-8 locale (a "
              "CJK manifest under a non-UTF-8 locale would need it: untested here), flush of a progress line, "
              "resolve() of a path that does not exist, rglob on what is not a folder, the hashing block size, '' "
              "for None as 'no checkpoint', and other splits of checkpoint-N (the names have one dash)",
    "evaluate": "not reached (649): what only the notebook tests run (dense_system, dense_runs, side_by_side, "
                "two_stage, general_skill, metrics_record, add_systems, write_model_card, plot_systems, headline), "
                "which make mutate leaves out. The survivors read on 2026-12-06: choose_on_dev's wording and its "
                "p-values at equality, ranx's make_comparable (our _ranx already hands it every query), dev_split's "
                "seed and dev fraction (the unit test's data has its own dev split), a fusion grid spelled "
                "otherwise with the same values, rounding digits, the report's wording of its judged-documents "
                "header and its export section (the rows and the warning are asserted; the export table is tested "
                "in test_export.py), and judged_coverage's defaults for a query a run or the judgements lack (every "
                "caller passes both)",
    "memory": "every survivor read on 2026-12-06, after the tests of the refusal's offers, the cgroup and GPU "
              "readings, each phase and term by hand and each option of the config: those left are comparisons at "
              "exact equality (a budget equal to a need; 0.05 and 0.95 GB in the printed line), lookup defaults "
              "where every input has the key (modules.json's type and path, a config's model_type, head_dim and "
              "attention dropout, torch's get_per_process_memory_fraction), encoding='utf-8' under a UTF-8 locale, "
              "tokenizer arguments that restate its defaults or only change warnings, the sample size and seed "
              "defaults, the batch and lengths of the one-layer Setting merge_bytes builds (not read), which of two "
              "sets with equal sums counts, the start of the length search (a power of two above the answer is "
              "halved down to it), the smallest need kept for the refusal (the last candidate is the smallest), "
              "n_params counted again to the same number and the device derived again by the same rule, "
              "'not ckpt or ...' when checkpointing is already on (the plan tried it and failed), `candidates =` for "
              "`+=` on a list still empty, and the refusal's smallest mini-batch (its cached-loss offer and its "
              "default) taken as 2 instead of 1 (a budget between the two is untested)",
    "mine": "the survivors read on 2026-12-06: stats the notebook prints but no choice reads ('config', "
            "'made_from'), flush and tqdm arguments, the UTF-8 spelling, positive_score's rounding, zip's strict, "
            "the reranker filter's batch size, and the pydocs test's ground (several labelled positives, candidates "
            "'both' on real data) that make mutate leaves out for its fixture's minute",
    "serving": "its fast tests are the in-process ones (tests/test_parity_units.py): check, check_reranker and the "
               "HTTP and GGUF routes start a reference process and servers, which test_export.py tests end to end "
               "and make mutate leaves out (the 702 not reached). The survivors read on 2026-12-06: _variant's "
               "details the tiny Qwen3 does not exercise (BERT's token types, the mask under right padding; each "
               "named mistake is diagnosed end to end in test_export.py), the fixed texts' exact words and cut "
               "(the check needs them fixed, not these), format letters (.5F is .5f for finite numbers), argsort's "
               "kind, zip's strict, rounding digits, _unit's floor, and `np.sort(r)[+k]` for `[-k]`, equal at the "
               "test's 2k candidates: a real difference at other sizes that the near-tie rule's tolerance hides here",
}  # fmt: skip


def scratch(module: str) -> Path:
    """build/mutate/<module>/: links to lib/ (as src/), tests/, data_samples/, bench/ and a pyproject.toml with
    mutmut's settings."""
    folder = ROOT / "build" / "mutate" / module
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    # mutmut imports mutated code from src/ (or ./, source/) only, and drops that folder's original from sys.path
    (folder / "src").symlink_to(ROOT / "lib")
    for name in ("tests", "data_samples", "bench"):
        (folder / name).symlink_to(ROOT / name)
    selection = ", ".join(json.dumps(a) for a in TESTS[module])
    (folder / "pyproject.toml").write_text(f"""[tool.mutmut]
source_paths = ["src"]
only_mutate = ["src/embtune/{module}.py"]
also_copy = ["data_samples"]
pytest_add_cli_args_test_selection = [{selection}]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]

[tool.pytest.ini_options]
testpaths = ["tests"]
""")
    return folder


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(module: str) -> dict:
    subprocess.run([sys.executable, "-m", "mutmut", "run"], cwd=scratch(module), env=ENV, check=True)
    return collect(module)


def collect(module: str) -> dict:
    """The counts and the survivors of the last run in build/mutate/<module>/."""
    folder = ROOT / "build" / "mutate" / module
    mutmut = [sys.executable, "-m", "mutmut"]
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=folder, env=ENV, check=True)
    stats = json.loads((folder / "mutants" / "mutmut-cicd-stats.json").read_text())
    survivors = subprocess.run([*mutmut, "results"], cwd=folder, env=ENV, capture_output=True, text=True,
                               check=True).stdout.split("\n")  # fmt: skip
    stats["survivors"] = [line.strip() for line in survivors if line.strip().endswith(": survived")]
    # mutmut's names: embtune.<module>.x_<function>__mutmut_<n>, methods xǁ<Class>ǁ<method>__mutmut_<n>
    names = (re.search(r"\.x[_ǁ](.+)__mutmut_\d+: survived$", n)[1].replace("ǁ", ".") for n in stats["survivors"])
    by_function = Counter(names)
    stats["survivors_by_function"] = dict(by_function.most_common())
    scored = stats["killed"] + stats["survived"]
    stats["score"] = round(stats["killed"] / scored, 3) if scored else None
    stats["date"] = datetime.date.today().isoformat()
    return stats


def section(results: dict) -> str:
    rows = [{"module": m, "mutants": r["total"], "killed": r["killed"], "survived": r["survived"],
             "not reached": r["no_tests"], "timed out": r["timeout"], "score": r["score"], "date": r["date"],
             "survivors by function": ", ".join(f"{f} {n}" for f, n in r["survivors_by_function"].items())}
            for m, r in sorted(results.items())]  # fmt: skip
    return ("## Mutation testing\n\n`make mutate MODULE=...` (`bench/mutate.py`): mutmut on one module with its fast "
            "unit tests; score = killed / (killed + survived), mutants no selected test reaches counted apart. "
            "In `build/mutate/<module>/`, `mutmut show <name>` prints a survivor.\n\n"
            + markdown_table(rows, list(rows[0]))
            + "".join(f"\n\n{m}: {JUDGED[m]}." for m in sorted(results) if m in JUDGED))  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+", choices=sorted(TESTS))
    parser.add_argument("--collect", action="store_true", help="report the last run's results, without running")
    args = parser.parse_args()
    results = (saved("mutation") or {}).get("modules", {})
    for module in args.modules:
        r = results[module] = collect(module) if args.collect else run(module)
        print(f"{module}: {r['killed']} of {r['killed'] + r['survived']} mutants killed ({r['score']}), "
              f"{r['no_tests']} not reached by the tests, {r['timeout']} timed out")  # fmt: skip
        save_results("mutation", {"modules": results}, section(results))


if __name__ == "__main__":
    main()
