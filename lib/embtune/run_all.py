"""Run every notebook in number order, headless, through papermill (what `make run-all` calls).

Inputs are checked first (data layout, model folders or hub), so a bad input costs seconds and one line,
and leaves nothing behind. Executed notebooks are saved under `RUN/notebooks/`.

    python -m embtune.run_all --data DIR --model NAME_OR_DIR --run DIR [--generator G] [--reranker R] \
        [--judgements GRADES.tsv] [--until NN] [--param NAME=VALUE ...]

Notebook 00 (judging) runs only with grades to take in (`--judgements`, notebook 00's `grades_file`) or an LLM
judge (`--param judge=llm`); a person judges in Jupyter, and the later notebooks read the judgements it wrote.

`--param` sets any notebook parameter (a Python literal, else a string) in every notebook that declares it,
e.g. `--param epochs=1 --param min_cosine=None`; `make run-all PARAMS="epochs=1 min_cosine=None"` does the same.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path

from .files import bundled

NOTEBOOKS = bundled("notebooks", "notebooks")


def parse_param(text: str) -> tuple[str, object]:
    """`NAME=VALUE` with VALUE a Python literal (1, 0.5, None, [64, 128], "x"), else taken as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name.strip(), value


def notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    """The numbered notebooks (`NN_name.ipynb`), in order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def preflight(args: argparse.Namespace) -> tuple[dict, dict[str, bool]]:
    """Check everything that can be known before the first notebook starts, and return the notebook parameters
    (paths absolute: the notebooks run in their own folder) and the conditions notebooks may be skipped on."""
    from .data import DataError, load_beir, training_labels
    from .generators import UNSUPERVISED
    from .models import resolve
    from .rundir import RunDir, check_outputs, check_writable, data_fingerprint

    data = load_beir(args.data, limits=args.limits)
    run = Path(args.run).resolve()
    params = {"data_dir": str(Path(args.data).resolve()), "run_dir": str(run),
              "base_model": resolve(args.model, "MODEL")}  # fmt: skip
    if args.reranker:
        params["reranker_model"] = resolve(args.reranker, "RERANKER")
    if args.judgements:
        if not Path(args.judgements).is_file():
            raise DataError(args.judgements, None, "no such file", "JUDGEMENTS is a grades TSV: query-id<TAB>corpus-id"
                            "<TAB>grade, or a grades.tsv of notebook 00")  # fmt: skip
        params["grades_file"] = str(Path(args.judgements).resolve())
    if args.generator:
        local = args.generator not in UNSUPERVISED and not args.generator.startswith("openai:")
        params["generator_model"] = resolve(args.generator, "GENERATOR") if local else args.generator
    params.update(dict(args.param))
    inputs = {k: params.get(k) for k in ("data_dir", "base_model", "reranker_model", "generator_model")}
    check_outputs(run, **{k: v for k, v in inputs.items() if v and Path(str(v)).exists()})
    check_writable(run)
    labels = training_labels(data, run, params.get("split_overlap", "error"))  # also refuses labels in two splits
    synthetic = RunDir(run).current("synthetic", data=data_fingerprint(args.data))
    if not labels.labelled and not args.generator and not synthetic:
        raise DataError(Path(args.data) / "qrels" / "train.tsv", None, "no training labels",
                        "add them, or let notebook 01 write synthetic queries: GENERATOR=ict needs no LLM "
                        "(or GENERATOR=openai:<model> with OPENAI_BASE_URL, or a local causal LM folder)")  # fmt: skip
    judging = bool(params.get("grades_file")) or params.get("judge") == "llm"
    judged = any((RunDir(run).judged / "qrels" / f"{s}.tsv").exists() for s in ("test", "dev"))
    conditions = {"generator_model": bool(params.get("generator_model")),
                  "reranker_model": bool(params.get("reranker_model")), "judgements": judging,
                  "labelled_split": any(s in data.qrels for s in ("test", "dev")) or judging or judged}  # fmt: skip
    return params, conditions


def check_parameters(path: Path, params: dict) -> None:
    """Build the notebook's step config (its metadata `embtune.config`) from its parameters cell's defaults and this
    run's values, which checks every value (embtune.config.check_options): OptionError before any notebook runs."""
    import importlib

    import nbformat
    import papermill as pm

    config = nbformat.read(path, as_version=4).metadata.get("embtune", {}).get("config")
    if not config:  # a notebook of your own, beside the series: its parameters are its business
        return
    module, name = config.split(":")
    declared = pm.inspect_notebook(str(path))
    values = {**{k: ast.literal_eval(v["default"]) for k, v in declared.items()}, **params}
    getattr(importlib.import_module(module), name).from_params(values)


def skip_reason(path: Path, conditions: dict[str, bool]) -> str | None:
    """Why a notebook has nothing to do in this run (its metadata `embtune.skip_unless` names the condition it
    needs, e.g. notebook 01 `generator_model`), or None to run it."""
    import nbformat

    gate = nbformat.read(path, as_version=4).metadata.get("embtune", {}).get("skip_unless")
    return {"generator_model": "no GENERATOR", "reranker_model": "no RERANKER",
            "judgements": "no JUDGEMENTS file and no LLM judge: a person judges in Jupyter",
            "labelled_split": "no test or dev labels in DATA or judged in notebook 00 to evaluate on"}[gate] \
        if gate and not conditions[gate] else None  # fmt: skip


class RunInUse(RuntimeError):
    """Another run holds the run directory."""


class RunLock:
    """One run per folder: `RUN/.lock` holds the pid and start time of the run using it, for the run's life. The
    lock of a process that is gone (killed) is taken over, with a line saying so."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        import json
        import tempfile

        record = json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=".lock.", delete=False) as f:
            f.write(record)
        try:
            while True:
                try:
                    os.link(f.name, self.path)  # the lock appears whole, holder and all, or not at all
                    return self
                except FileExistsError:
                    try:
                        holder = json.loads(self.path.read_text())
                    except (FileNotFoundError, ValueError):
                        continue
                    if _alive(holder["pid"]):
                        raise RunInUse(f"{self.path.parent} is in use by another run (pid {holder['pid']}, started "
                                       f"{holder['started']}); wait for it to end, or pass another RUN") from None
                    print(f"{self.path}: taking over the lock of a run that is gone (pid {holder['pid']}, started "
                          f"{holder['started']})", flush=True)  # fmt: skip
                    self.path.unlink(missing_ok=True)
        finally:
            os.unlink(f.name)

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Previous:
    """The last finished run's outputs that this run rebuilds, moved aside to `RUN/.previous/` as each notebook
    starts: put back when this run does not finish, dropped when it does, so a finished run is only ever replaced
    by a finished run. A run killed before either (kill -9 of `make run-all` itself) is put back when the next one
    starts. Resumable state (journals, checkpoints) is never moved: a rerun resumes."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.root = run_dir, run_dir / ".previous"
        self.index = self.root / "moved.json"

    def moved(self) -> list[str]:
        import json

        return json.loads(self.index.read_text()) if self.index.exists() else []

    def set_aside(self, relative: str) -> None:
        from .files import write_json

        source, moved = self.run_dir / relative, self.moved()
        if not source.exists() or relative in moved:
            return
        write_json(self.index, [*moved, relative])  # first: a kill between the two leaves nothing unlisted
        (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, self.root / relative)

    def restore(self) -> bool:
        """Put everything moved aside back in place (over what this run wrote there); whether there was any."""
        import shutil

        moved = self.moved()
        for relative in reversed(moved):
            kept, target = self.root / relative, self.run_dir / relative
            if kept.exists():
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
                os.replace(kept, target)
        shutil.rmtree(self.root, ignore_errors=True)
        return bool(moved)

    def drop(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


def set_aside_outputs(path: Path, previous: Previous) -> None:
    """Before a notebook runs, move aside what it writes (its metadata `embtune.outputs` and `manifests`, and its
    executed copy), so that a failure never leaves an earlier run's results looking current, and so that they can
    be put back."""
    import nbformat

    meta = nbformat.read(path, as_version=4).metadata.get("embtune", {})
    for name in [*meta.get("outputs", []), *(f"manifests/{a}.json" for a in meta.get("manifests", [])),
                 f"notebooks/{path.name}"]:  # fmt: skip
        previous.set_aside(name)


def _ipc_kernel_manager(log: Path):
    """A kernel reached over local sockets in the temporary folder instead of TCP: nothing listens on a port, and
    ipykernel has no "running over TCP without encryption" warning to print before every notebook. The kernel
    process's own messages (not the cells' output, which the notebook keeps) go to `log`, so that a failure is the
    one line `make run-all` prints."""
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class IpcKernelManager(AsyncKernelManager):
        transport = "ipc"
        ip = os.path.join(tempfile.gettempdir(), f"embtune-kernel-{os.getpid()}")

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            with open(log, "a", encoding="utf-8") as stderr:  # the kernel holds its own copy of the descriptor
                await super()._async_launch_kernel(kernel_cmd, **{**kw, "stderr": stderr})

    return IpcKernelManager


def run_notebook(path: Path, out_dir: Path, params: dict) -> Path:
    """Execute one notebook with the parameters it declares; `.failed.ipynb` keeps a failed run's traceback."""
    import logging

    import papermill as pm

    logging.getLogger("papermill").setLevel(logging.CRITICAL)  # its "kernel died" and such: `run` says it in one line

    declared = pm.inspect_notebook(str(path))
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{path.stem}.partial.ipynb"
    try:
        pm.execute_notebook(
            str(path),
            str(partial),
            parameters={k: v for k, v in params.items() if k in declared},
            cwd=str(path.parent),
            progress_bar=False,
            kernel_name="python3",
            kernel_manager_class=_ipc_kernel_manager(out_dir / "kernels.log"),
        )
    except BaseException:
        if partial.exists():
            os.replace(partial, out_dir / f"{path.stem}.failed.ipynb")
        raise
    os.replace(partial, out_dir / path.name)
    return out_dir / path.name


def main(argv: list[str] | None = None) -> int:
    import signal

    # Ctrl-C interrupts, even when started from a shell that made its background jobs ignore it (CI, `cmd &`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="BEIR folder (DATA)")
    parser.add_argument("--model", required=True, help="base embedder: hub name or local folder (MODEL)")
    parser.add_argument("--run", required=True, help="run directory the notebooks share (RUN)")
    parser.add_argument("--generator", default="", help="query generator for notebook 01 (GENERATOR)")
    parser.add_argument("--reranker", default="", help="reranker for notebook 06 (RERANKER)")
    parser.add_argument("--judgements", default="", help="grades TSV for notebook 00 (JUDGEMENTS)")
    parser.add_argument(
        "--limits",
        default="warn",
        choices=["error", "warn", "off"],
        help="Vertex AI dataset limits: fail, warn or ignore",
    )
    parser.add_argument(
        "--param", action="append", default=[], type=parse_param, metavar="NAME=VALUE", help="a notebook parameter"
    )
    parser.add_argument("--until", default="", help="number of the last notebook to run, e.g. 05 (UNTIL)")
    parser.add_argument("--notebooks", default=str(NOTEBOOKS), help="folder of numbered notebooks")
    args = parser.parse_args(argv)

    from .data import DataError
    from .models import ModelNotFound
    from .rundir import OverlappingPaths

    try:
        params, conditions = preflight(args)
    except (DataError, ModelNotFound, OverlappingPaths, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = notebooks(Path(args.notebooks))
    if not paths:
        print(f"error: no numbered notebooks (NN_name.ipynb) in {args.notebooks}", file=sys.stderr)
        return 2
    numbers = [p.name[:2] for p in paths]
    if args.until and args.until.zfill(2) not in numbers:
        print(f"error: --until {args.until}: no notebook has that number ({', '.join(numbers)})", file=sys.stderr)
        return 2
    import papermill as pm

    declared = set().union(*(pm.inspect_notebook(str(p)) for p in paths))
    unknown = sorted({name for name, _ in args.param} - declared)
    if unknown:
        print(f"error: no notebook has the parameter(s) {', '.join(unknown)}; check the spelling", file=sys.stderr)
        return 2
    from .config import OptionError

    for path in paths:
        try:
            check_parameters(path, params)
        except OptionError as e:
            print(f"error: {e} (a parameter of {path.name}); nothing was run", file=sys.stderr)
            return 2
    run_dir = Path(params["run_dir"])
    try:
        with RunLock(run_dir):
            return run(paths, params, conditions, args.until, run_dir)
    except RunInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(paths: list[Path], params: dict, conditions: dict, until: str, run_dir: Path) -> int:
    """The notebooks in order, under the run's lock; every way of failing ends in one line and the last finished
    run's outputs back in place."""
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    out_dir, previous = run_dir / "notebooks", Previous(run_dir)
    if previous.restore():
        print(f"{run_dir}: the last run was killed before it finished; its predecessor's outputs are back in place",
              flush=True)  # fmt: skip
    current = None
    try:
        for path in paths:
            reason = f"after UNTIL={until}" if until and path.name[:2] > until.zfill(2) else None
            reason = reason or skip_reason(path, conditions)
            if reason:
                previous.set_aside(f"notebooks/{path.name}")  # an earlier run's copy would claim it ran
                print(f"== {path.name}: skipped ({reason})", flush=True)
                continue
            print(f"== {path.name}", flush=True)
            current = path
            set_aside_outputs(path, previous)
            start = time.perf_counter()
            run_notebook(path, out_dir, params)
            (out_dir / f"{path.stem}.failed.ipynb").unlink(missing_ok=True)  # an earlier failure, now behind us
            print(f"   {path.name}: {time.perf_counter() - start:.0f} s", flush=True)
    except BaseException as e:  # noqa: BLE001 (every way out is one line, and the finished run put back)
        name = current.name if current else "the run"
        failed = out_dir / f"{current.stem}.failed.ipynb" if current else None
        interrupted = isinstance(e, KeyboardInterrupt) or getattr(e, "ename", "") == "KeyboardInterrupt"
        if interrupted:
            line = f"interrupted in {name}: rerun the same command to resume"
        elif isinstance(e, DeadKernelError):
            plan = run_dir / "memory_plan.txt"
            estimate = f"; the memory plan's last estimate: {plan.read_text().strip()}" if plan.exists() else ""
            line = (f"error: {name}: its kernel died (killed from outside; most often the out-of-memory killer: "
                    f"lower batch_size or max_seq_length{estimate})")  # fmt: skip
        elif isinstance(e, PapermillExecutionError):
            line = (f"error: {name} failed: {e.ename}: {e.evalue.splitlines()[0] if e.evalue else ''} (the notebook "
                    f"with its traceback: {failed})")  # fmt: skip
        elif isinstance(e, OSError):
            line = f"error: {name}: {e.strerror or e}: {e.filename or ''}".rstrip(": ")
        else:
            line = f"error: {name}: {type(e).__name__}: {e}"
        if previous.restore():
            line += "; the last finished run's outputs are back in place"
        print(line, file=sys.stderr, flush=True)
        return 130 if interrupted else 2
    previous.drop()
    print(summary(run_dir))
    return 0


def summary(run_dir: Path) -> str:
    """What `make run-all` ends with: the headline table of notebook 05 (with 06's rerankers), and where to read
    more."""
    import json

    from .evaluate import headline
    from .rundir import RunDir

    run = RunDir(run_dir)
    lines = [f"done: {run.root}"]
    if run.metrics.exists():
        result = json.loads(run.metrics.read_text(encoding="utf-8"))
        lines += ["", f"{result['split']} split, {result['n_queries']:,} queries († significant against base):",
                  headline(result), "", f"report: {run.report}"]  # fmt: skip
    lines.append(f"executed notebooks: {run.notebooks}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before any notebook started: nothing to put back
        print("interrupted: nothing was run", file=sys.stderr)
        sys.exit(130)
