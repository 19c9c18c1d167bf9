"""The Hessian phase of a sweep: analyse finished trials on the actor pool, log to MLflow.

Trials are analysed in driver threads, so several models can be on the pool at once
and, when the cluster has room beside the trials, analysis starts while others train.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.artifacts import write_spectrum_files
from orchestrator.errors import last_line
from orchestrator.hessian_pool import HessianPool
from orchestrator.spec import Experiment
from orchestrator.spectra import (
    AnalysisCancelled,
    HessianSettings,
    SpectrumReport,
    analyze_model,
)
from orchestrator.storage import local_copy
from orchestrator.tracking import finite_metrics, log_batch
from trainables.checkpoint import CheckpointError
from trainables.train import load_trained

ANALYZED = "hessweep.analyzed"  # "true", or "failed" (then ANALYSIS_ERROR says why)
ANALYSIS_ERROR = "hessweep.analysis_error"


def settings_for(exp: Experiment) -> HessianSettings:
    """The engine settings a spec's ``hessian`` section asks for."""
    h = exp.hessian
    return HessianSettings(
        top_k=h.top_k,
        tol=h.tol,
        criterion=h.criterion,
        max_iter=h.max_iter,
        trace=h.trace,
        trace_rtol=h.trace_rtol,
        trace_max_probes=h.trace_max_probes,
        density=h.density,
        density_probes=h.density_probes,
        density_steps=h.density_steps,
        input_samples=h.input_samples,
        input_k=h.input_k,
        dtype=h.dtype,
        seed=h.seed,
    )


class HessianPhase:
    """Runs ``analyze_model`` for finished trials and logs metrics and files on their runs."""

    def __init__(
        self,
        exp: Experiment,
        client: MlflowClient,
        progress: Callable[[str], None] = print,
        max_parallel: int = 2,
    ) -> None:
        self.exp = exp
        self.client = client
        self.progress = progress
        self.settings = settings_for(exp)
        self.reports: dict[str, SpectrumReport] = {}
        self.seconds = 0.0
        self._pool: HessianPool | None = None
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._executor = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="hessian")
        self._stop = threading.Event()

    def pool(self, train_data: Any) -> HessianPool:
        """The actor pool over the training set, created on first use."""
        with self._lock:
            if self._pool is None:
                h = self.exp.hessian
                self.progress(
                    f"hessian: starting {h.num_actors} actor(s) "
                    f"({h.cpus_per_actor:g} CPU, {h.gpus_per_actor:g} GPU each)"
                )
                self._pool = HessianPool(
                    train_data,
                    num_actors=h.num_actors,
                    num_cpus=h.cpus_per_actor,
                    num_gpus=h.gpus_per_actor,
                )
            return self._pool

    def already_done(self, run_id: str) -> bool:
        """True when the run carries the analysed tag (a resumed sweep skips it)."""
        return self.client.get_run(run_id).data.tags.get(ANALYZED) == "true"

    def submit(self, trial_id: str, checkpoint_path: str, run_id: str, label: str) -> Future:
        """Queue one trial's analysis (idempotent per trial id)."""
        with self._lock:
            if trial_id not in self._futures:
                self._futures[trial_id] = self._executor.submit(
                    self._analyse_or_tag, trial_id, checkpoint_path, run_id, label
                )
            return self._futures[trial_id]

    def _analyse_or_tag(self, trial_id: str, checkpoint_path: str, run_id: str, label: str):
        """``_analyse``; a failure is tagged on the trial's run (resume tries it again) and
        raised for ``wait``. A run analysed before keeps ``analyzed=true`` and its metrics
        (``hessweep analyze`` failing on another machine): only the error is added."""
        if self._stop.is_set():
            raise AnalysisCancelled(f"{label}: not started")
        try:
            self._analyse(trial_id, checkpoint_path, run_id, label)
        except AnalysisCancelled:
            raise  # not a failure of the model: resume analyses it
        except Exception as err:
            tags = {ANALYSIS_ERROR: f"{type(err).__name__}: {last_line(err)}"[:500]}
            try:
                if self.client.get_run(run_id).data.tags.get(ANALYZED) != "true":
                    tags[ANALYZED] = "failed"
                log_batch(self.client, run_id, tags=tags)
            except Exception as tag_err:  # the store is down too: the analysis error counts
                self.progress(f"hessian: {label}: failure not tagged on its run ({tag_err})")
            raise
        try:
            if ANALYSIS_ERROR in self.client.get_run(run_id).data.tags:  # an earlier try's
                self.client.delete_tag(run_id, ANALYSIS_ERROR)
        except Exception as err:  # the analysis is logged; a stale error tag is no failure
            self.progress(f"hessian: {label}: old {ANALYSIS_ERROR} tag not removed ({err})")

    def _analyse(self, trial_id: str, checkpoint_path: str, run_id: str, label: str) -> None:
        start = time.perf_counter()
        with local_copy(checkpoint_path) as local:
            try:
                trained = load_trained(local)
            except CheckpointError as err:
                if local == checkpoint_path:
                    raise
                raise CheckpointError(f"{checkpoint_path} (downloaded to {local}): {err}") from err
        n = min(self.settings.input_samples, len(trained.test_data))
        test_x, test_y = _first(trained.test_data, n)
        self.progress(f"hessian: {label}: analysing ({trial_id})")
        report = analyze_model(
            trained.model,
            self.pool(trained.train_data),
            test_x,
            test_y,
            self.settings,
            progress=lambda msg: self.progress(f"hessian: {label}: {msg}"),
            stop=self._stop,
        )
        metrics = finite_metrics(report.metrics(), step=0)
        with tempfile.TemporaryDirectory(prefix="hessweep-art-") as tmp:
            write_spectrum_files(report, Path(tmp), label)
            self.client.log_artifacts(run_id, tmp)
        log_batch(self.client, run_id, metrics, tags={ANALYZED: "true"})
        with self._lock:
            self.reports[trial_id] = report
            self.seconds += time.perf_counter() - start
        lam = report.eigenvalues[0] if len(report.eigenvalues) else float("nan")
        self.progress(
            f"hessian: {label}: lambda_max={lam:.4g} in {time.perf_counter() - start:.1f}s"
        )

    def wait(self) -> dict[str, Exception]:
        """Block until every queued analysis is done; the failures by trial id (one model
        that cannot be analysed does not cost the others theirs)."""
        failed = {}
        for trial_id, future in list(self._futures.items()):
            try:
                future.result()
            except Exception as err:
                failed[trial_id] = err
        return failed

    def cancel(self) -> None:
        """Ask running analyses to stop at their next weight-Hessian product (or before their
        input Hessians) and queued ones not to start; their runs stay unanalysed for resume."""
        self._stop.set()

    def close(self, cancel: bool = False) -> None:
        """Stop the executor and the actors; ``cancel`` (see ``cancel``) first."""
        if cancel:
            self.cancel()
            running = sum(1 for f in self._futures.values() if f.running())
            if running:
                self.progress(f"hessian: stopping {running} running analysis(es)")
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _first(dataset: Any, n: int):
    """The first ``n`` (x, y) samples of a dataset as two tensors."""
    import torch

    if hasattr(dataset, "tensors"):
        x, y = dataset.tensors()
        return x[:n], y[:n]
    xs = [dataset[i][0] for i in range(n)]
    ys = [int(dataset[i][1]) for i in range(n)]
    return torch.stack(xs) if xs else torch.zeros(0), torch.tensor(ys, dtype=torch.long)
