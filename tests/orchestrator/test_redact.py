"""Credentials never reach logs, printed URIs or the spec copy logged to MLflow."""

from __future__ import annotations

from orchestrator.redact import MASK, redact, redact_text
from orchestrator.spec import Experiment


def test_uri_passwords_and_secret_query_parameters_are_masked():
    assert redact_text("http://alice:s3cr3t@mlflow:5000") == f"http://alice:{MASK}@mlflow:5000"
    assert "s3cr3t" not in redact_text("postgresql://u:s3cr3t@db/mlflow?sslmode=require")
    assert "abc123" not in redact_text("https://h/x?X-Amz-Signature=abc123&a=1")
    assert redact_text("sqlite:///runs/mlflow.db") == "sqlite:///runs/mlflow.db"


def test_secret_looking_keys_are_masked_recursively():
    data = {"aws_secret_access_key": "K", "nested": [{"api_key": "V", "lr": 0.1}], "name": "x"}
    assert redact(data) == {
        "aws_secret_access_key": MASK,
        "nested": [{"api_key": MASK, "lr": 0.1}],
        "name": "x",
    }


def test_logged_spec_copy_hides_the_tracking_password():
    exp = Experiment.from_dict(
        {"name": "x", "batch_sizes": [16], "tracking_uri": "http://bob:hunter2@mlflow:5000"}
    )
    assert "hunter2" not in exp.to_yaml(redacted=True)
    assert "hunter2" in exp.to_yaml()
