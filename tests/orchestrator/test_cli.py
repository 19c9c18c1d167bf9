"""`hessweep ui`: serves the tracking store's MLflow UI on the loopback address only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from orchestrator.cli import main

STARTUP_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                found.add(addr)
    return found


def test_ui_serves_the_store_on_127_0_0_1_only(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment("ui-check", artifact_location=(tmp_path / "art").as_uri())
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-u",
            "-m",
            "orchestrator.cli",
            "ui",
            "--tracking-uri",
            uri,
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        body, deadline = None, time.monotonic() + STARTUP_S
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
        while body is None and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(1)
        assert body is not None, "the UI did not answer within the start-up time"
        assert "ui-check" in {e["name"] for e in body["experiments"]}
        # 0100007F is 127.0.0.1 in /proc's byte order; nothing listens on 0.0.0.0 or ::
        assert _listening_addresses(port) == {"0100007F"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}" in out


def test_download_reports_a_data_set_already_in_place(tmp_path: Path, capsys) -> None:
    from tests.trainables.test_data import _fake_mnist

    _fake_mnist(tmp_path)  # torchvision finds the files and fetches nothing
    assert main(["download", "mnist", "--root", str(tmp_path)]) == 0
    assert "mnist: ready (20 train, 10 test images)" in capsys.readouterr().out
    assert main(["download", "imagenet", "--root", str(tmp_path)]) == 2
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "storage"),
    [
        (["resume", "paper-cifar10"], "s3://YOUR-BUCKET/hessweep"),  # the spec's storage
        (["resume", "demo"], "runs/ray"),
        (["resume", "not-a-spec"], "runs/ray"),
        (["resume", "paper-cifar10", "--storage", "/mnt/nfs/ray"], "/mnt/nfs/ray"),
    ],
)
def test_resume_looks_where_the_spec_of_that_name_stores_its_sweeps(
    argv, storage, monkeypatch, capsys
) -> None:
    import orchestrator.api
    from orchestrator.errors import UserInputError

    seen = {}

    def fake_resume(name, address=None, tracking_uri=None, storage="", **_):
        seen["storage"] = storage
        raise UserInputError("stop here")

    monkeypatch.setattr(orchestrator.api, "resume_experiment", fake_resume)
    assert main(argv) == 2
    assert seen["storage"] == storage


@pytest.mark.parametrize(
    "argv", [["report", "demo"], ["analyze", "0" * 32], ["ui"]], ids=["report", "analyze", "ui"]
)
def test_read_only_commands_refuse_a_store_that_is_not_there(argv, tmp_path, capsys) -> None:
    store = tmp_path / "typo" / "mlflow.db"
    assert main([*argv, "--tracking-uri", f"sqlite:///{store}"]) == 2
    err = capsys.readouterr().err
    assert f"no such store ({store})" in err and "--tracking-uri" in err
    assert list(tmp_path.iterdir()) == []  # no empty store, no folder, no lock file


def test_report_without_a_name_shows_reports_usage(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["report"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "usage: hessweep report" in err
    assert "report needs an experiment NAME or --run-id" in err


def test_download_lists_only_what_can_be_downloaded(capsys) -> None:
    assert main(["download", "foo"]) == 2
    err = capsys.readouterr().err
    assert "downloadable: mnist, cifar10, cifar100 (digits is bundled" in err
    assert "synthetic" not in err


def test_the_summary_names_the_report_command_and_the_failed_trials(capsys) -> None:
    from types import SimpleNamespace

    from orchestrator.cli import _summary

    result = SimpleNamespace(
        timings={"training_s": 3.0},
        report_dir=Path("runs/reports/demo"),
        parent_run_id="abc",
        tracking_uri="sqlite:///runs/mlflow.db",
        failed_trials=("bs=64 none seed=0: RuntimeError: boom",),
        result_grid=[object(), object()],
    )
    assert _summary(result, 5.0) == 1
    out, err = capsys.readouterr()
    assert "hessweep report demo\n" in out and "runs/reports/demo/table.parquet" in out
    assert "1 of 2 trial(s) failed" in err and "RuntimeError: boom" in err
    result.tracking_uri = "http://user:pw@tracker:5000"  # another store: the hint names it
    _summary(result, 5.0)
    out = capsys.readouterr().out
    assert "hessweep report demo --tracking-uri http://user:***@tracker:5000" in out
    assert "open the UI at http://user:***@tracker:5000" in out  # a server has its own UI
    assert "hessweep ui" not in out
    result.tracking_uri = "sqlite:////data/other.db"
    _summary(result, 5.0)
    out = capsys.readouterr().out
    assert "hessweep ui --tracking-uri sqlite:////data/other.db" in out


def test_report_reads_the_store_its_spec_logs_to(tmp_path, monkeypatch, capsys) -> None:
    spec = tmp_path / "elsewhere.yaml"
    store = tmp_path / "theirs" / "mlflow.db"
    spec.write_text(f"name: elsewhere\nbatch_sizes: [16]\ntracking_uri: sqlite:///{store}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["report", str(spec)]) == 2  # that store is not there yet: named, not created
    assert f"no such store ({store})" in capsys.readouterr().err
    other = tmp_path / "given.db"
    assert main(["report", str(spec), "--tracking-uri", f"sqlite:///{other}"]) == 2
    assert f"no such store ({other})" in capsys.readouterr().err  # the flag wins


def test_report_and_resume_refuse_an_invalid_spec_of_that_name(tmp_path, capsys) -> None:
    # a broken spec is named, not skipped for the default store or runs/ray
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: broken\nbatch_sizes: [16]\nmodel: c2\n")
    for argv in (["report", str(spec)], ["resume", str(spec)]):
        assert main(argv) == 2
        assert "model: c2 does not fit the 1x8x8 images of digits" in capsys.readouterr().err


def test_ui_of_a_tracking_server_points_at_it_instead_of_serving(monkeypatch, capsys) -> None:
    # `mlflow ui` cannot serve an http store; the server has its own UI
    import orchestrator.tracking

    opened = []
    monkeypatch.setattr(orchestrator.tracking, "open_store", opened.append)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("started a server"))
    assert main(["ui", "--tracking-uri", "https://user:pw@mlflow.example.org"]) == 0
    assert opened == ["https://user:pw@mlflow.example.org"]
    out = capsys.readouterr().out
    assert "https://user:***@mlflow.example.org is an MLflow server" in out
    assert "pw" not in out


def test_version_is_the_installed_distributions(capsys) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"hessweep {version('hessweep')}"
