"""``hessweep analyze RUN_ID``: recompute a trial run's spectra from its final checkpoint."""

from __future__ import annotations

import json

from orchestrator.errors import UserInputError
from orchestrator.phase import HessianPhase
from orchestrator.spec import Experiment
from orchestrator.storage import exists, join, read_text
from orchestrator.tracking import CHECKPOINT, PARENT, SWEEP_DIR, open_store, resolve_tracking_uri
from trainables.checkpoint import CheckpointError
from trainables.data import DatasetCorruptError


def analyze_run(run_id: str, tracking_uri: str | None = None, address: str | None = None) -> None:
    """Load the run's checkpoint and sweep spec, run the Hessian phase, log onto the run."""
    from orchestrator.api import STATE_FILE, _init_ray, _storage_errors

    client = open_store(resolve_tracking_uri(tracking_uri))
    try:
        run = client.get_run(run_id)
    except Exception:  # MLflow raises its own exception type for unknown ids
        raise UserInputError(f"no MLflow run with id {run_id!r} in this tracking store") from None
    tags = run.data.tags
    if CHECKPOINT not in tags or PARENT not in tags:
        raise UserInputError(
            f"run {run_id} is not a finished hessweep trial run (no {CHECKPOINT} tag); "
            "give the id of a trial's child run"
        )
    ckpt = tags[CHECKPOINT]
    reach = "check the storage's credentials and network from this machine"
    with _storage_errors(f"the checkpoint of run {run_id}", ckpt, reach):
        if not exists(ckpt):
            raise UserInputError(f"the checkpoint of run {run_id} is gone: {ckpt}")
    sweep_dir = client.get_run(tags[PARENT]).data.tags.get(SWEEP_DIR, "")
    state = join(sweep_dir, STATE_FILE)
    with _storage_errors(f"the sweep folder of run {run_id}", sweep_dir, reach):
        if not sweep_dir or not exists(state):
            raise UserInputError(f"the sweep state {state} of run {run_id} is missing")
        text = read_text(state)
    exp = Experiment.from_dict(json.loads(text)["spec"], source=state, stored=True)
    _init_ray(address, exp, training=False)
    phase = HessianPhase(exp, client)
    try:
        phase.submit(tags.get("hessweep.trial_id", run_id), ckpt, run_id, run.info.run_name)
        failed = phase.wait()
        if failed:  # the run is tagged with it too
            err = next(iter(failed.values()))
            if isinstance(err, FileNotFoundError | DatasetCorruptError | CheckpointError):
                raise UserInputError(f"run {run_id}: {err}") from None  # data or files: fixable
            raise err
    finally:
        phase.close()
