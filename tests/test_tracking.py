"""MLflow tracking: SQLite store by default, batched metrics, resume by run id, FAILED status, and a real
`mlflow server` on loopback that stops mid-run without stopping the caller."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from plait.trainer.tracking import Tracker, flatten, resolve_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_flatten_and_default_uri(tmp_path: Path, monkeypatch):
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "{}"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_uri("", tmp_path) == "http://example:5000"
    assert resolve_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_sqlite_run_metrics_params_artifacts_resume_and_failed(tmp_path: Path):
    uri = resolve_uri("", tmp_path)
    tracker = Tracker(uri, "exp", tmp_path, run_name="r")
    tracker.log_params({"optim": {"lr": 0.1}, "steps": 10})
    for step in range(1, 4):
        tracker.log_metrics({"loss/total": 1.0 / step, "lr/llm": 0.1 * step}, step)
    artifact = tmp_path / "resolved-config.yaml"
    artifact.write_text("steps: 10\n")
    tracker.log_artifact(artifact)
    tracker.flush()
    assert tracker.metrics == [] and tracker.artifacts == []
    run_id = tracker.run_id
    client = MlflowClient(uri)
    assert _history(client, run_id, "loss/total") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert client.get_run(run_id).data.params == {"optim.lr": "0.1", "steps": "10"}
    assert [a.path for a in client.list_artifacts(run_id)] == ["resolved-config.yaml"]
    tracker.finish("KILLED")
    # Resume: the same run, new metrics appended, a changed param becomes a tag instead of an error.
    resumed = Tracker(uri, "exp", tmp_path, run_id=run_id)
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.log_params({"optim": {"lr": 0.1}, "steps": 20, "new": 1})
    resumed.log_metrics({"loss/total": 0.25}, 4)
    resumed.finish("FAILED")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params == {"optim.lr": "0.1", "steps": "10", "new": "1"}
    assert run.data.tags["resumed_with.steps"] == "20"
    assert _history(client, run_id, "loss/total")[-1] == (4, 0.25)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unreachable_server_never_raises_and_keeps_metrics(tmp_path: Path):
    tracker = Tracker(f"http://127.0.0.1:{_free_port()}", "exp", tmp_path)
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.flush()
    tracker.finish("FINISHED")
    assert tracker.run_id is None and len(tracker.metrics) == 1 and tracker.params == {"a": "1"}


def _start_server(port: int, store: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--artifacts-destination", str(store / "artifacts"),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    pytest.fail("mlflow server did not become healthy")


def test_real_server_metrics_artifacts_and_server_stopping_mid_run(tmp_path: Path):
    port = _free_port()
    server = _start_server(port, tmp_path / "server")
    uri = f"http://127.0.0.1:{port}"
    try:
        tracker = Tracker(uri, "exp", tmp_path / "run")
        tracker.log_params({"seed": 0})
        tracker.log_metrics({"loss/total": 2.0, "throughput/tokens_per_s": 10.0}, 1)
        artifact = tmp_path / "plot.png"
        artifact.write_bytes(b"\x89PNG fake")
        tracker.log_artifact(artifact)
        tracker.flush()
        client = MlflowClient(uri)
        assert _history(client, tracker.run_id, "loss/total") == [(1, 2.0)]
        assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["plot.png"]
        resumed = Tracker(uri, "exp", tmp_path / "run", run_id=tracker.run_id)
        assert resumed.run_id == tracker.run_id
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    # The server is gone: logging and flushing carry on, keeping what could not be sent.
    start = time.perf_counter()
    for step in range(2, 6):
        resumed.log_metrics({"loss/total": 1.0 / step}, step)
        resumed.flush()
    resumed.finish("FINISHED")
    assert len(resumed.metrics) == 4 and time.perf_counter() - start < 30
