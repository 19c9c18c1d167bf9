"""The ``hessweep`` command line: run, resume, validate, analyze, report, download, ui."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserInputError
from orchestrator.redact import redact_text

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are read as YAML (``[16, 64]``, ``0.1``, ``full``),
    a key given twice inside one value refused as in a spec file."""
    from orchestrator.spec import load_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(
                f"--set {item!r}: expected key=value, e.g. --set batch_sizes=[32,512]"
            )
        try:
            out[key.strip()] = load_yaml(value, source=f"--set {key.strip()}")
        except yaml.YAMLError as err:
            raise UserInputError(f"--set {item!r}: value is not valid YAML ({err})") from None
    return out


def load_spec(spec: str, overrides: list[str] | None = None):
    """A validated Experiment from a path or a name in experiments/, with ``--set`` applied."""
    from orchestrator.spec import Experiment, resolve_spec

    exp = Experiment.from_yaml(resolve_spec(spec))
    sets = _parse_set(overrides or [])
    return exp.overridden(sets, via="--set") if sets else exp


def cmd_validate(args: argparse.Namespace) -> int:
    exp = load_spec(args.spec, args.set)
    samples = f", {exp.search.num_samples} search sample(s) each" if exp.search else ""
    samples += "".join(f" x {n} {key} grid values" for key, n in exp.search_grids.items())
    print(
        f"{args.spec}: valid. {exp.num_cells} trial cell(s): batch sizes {exp.batch_sizes} x "
        f"robust {[r.label for r in exp.robust]} x seeds {exp.seeds}{samples}: "
        f"{exp.num_trials} trial(s)"
    )
    _warn_unfair(exp)
    _warn_missing_data(exp)
    return 0


def _warn_missing_data(exp: Any) -> None:
    """Say so when the data set is not on this machine: `run` checks it before any trial
    and refuses (validate does not: the spec may be meant for another machine)."""
    from orchestrator.api import check_data

    try:
        check_data(exp)
    except UserInputError as err:
        print(
            f"hessweep: warning: {str(err).rstrip('.')}; `hessweep run` refuses to start on a "
            "machine without it",
            file=sys.stderr,
        )


def _warn_unfair(exp: Any) -> None:
    """Say so when batch sizes will not be compared at a common training loss."""
    searched = exp.search is not None and "target_train_loss" in exp.search.space
    if exp.training.get("target_train_loss") is None and not searched:
        print(
            "hessweep: warning: training.target_train_loss is not set, so trials stop at "
            "training.max_epochs (or a scheduler's stop) and batch sizes are compared at "
            "different training losses (the paper compares them at a common one); set it, e.g. "
            "--set training.target_train_loss=0.1",
            file=sys.stderr,
        )


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.api import run_experiment

    exp = load_spec(args.spec, args.set)
    _warn_unfair(exp)
    start = time.perf_counter()
    try:
        result = run_experiment(exp, address=args.address, tracking_uri=args.tracking_uri)
    except KeyboardInterrupt as stop:
        return _interrupted(stop, args.address)
    return _summary(result, time.perf_counter() - start)


def _interrupted(stop: KeyboardInterrupt, address: str | None) -> int:
    """Exit 130 with the exact ``resume`` command when the sweep's state was saved."""
    sweep_dir = getattr(stop, "sweep_dir", None)
    if sweep_dir is None:
        print("hessweep: interrupted", file=sys.stderr)
    else:
        where = f" --address {address}" if address else ""
        print(
            "hessweep: interrupted; the sweep's state is saved: continue with "
            f"`hessweep resume {redact_text(sweep_dir)}{where}`",
            file=sys.stderr,
        )
    return EXIT_INTERRUPTED


def _named_spec(name: str | None):
    """The spec called ``name`` in experiments/ (or at that path), or None when there is none
    (an experiment name alone); a spec that is there but invalid is an error, not skipped."""
    from orchestrator.spec import Experiment, resolve_spec

    if not name:
        return None
    try:
        path = resolve_spec(name)
    except UserInputError:
        return None
    return Experiment.from_yaml(path)


def _spec_storage(name: str) -> str | None:
    """The storage of the spec called ``name`` in experiments/, if there is one."""
    spec = _named_spec(name)
    return spec.storage if spec is not None else None


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.api import resume_experiment
    from orchestrator.errors import NothingToDo

    spec_storage = None if args.storage else _spec_storage(args.name)
    storage = args.storage or spec_storage or "runs/ray"
    if spec_storage is not None:
        print(
            f"looking for sweeps of {args.name} under {redact_text(spec_storage)}, the storage "
            "of its spec (--storage to look elsewhere)"
        )
    start = time.perf_counter()
    try:
        result = resume_experiment(
            args.name, address=args.address, tracking_uri=args.tracking_uri, storage=storage
        )
    except NothingToDo as done:
        print(f"hessweep: {done}")
        return 0
    except KeyboardInterrupt as stop:
        return _interrupted(stop, args.address)
    return _summary(result, time.perf_counter() - start)


def _summary(result: Any, wall: float) -> int:
    """Print where everything went; the exit code is 1 when any trial failed."""
    from orchestrator.tracking import DEFAULT_TRACKING_URI

    t = result.timings
    store = (
        ""
        if result.tracking_uri == DEFAULT_TRACKING_URI
        else f" --tracking-uri {redact_text(result.tracking_uri)}"
    )
    ui = (
        f"open the UI at {redact_text(result.tracking_uri)}"
        if _is_server(result.tracking_uri)
        else f"open the UI with: hessweep ui{store}   (then http://127.0.0.1:5000)"
    )
    print(
        f"\nwall time {wall:.1f}s (training {t.get('training_s', 0):.1f}s, Hessian "
        f"{t.get('hessian_s', 0):.1f}s, tracking {t.get('tracking_s', 0):.1f}s)\n"
        f"table: {result.report_dir}/table.parquet and table.md\n"
        f"MLflow parent run {result.parent_run_id} at {redact_text(result.tracking_uri)}\n"
        f"{ui}\n"
        "the paper's tables, figures and findings: "
        f"hessweep report {Path(result.report_dir).name}{store}"
    )
    if not result.failed_trials:
        return 0
    n, total = len(result.failed_trials), len(result.result_grid)
    print(f"\nhessweep: {n} of {total} trial(s) failed:", file=sys.stderr)
    for line in result.failed_trials:
        print(f"  {line}", file=sys.stderr)
    print(
        "fix the cause, then `hessweep resume` retries the failed trials (finished ones stay)",
        file=sys.stderr,
    )
    return EXIT_FAILED


def cmd_analyze(args: argparse.Namespace) -> int:
    from orchestrator.analyze import analyze_run

    analyze_run(args.run_id, tracking_uri=args.tracking_uri, address=args.address)
    print(f"spectra of run {args.run_id} recomputed and logged onto it (metrics, spectrum/*)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import ReportError, build_report
    from orchestrator.tracking import open_store, resolve_tracking_uri

    spec = None if args.run_id else _named_spec(args.name)
    # like `run`: --tracking-uri, else MLFLOW_TRACKING_URI, else the spec's, else local
    uri = resolve_tracking_uri(args.tracking_uri, spec.tracking_uri if spec else None)
    open_store(uri)  # a mistyped SQLite path is refused, not created empty
    try:
        result = build_report(
            None if args.run_id else (spec.name if spec else args.name),
            args.run_id,
            tracking_uri=uri,
            landscape=not args.no_landscape,
        )
    except ReportError as err:
        raise UserInputError(str(err)) from None
    print("\nFindings (Yao et al. 2018):")
    for f in result.findings:
        print(f"  {f.number}. [{f.verdict}] {f.claim}")
        for line in f.evidence:
            print(f"       {line}")
    print(f"\nreport: {result.html}\n        {result.markdown}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from trainables.data import (
        DATASET_NAMES,
        DOWNLOADABLE,
        DatasetCorruptError,
        DatasetNotFoundError,
        default_root,
        expected_files,
        load_dataset,
    )

    root = args.root or str(default_root())
    unknown = [n for n in args.datasets if n not in DATASET_NAMES]
    if unknown:
        raise UserInputError(
            f"unknown dataset {unknown[0]!r}; downloadable: {', '.join(DOWNLOADABLE)} "
            "(digits is bundled with scikit-learn)"
        )
    for name in args.datasets:
        print(f"{name}: fetching into {root} ...", flush=True)
        try:
            data = load_dataset(name, root=root, download=True)
        except (ValueError, DatasetCorruptError, DatasetNotFoundError) as err:
            raise UserInputError(f"{name}: {err}") from None
        except OSError as err:
            raise UserInputError(
                f"{name}: download into {root} failed ({err}); check the network, or copy "
                f"the files there by hand: {expected_files(name, root)}"
            ) from None
        print(f"{name}: ready ({len(data.train)} train, {len(data.test)} test images)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from orchestrator.tracking import DEFAULT_ARTIFACTS, open_store, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    open_store(uri)  # a clear error (exit 2) for a store that cannot be opened or is not there
    if _is_server(uri):
        print(f"{redact_text(uri)} is an MLflow server: it serves its own UI; open it in a browser")
        return 0
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        Path(DEFAULT_ARTIFACTS).resolve().as_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(f"MLflow UI for {redact_text(uri)} on http://{args.host}:{args.port} (Ctrl-C to stop)")
    return subprocess.call(cmd)


def _is_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server (which has its own UI) rather than a store file."""
    return uri.split("://", 1)[0].lower() in ("http", "https")


def _version() -> str:
    """The installed distribution's version ('unknown' when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hessweep")
    except PackageNotFoundError:
        return "unknown"


def _port(text: str) -> int:
    """A TCP port number, refused by argparse (exit 2) outside 1-65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessweep",
        description="Batch-size x robust-training sweeps with exact Hessian spectra, "
        "on Ray Tune, tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"hessweep {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(
        p: argparse.ArgumentParser,
        address: bool = True,
        store: str = "MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db",
    ) -> None:
        if address:
            p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
        p.add_argument("--tracking-uri", help=f"MLflow store (default: {store})")

    def spec_and_overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", help="spec file or experiment name, e.g. demo")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a spec field, e.g. --set batch_sizes=[32,512] "
            "--set training.lr=0.1 (repeatable)",
        )

    p = sub.add_parser("run", help="run an experiment spec (a path, or a name in experiments/)")
    spec_and_overrides(p)
    common(p, store="MLFLOW_TRACKING_URI, the spec's tracking_uri, else sqlite:///runs/mlflow.db")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="finish an interrupted sweep without re-running done trials")
    p.add_argument("name", help="experiment name (its newest sweep) or a sweep folder or URI")
    p.add_argument(
        "--storage",
        help="where the sweeps live (default: the storage of the spec of that name in "
        "experiments/, else runs/ray)",
    )
    common(p, store="the store the sweep was logged to")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("validate", help="check a spec and print the grid it expands to")
    spec_and_overrides(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "analyze", help="recompute the Hessian spectra of a trial run's final checkpoint"
    )
    p.add_argument("run_id", help="MLflow run id of a trial (child) run")
    common(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="the paper's tables, figures and findings from MLflow")
    p.add_argument("name", nargs="?", help="experiment name (its newest sweep)")
    p.add_argument("--run-id", help="a sweep's parent run id instead of the newest sweep")
    p.add_argument(
        "--no-landscape",
        action="store_true",
        help="skip the loss-landscape figure (it reloads every checkpoint)",
    )
    common(
        p,
        address=False,
        store="MLFLOW_TRACKING_URI, the tracking_uri of NAME's spec, else sqlite:///runs/mlflow.db",
    )
    p.set_defaults(func=cmd_report, subparser=p)

    p = sub.add_parser(
        "download", help="fetch MNIST/CIFAR once (training never downloads; digits is bundled)"
    )
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="mnist, cifar10, cifar100")
    p.add_argument(
        "--root",
        help="data folder (default: $HESSWEEP_DATA, else "
        "${XDG_CACHE_HOME:-~/.cache}/hessweep/data)",
    )
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("ui", help="serve the MLflow UI for the tracking store (127.0.0.1)")
    common(p, address=False)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=5000, help="TCP port, 1-65535 (default 5000)")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hessweep`` console script."""
    from trainables.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "report" and not (args.name or args.run_id):
        args.subparser.error("report needs an experiment NAME or --run-id")  # report's usage
    try:
        return args.func(args)
    except (UserInputError, ConfigError) as err:
        print(f"hessweep: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hessweep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
