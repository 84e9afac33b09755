"""MLflow plugins for `MLFLOW_TRACKING_URI=armoryd://`: unchanged MLflow code writes through armoryd.

MLflow loads these through the entry points `mlflow.tracking_store` and
`mlflow.artifact_repository` (scheme `armoryd`); importing `armory_track` alone never imports
MLflow. `armoryd://` finds the daemon the usual way; `armoryd:///path/to.sock` names a socket.

Writes become daemon frames: metrics, params and tags return without a round trip, errors come
back at the next sync point (`end_run`, `flush_async_logging`). The reads MLflow's own write paths
make (`get_run` after `create_run`, before artifacts, and while a run is live) are answered from
this process's state; every other read is answered by MLflow's own store for the daemon's
destination, after the run's pending records are uploaded (read-your-writes, bounded).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from mlflow.entities import Experiment, Param, Run, RunData, RunInfo, RunInputs, RunOutputs, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST,
                                          TEMPORARILY_UNAVAILABLE)
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.utils.validation import _validate_batch_log_data, _validate_experiment_name, _validate_experiment_tag

from . import _connection
from .evaluation import Run as DaemonRun

_READ_WAIT_SECONDS = float(os.environ.get("ARMORY_READ_WAIT_SECONDS", "10"))


def _use_socket_of(uri: Optional[str]) -> None:
    """`armoryd:///path/to.sock` names the socket for this process's connection."""
    if uri:
        path = urlparse(uri).path
        if path and path != "/" and not os.environ.get("ARMORY_SOCKET"):
            os.environ["ARMORY_SOCKET"] = path


def _artifact_uri(run_id: str) -> str:
    return f"armoryd:/runs/{run_id}/artifacts"


_AT = "armoryd:/at/"
_TRACE_LOCATION = "mlflow.artifactLocation"


def _through_armoryd(result):
    """What the destination's store answered, with the artifact locations of logged models and
    traces in it made `armoryd:/at/<location>`: MLflow then reads and writes those files through
    this plugin's artifact repository, which opens the location against the daemon's destination
    (a server's `mlflow-artifacts:` URIs need its tracking URI; this process's is `armoryd:`)."""
    items = result[0] if isinstance(result, tuple) and result and isinstance(result[0], list) else result  # (page, token)
    for item in items if isinstance(items, list) else [items]:
        item = getattr(item, "info", item)  # a Trace's TraceInfo
        location = getattr(item, "artifact_location", None)
        if isinstance(location, str) and hasattr(item, "model_id") and not location.startswith("armoryd:"):
            item.artifact_location = _AT + location
        tags = getattr(item, "tags", None)
        if hasattr(item, "trace_id") and isinstance(tags, dict) and not tags.get(_TRACE_LOCATION, "armoryd:").startswith("armoryd:"):
            tags[_TRACE_LOCATION] = _AT + tags[_TRACE_LOCATION]
    return result


class _Plugin:
    """What the store and the artifact repository share in one process: run handles, the runs
    this process created, and MLflow's own store for the daemon's destination."""

    lock = threading.RLock()
    handles: Dict[str, str] = {}
    handles_connection = None  # handles are a connection's: a new daemon (restart) attaches again
    runs: Dict[str, Dict[str, Any]] = {}
    backing = None
    backing_destination = None

    @classmethod
    def connection(cls):
        c = _connection.connection()
        if c is not cls.handles_connection:
            with cls.lock:
                if c is not cls.handles_connection:
                    cls.handles = {}
                    cls.handles_connection = c
        return c

    @classmethod
    def backing_store(cls):
        destination = cls.connection().hello.get("destination")
        with cls.lock:
            if cls.backing is None or cls.backing_destination != destination:
                if not destination:
                    raise MlflowException("armoryd did not say where its runs go (an older daemon?): reads through armoryd:// need its destination.")
                if destination.startswith("file:"):
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                from mlflow.tracking._tracking_service.utils import _get_store

                cls.backing = _get_store(destination)
                cls.backing_destination = destination
            return cls.backing

    @classmethod
    def handle(cls, run_id: str) -> str:
        """The daemon's handle of a run; a run this connection did not create is attached first."""
        connection = cls.connection()
        with cls.lock:
            handle = cls.handles.get(run_id)
        if handle is None:
            reply = connection.request("attach", run_id=run_id)
            with cls.lock:
                handle = cls.handles.setdefault(run_id, reply["handle"])
        return handle

    @classmethod
    def settle(cls) -> None:
        """Read-your-writes: wait (bounded) until what this process sent is in the store."""
        try:
            cls.connection().flush("uploaded", timeout=_READ_WAIT_SECONDS)
        except _connection.ArmoryError as e:
            raise MlflowException(f"armoryd: {e}") from None


class ArmorydTrackingStore(AbstractStore):
    """MLflow's tracking store over armoryd (`MLFLOW_TRACKING_URI=armoryd://`)."""

    def __init__(self, store_uri: Optional[str] = None, artifact_uri: Optional[str] = None):
        super().__init__()
        self.store_uri = store_uri  # built during `import mlflow`: connect lazily
        _use_socket_of(store_uri)

    # -- experiments ---------------------------------------------------------------

    def get_experiment_by_name(self, experiment_name: str) -> Optional[Experiment]:
        experiment_id = _Plugin.connection().request("experiment", name=experiment_name)["experiment_id"]
        return None if experiment_id is None else self.get_experiment(experiment_id)

    def create_experiment(self, name, artifact_location=None, tags=None):
        _validate_experiment_name(name)
        c = _Plugin.connection()
        if c.request("experiment", name=name)["experiment_id"] is not None:
            raise MlflowException(f"Experiment '{name}' already exists.", RESOURCE_ALREADY_EXISTS)
        experiment_id = c.request("experiment", name=name, create=True)["experiment_id"]
        for tag in tags or []:
            self.set_experiment_tag(experiment_id, tag)
        return experiment_id

    def get_experiment(self, experiment_id):
        return _Plugin.backing_store().get_experiment(experiment_id)

    def search_experiments(self, *args, **kwargs):
        return _Plugin.backing_store().search_experiments(*args, **kwargs)

    def set_experiment_tag(self, experiment_id, tag):
        _validate_experiment_tag(tag.key, tag.value)
        try:
            _Plugin.connection().request("set_experiment_tag", experiment_id=str(experiment_id), key=tag.key, value=str(tag.value))
        except _connection.ArmoryError as e:
            raise MlflowException(f"armoryd: {e}") from None

    # -- runs ------------------------------------------------------------------------

    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
        from mlflow.utils.name_utils import _generate_random_name

        tag_map = {t.key: t.value for t in tags or []}
        run_name = run_name or tag_map.get(MLFLOW_RUN_NAME) or _generate_random_name()
        tag_map.setdefault(MLFLOW_RUN_NAME, run_name)
        reply = _Plugin.connection().request("create_run", timeout=60, experiment_id=str(experiment_id), run_name=run_name,
                                             start_time=int(start_time), tags=tag_map)
        run_id = reply.get("run_id")
        if run_id is None:
            raise MlflowException(
                f"armoryd: the MLflow server did not create run '{run_name}' in time (it is unreachable; armoryd handle "
                f"{reply['handle']} keeps its records and uploads them when the server is back).", TEMPORARILY_UNAVAILABLE)
        state = {"experiment_id": str(experiment_id), "user_id": user_id or "", "status": "RUNNING", "start_time": int(start_time),
                 "end_time": None, "run_name": run_name, "tags": dict(tag_map), "params": {}, "metrics": {}}
        with _Plugin.lock:
            _Plugin.handles[run_id] = reply["handle"]
            _Plugin.runs[run_id] = state
        return self._run(run_id, state)

    @staticmethod
    def _run(run_id: str, s: Dict[str, Any]) -> Run:
        info = RunInfo(run_id=run_id, experiment_id=s["experiment_id"], user_id=s["user_id"], status=s["status"],
                       start_time=s["start_time"], end_time=s["end_time"], lifecycle_stage="active",
                       artifact_uri=_artifact_uri(run_id), run_name=s["run_name"])
        data = RunData(metrics=list(s["metrics"].values()),
                       params=[Param(k, v) for k, v in s["params"].items()],
                       tags=[RunTag(k, v) for k, v in s["tags"].items()])
        return Run(info, data, s.get("inputs") or RunInputs([], []), s.get("outputs") or RunOutputs([]))

    def log_inputs(self, run_id, datasets=None, models=None):
        """Datasets and models a run used: MLflow's own call on the destination (synchronous
        metadata); a live run's reads then show them."""
        _Plugin.settle()
        _Plugin.backing_store().log_inputs(run_id, datasets=datasets, models=models)
        self._refresh_inputs_and_outputs(run_id)

    def log_outputs(self, run_id, models):
        """Models a run produced: MLflow's own call on the destination, as `log_inputs`."""
        _Plugin.settle()
        _Plugin.backing_store().log_outputs(run_id, models)
        self._refresh_inputs_and_outputs(run_id)

    @staticmethod
    def _refresh_inputs_and_outputs(run_id: str) -> None:
        with _Plugin.lock:
            live = run_id in _Plugin.runs
        if live:
            stored = _Plugin.backing_store().get_run(run_id)
            with _Plugin.lock:
                if run_id in _Plugin.runs:
                    _Plugin.runs[run_id]["inputs"], _Plugin.runs[run_id]["outputs"] = stored.inputs, stored.outputs

    def get_run(self, run_id):
        with _Plugin.lock:
            state = _Plugin.runs.get(run_id)
            if state is not None:
                return self._run(run_id, state)
        _Plugin.settle()
        run = _Plugin.backing_store().get_run(run_id)
        info = run.info
        return Run(RunInfo(run_id=info.run_id, experiment_id=info.experiment_id, user_id=info.user_id, status=info.status,
                           start_time=info.start_time, end_time=info.end_time, lifecycle_stage=info.lifecycle_stage,
                           artifact_uri=_artifact_uri(info.run_id), run_name=info.run_name), run.data, run.inputs, run.outputs)

    def update_run_info(self, run_id, run_status, end_time, run_name):
        status = RunStatus.to_string(run_status) if isinstance(run_status, int) else run_status
        handle = _Plugin.handle(run_id)  # attaching a run makes it RUNNING again
        with _Plugin.lock:
            known = _Plugin.runs.get(run_id, {}).get("run_name")
        if run_name and run_name != known:
            # A rename: MLflow's stores keep the name and the `mlflow.runName` tag as one.
            _Plugin.connection().send("log", run=handle, tags={"mlflow.runName": run_name})
        if status != "RUNNING":
            _Plugin.connection().request("end", run=handle, status=status, end_time=int(end_time) if end_time else None)
            _sync()
        with _Plugin.lock:
            state = _Plugin.runs.get(run_id)
            if state is not None:
                state["status"], state["end_time"] = status, end_time
                if run_name:
                    state["run_name"] = state["tags"]["mlflow.runName"] = run_name
                return self._run(run_id, state).info
        return self.get_run(run_id).info

    def log_batch(self, run_id, metrics, params, tags):
        if len(metrics) == 1 and not params and not tags:
            return self.log_metric(run_id, metrics[0])
        metrics, params, tags = _validate_batch_log_data(metrics, params, tags)  # values over the limit truncated, as MLflow does
        with _Plugin.lock:
            known = dict(_Plugin.runs.get(run_id, {}).get("params", {}))
        for p in params:  # a changed param of this process's run raises here, as MLflow's store does
            old = known.get(p.key)
            if old is not None and old != str(p.value):
                raise _store_error(f"Changing param values is not allowed. Param with key='{p.key}' was already logged with value='{old}' "
                                   f"for run ID='{run_id}'. Attempted logging new value '{p.value}'.", "INVALID_PARAMETER_VALUE")
        handle = _Plugin.handle(run_id)
        fields: Dict[str, Any] = {"run": handle}
        if metrics:
            fields["metrics"] = [[m.key, _connection.protocol_number(m.value), int(m.step or 0), int(m.timestamp)] for m in metrics]
        if params:
            fields["params"] = {p.key: str(p.value) for p in params}
        if tags:
            fields["tags"] = {t.key: str(t.value) for t in tags}
        _Plugin.connection().send("log", **fields)
        with _Plugin.lock:
            state = _Plugin.runs.get(run_id)
            if state is not None:
                for m in metrics:
                    state["metrics"][m.key] = m
                for p in params:
                    state["params"].setdefault(p.key, str(p.value))
                for t in tags:
                    state["tags"][t.key] = str(t.value)

    def log_metric(self, run_id, metric):
        """The hot path: MLflow's checks once per run and key, then the metric is queued."""
        key, value, step, timestamp = metric.key, metric.value, metric.step, metric.timestamp
        entry = _metric_heads.get((run_id, key))
        if entry is None or entry[0]._closed is not None or type(value) is not float or type(step) is not int \
                or type(timestamp) is not int or timestamp < 0:
            entry = _metric_head(run_id, metric)
            value, step, timestamp = float(value), int(step or 0), int(timestamp)
        entry[1](entry[2], entry[3], value, step, timestamp)
        if entry[4] is not None:
            entry[4][key] = metric

    def flush_async_logging(self):
        super().flush_async_logging()
        _sync()

    def shut_down_async_logging(self):
        super().shut_down_async_logging()
        _sync()

    def delete_tag(self, run_id, key):
        with _Plugin.lock:
            state = _Plugin.runs.get(run_id)
            if state is not None:
                if key not in state["tags"]:
                    raise MlflowException(f"No tag with name: {key} in run with id {run_id}", RESOURCE_DOES_NOT_EXIST)
                state["tags"].pop(key)
        _Plugin.connection().send("delete_tag", run=_Plugin.handle(run_id), key=key)

    # -- reads forwarded to the destination, after this process's writes landed ------

    def get_metric_history(self, run_id, metric_key, max_results=None, page_token=None):
        _Plugin.settle()
        return _Plugin.backing_store().get_metric_history(run_id, metric_key, max_results=max_results, page_token=page_token)

    def _search_runs(self, experiment_ids, filter_string, run_view_type, max_results, order_by, page_token):
        _Plugin.settle()
        return _Plugin.backing_store()._search_runs(experiment_ids, filter_string, run_view_type, max_results, order_by, page_token)


# (run id, metric key) → (connection, its send_metric, the run's frame head, the key's JSON, the
# run's latest metrics or None). A connection closed, or left behind by fork(), is replaced on the
# next call. Bounded: a process that logs to many runs or keys starts it afresh when it is full.
_metric_heads: Dict[tuple, tuple] = {}
_MAX_METRIC_HEADS = 4096


def _metric_head(run_id: str, metric) -> tuple:
    """The slow path of `log_metric`: MLflow's own checks, then the cached frame parts."""
    _validate_batch_log_data([metric], [], [])
    connection = _Plugin.connection()
    state = _Plugin.runs.get(run_id)
    if len(_metric_heads) >= _MAX_METRIC_HEADS:
        _metric_heads.clear()
    entry = _metric_heads[(run_id, metric.key)] = (connection, connection.send_metric, _connection.metric_frame_head(_Plugin.handle(run_id)),
                                                   _connection.metric_key(metric.key), None if state is None else state["metrics"])
    return entry


def _forwarded(name: str):
    def method(self, *args, **kwargs):
        _Plugin.settle()
        return _through_armoryd(getattr(_Plugin.backing_store(), name)(*args, **kwargs))

    method.__name__ = name
    method.__doc__ = f"Forwarded to MLflow's own store for the daemon's destination (after pending writes landed): {name}."
    return method


for _name in ("delete_run", "restore_run", "delete_experiment", "restore_experiment", "rename_experiment",
              "delete_experiment_tag", "get_metric_history_bulk_interval_from_steps",
              "create_logged_model", "finalize_logged_model", "get_logged_model", "search_logged_models",
              "set_logged_model_tags", "delete_logged_model_tag", "delete_logged_model", "record_logged_model",
              "link_traces_to_run", "search_traces", "start_trace", "get_trace_info", "set_trace_tag", "batch_get_traces", "get_trace",
              "delete_trace_tag", "delete_traces"):
    setattr(ArmorydTrackingStore, _name, _forwarded(_name))


def _store_error(message: str, code: str) -> MlflowException:
    """The exception MLflow's own store for the daemon's destination raises: `RestException` for a
    server (what `MlflowClient` raises talking to it directly), `MlflowException` for a local store."""
    from mlflow.exceptions import RestException

    destination = _Plugin.connection().hello.get("destination") or ""
    if destination.startswith(("http://", "https://")):
        return RestException({"error_code": code, "message": message})
    from mlflow.protos import databricks_pb2

    return MlflowException(message, getattr(databricks_pb2, code, INVALID_PARAMETER_VALUE))


def _sync(level: str = "durable") -> None:
    """A sync point: refusals of earlier writes come back as MLflow's own exception."""
    try:
        _Plugin.connection().flush(level)
    except _connection.ArmoryError as e:
        raise _store_error(f"armoryd refused earlier writes: {e}", "INVALID_PARAMETER_VALUE") from None


def registry_store(store_uri: Optional[str] = None, tracking_uri: Optional[str] = None):
    """MLflow's model registry for `armoryd://` (`MLFLOW_REGISTRY_URI` unset): the registry of the
    daemon's destination, its server's or the file registry beside its local store. Registry
    calls are synchronous metadata calls, as MLflow makes them."""
    _use_socket_of(store_uri)
    destination = _Plugin.connection().hello.get("destination")
    if not destination:
        raise MlflowException("armoryd did not say where its runs go (an older daemon?): the model registry through armoryd:// needs its destination.")
    if destination.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import inspect

    from mlflow.tracking._model_registry.utils import _get_store_registry

    # The destination's own builder, called here: MLflow holds its store-building lock while it
    # calls this one, so going through `_get_store` again would wait for ever.
    builder = _get_store_registry().get_store_builder(destination)
    if "tracking_uri" in inspect.signature(builder).parameters:
        store = builder(store_uri=destination, tracking_uri=destination)
    else:
        store = builder(store_uri=destination)
    # A version's files, as a URI this process can open: a server's `mlflow-artifacts:` location
    # resolves against that server (this process's tracking URI is `armoryd:`).
    download_uri = store.get_model_version_download_uri

    def get_model_version_download_uri(name, version):
        uri = download_uri(name, version)
        if isinstance(uri, str) and uri.startswith("mlflow-artifacts:") and destination.startswith("http"):
            from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

            return MlflowArtifactsRepository.resolve_uri(uri, destination)
        return uri

    store.get_model_version_download_uri = get_model_version_download_uri
    return store


class ArmorydArtifactRepository(ArtifactRepository):
    """Artifacts of `armoryd:/runs/<run_id>/artifacts[/path]`: files are handed to armoryd (copied
    into its spool before the call returns) and uploaded by it; reads go to the real store. The
    files of logged models and traces (`armoryd:/at/<their location in the destination>`) are
    written to and read from the destination's store directly, as MLflow's own client does."""

    def __init__(self, artifact_uri: str, tracking_uri: Optional[str] = None, registry_uri: Optional[str] = None) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        self.location = artifact_uri[len(_AT):] if artifact_uri.startswith(_AT) else None
        if self.location is not None:
            self.run_id, self.prefix = None, ""
            return
        parts = urlparse(artifact_uri).path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "runs" or parts[2] != "artifacts":
            raise MlflowException(f"Not an armoryd artifact URI: {artifact_uri} (expected armoryd:/runs/<run_id>/artifacts "
                                  "or armoryd:/at/<location>).")
        self.run_id = parts[1]
        self.prefix = "/".join(parts[3:])

    def _path(self, *parts: Optional[str]) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    def log_artifact(self, local_file, artifact_path=None):
        if self.location is not None:
            return self._real().log_artifact(local_file, artifact_path)
        run = DaemonRun({"handle": _Plugin.handle(self.run_id), "run_id": self.run_id, "name": ""})
        run.log_artifact(local_file, self._path(artifact_path) or None)

    def log_artifacts(self, local_dir, artifact_path=None):
        if self.location is not None:
            return self._real().log_artifacts(local_dir, artifact_path)
        for root, _, files in os.walk(local_dir):
            relative = os.path.relpath(root, local_dir)
            for name in sorted(files):
                sub = self._path(artifact_path, None if relative == "." else relative)
                self.__class__(_artifact_uri(self.run_id) + ("/" + sub if sub else "")).log_artifact(os.path.join(root, name))

    def _real(self) -> ArtifactRepository:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        _Plugin.settle()
        real_uri = self.location or _Plugin.backing_store().get_run(self.run_id).info.artifact_uri
        # The server's `mlflow-artifacts:` URIs resolve against its tracking URI (the daemon's
        # destination), not this process's `armoryd://`.
        return get_artifact_repository(real_uri.rstrip("/") + ("/" + self.prefix if self.prefix else ""),
                                       tracking_uri=_Plugin.connection().hello.get("destination"))

    def list_artifacts(self, path=None):
        return self._real().list_artifacts(path)

    def _download_file(self, remote_file_path, local_path):
        return self._real()._download_file(remote_file_path, local_path)

    def delete_artifacts(self, artifact_path=None):
        return self._real().delete_artifacts(artifact_path)
