"""MLflow tracking on rank 0: buffered batched metrics, resume by run id, FAILED on crash, and a server that
is down (or goes down) never stopping training.

Default store: `sqlite:///RUN_DIR/mlflow.db` with artifacts in `RUN_DIR/mlartifacts`, so nothing needs a
server; `tracking.uri` or $MLFLOW_TRACKING_URI points at a real one. Every call to MLflow goes through
`_try`: a failure logs one warning, keeps what was not sent, and is retried at the next flush.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000
"""MLflow's limit on a param value's length."""
BATCH_METRICS = 1000
"""Metrics per `log_batch` call (MLflow's limit)."""
BATCH_PARAMS = 100
"""Params per `log_batch` call (MLflow's limit)."""
MAX_BUFFERED = 1_000_000
"""Metrics kept while the server is unreachable; the oldest are dropped beyond this."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"} with values as (length-capped) strings."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def resolve_uri(uri: str, run_dir: str | Path) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else a SQLite store in the run directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


class Tracker:
    """One MLflow run (rank 0; other ranks pass `enabled=False` and every call is a no-op)."""

    def __init__(self, uri: str, experiment: str, run_dir: str | Path, run_id: str | None = None,
                 run_name: str | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.uri, self.experiment, self.run_id, self.run_name = uri, experiment, run_id, run_name
        self.artifact_root = Path(run_dir).resolve() / "mlartifacts"
        self.metrics: list = []
        self.params: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self._failing = False
        self._resumed = run_id is not None
        if not enabled:
            return
        # One quick attempt per call: the loop retries at the next flush instead of blocking training.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self._try("start the run", self._start)

    def _try(self, what: str, fn) -> bool:
        """Run one MLflow call; on failure warn (once per outage) and report False."""
        from mlflow.exceptions import MlflowException

        try:
            fn()
        except MlflowException as err:
            if err.error_code != "INVALID_PARAMETER_VALUE":
                return self._failed(what, err)
            # Retrying a request the server rejects would block everything queued behind it.
            logger.error("MLflow rejected a request to %s; dropping it: %s", what, str(err).splitlines()[0][:300])
        except Exception as err:  # noqa: BLE001 - any tracking failure must leave training running
            return self._failed(what, err)
        if self._failing:
            logger.warning("MLflow at %s answers again; sending what was kept", self.uri)
        self._failing = False
        return True

    def _failed(self, what: str, err: Exception) -> bool:
        """Warn once per outage; the caller keeps its data for the next flush."""
        if not self._failing:
            logger.warning("MLflow at %s: could not %s (%s); keeping data and retrying later",
                           self.uri, what, (str(err).splitlines() or [""])[0][:200])
        self._failing = True
        return False

    def _start(self) -> None:
        """Create the run, or mark the resumed one running again."""
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            local = self.uri.startswith("sqlite:") or self.uri.startswith("file:")
            location = self.artifact_root.as_uri() if local else None
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id

    @property
    def ready(self) -> bool:
        """Whether a run exists (creating it if the server was down until now)."""
        if self.enabled and self.run_id is None:
            self._try("start the run", self._start)
        return self.enabled and self.run_id is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue run params (flattened); a resumed run keeps its values and tags the ones that changed."""
        if self.enabled:
            self.params.update(flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metrics of one step (sent by `flush`)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.metrics.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if len(self.metrics) > MAX_BUFFERED:
            logger.warning("MLflow unreachable: dropping the oldest %d buffered metrics",
                           len(self.metrics) - MAX_BUFFERED)
            del self.metrics[: len(self.metrics) - MAX_BUFFERED]

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file to upload at the next flush."""
        if self.enabled:
            self.artifacts.append((str(path), artifact_path))

    def flush(self) -> None:
        """Send buffered params, metrics and artifacts in batches; keep whatever fails."""
        if not self.ready:
            return
        if self.params and not self._try("log params", self._send_params):
            return
        while self.metrics:
            chunk = self.metrics[:BATCH_METRICS]
            if not self._try("log metrics", lambda: self.client.log_batch(self.run_id, metrics=chunk)):
                return
            del self.metrics[: len(chunk)]
        while self.artifacts:
            path, folder = self.artifacts[0]
            if not self._try(f"upload {path}", lambda: self.client.log_artifact(self.run_id, path, folder)):
                return
            self.artifacts.pop(0)

    def _send_params(self) -> None:
        """Params not in the run yet, in batches; changed values (a resume with new flags) become tags."""
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params if self._resumed else {}
        new = [Param(k, v) for k, v in self.params.items() if k not in existing]
        changed = [RunTag(f"resumed_with.{k}", v) for k, v in self.params.items() if k in existing and existing[k] != v]
        for i in range(0, len(new), BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=new[i : i + BATCH_PARAMS])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)
        self.params = {}

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and end the run as FINISHED, FAILED or KILLED (a crash must not leave it RUNNING)."""
        if not self.ready:
            return
        self.flush()
        self._try(f"mark the run {status}", lambda: self.client.set_terminated(self.run_id, status))
