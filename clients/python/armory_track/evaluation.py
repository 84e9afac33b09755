"""Armory evaluations through armoryd: an MLflow experiment, a parent run with the global params,
and one nested run per chain (its own params and those of its dataset, perturbations, model,
metrics and exporters)."""
from __future__ import annotations

import base64
import contextvars
import json
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Union

from ._connection import ArmoryError, connection, metric_frame_head, metric_key, protocol_number
from ._rules import MAX_EXPERIMENT_NAME as _MAX_EXPERIMENT_NAME, refusal
from .track import Trackable, _flatten, _next_id, track_call, trackable_context

_STATUS = {"FINISHED", "FAILED", "KILLED"}


def _status_for(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


def _sync_point() -> None:
    """Chain and evaluation ends: durable, or uploaded when ARMORY_WAIT_UPLOAD=SECONDS is set."""
    wait_upload = os.environ.get("ARMORY_WAIT_UPLOAD")
    if wait_upload:
        connection().flush("uploaded", timeout=float(wait_upload))
    else:
        connection().flush("durable")


class Run:
    """An MLflow run the daemon writes for this process; logging calls never wait for it."""

    def __init__(self, reply: Dict[str, Any]):
        self.handle: str = reply["handle"]
        self._run_id: Optional[str] = reply.get("run_id")
        self.experiment_id: Optional[str] = reply.get("experiment_id")
        self.name: str = reply.get("name", "")
        self._head = metric_frame_head(self.handle)
        self._keys: Dict[str, bytes] = {}  # metric key → its JSON and a comma

    @property
    def run_id(self) -> str:
        """MLflow's run id (for `mlflow.start_run(run_id=...)`), waiting up to 10 s for a server."""
        if self._run_id is None:
            reply = connection().request("run_info", timeout=20, run=self.handle, wait_ms=10000)
            self._run_id = reply.get("run_id")
            if self._run_id is None:
                raise TimeoutError(f"pending: the MLflow server is unreachable; run '{self.name}' (armoryd handle {self.handle}) "
                                   "has no MLflow id yet. Its records are kept and uploaded when the server is back.")
        return self._run_id

    def log_metric(self, key: str, value: float, step: Optional[int] = None, timestamp: Optional[int] = None) -> None:
        k = self._keys.get(key)
        if k is None:
            connection().check("log", "metric", [(key, None)])
            k = self._keys[key] = metric_key(key)
        ts = int(time.time() * 1000) if timestamp is None else int(timestamp)
        connection().send_metric(self._head, k, float(value), int(step or 0), ts)

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None, timestamp: Optional[int] = None) -> None:
        ts = int(time.time() * 1000) if timestamp is None else int(timestamp)
        rows = []
        c = connection()
        c.check("log", "metric", [(key, None) for key in metrics if key not in self._keys])
        for key, value in metrics.items():
            rows.append([key, protocol_number(value), int(step or 0), ts])
        c.send("log", run=self.handle, metrics=rows)

    def log_param(self, key: str, value: Any) -> None:
        self.log_params({key: value})

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat: Dict[str, str] = {}
        for key, value in params.items():
            flat.update(_flatten(key, value))
        c = connection()
        c.send("log", run=self.handle, params=dict(c.check("log", "param", flat.items())))

    def set_tag(self, key: str, value: Any) -> None:
        c = connection()
        c.send("log", run=self.handle, tags=dict(c.check("log", "tag", [(key, str(value))])))

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> int:
        """Copies a file into the run (under `artifact_path`, a directory, as MLflow does); returns
        once the daemon holds a copy (the file may then be deleted). Streamed in chunks."""
        name = os.path.basename(local_path)
        target = f"{artifact_path.strip('/')}/{name}" if artifact_path else name
        def chunks():
            with open(local_path, "rb") as f:
                yield from iter(lambda: f.read(self._chunk_size()), b"")

        return self._send_artifact(target, chunks)

    def log_text(self, text: str, artifact_file: str) -> int:
        return self._send_bytes(text.encode("utf-8"), artifact_file)

    def log_dict(self, dictionary: Any, artifact_file: str) -> int:
        """JSON (YAML for .yaml/.yml needs PyYAML and is written as JSON otherwise), as MLflow's log_dict."""
        if artifact_file.endswith((".yaml", ".yml")):
            try:
                import yaml  # type: ignore

                return self._send_bytes(yaml.safe_dump(dictionary, default_flow_style=False).encode(), artifact_file)
            except ImportError:
                pass
        return self._send_bytes(json.dumps(dictionary, indent=2).encode(), artifact_file)

    def _chunk_size(self) -> int:
        return int(connection().hello.get("limits", {}).get("max_chunk_bytes", 1 << 20))

    def _send_bytes(self, data: bytes, path: str) -> int:
        size = self._chunk_size()
        return self._send_artifact(path, lambda: (data[i:i + size] for i in range(0, len(data), size)))

    def _send_artifact(self, path: str, chunks: Callable[[], Iterable[bytes]]) -> int:
        """Streams an artifact; sent again from its first chunk when the daemon restarted mid-way
        (`ARTIFACT_INTERRUPTED`: its partial copy did not survive)."""
        c = connection()
        while True:
            artifact = c.request("artifact_open", run=self.handle, path=path)["artifact"]
            for chunk in chunks():
                c.send("artifact_chunk", artifact=artifact, data=base64.b64encode(chunk).decode("ascii"))
            try:
                return c.request("artifact_close", timeout=300, artifact=artifact)["bytes"]
            except ArmoryError as e:
                if [x.get("code") for x in e.errors] != ["ARTIFACT_INTERRUPTED"]:
                    raise

    def end(self, status: str = "FINISHED") -> None:
        """Ends a run continued with `attach` (chains and evaluations end through their own `end`)."""
        connection().request("end", run=self.handle, status=status)
        _sync_point()


def attach(run_id: str) -> Run:
    """Continues an existing run by MLflow id (it becomes RUNNING until ended)."""
    return Run(connection().request("attach", run_id=run_id))


# The runs of the `with ….run()` blocks the caller is in, innermost last.
_active_runs: contextvars.ContextVar = contextvars.ContextVar("armory_track_active_runs", default=())


def track_metrics(metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
    """Armory's helper: logs each value to the active chain (the innermost `with ….run()`).
    A float is one point (at `step`); a sequence of floats is one point per element, its index
    the step; tensors and NumPy values are read with `.item()` (or `.tolist()`)."""
    runs = _active_runs.get()
    if not runs:
        raise RuntimeError("track_metrics needs an active chain: call it inside `with chain.run():`.")
    run = runs[-1]
    for key, value in metrics.items():
        if hasattr(value, "tolist") and getattr(value, "ndim", 0):
            value = value.tolist()
        elif hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (list, tuple)):
            for index, element in enumerate(value):
                run.log_metric(key, float(element.item() if hasattr(element, "item") else element), step=index)
        else:
            run.log_metric(key, float(value), step=step)


@contextmanager
def track_system_metrics(run_id: Optional[str] = None):
    """Armory's `track_system_metrics`: a no-op here, since armoryd samples the host and each
    client process once for every active run (system/... metrics). Kept so that code using it
    runs unchanged."""
    yield


class _RunLifecycle:
    """Start, end and run-as-a-context for an evaluation's parent run or a chain's nested run."""

    _run: Optional[Run]

    def _target(self) -> Dict[str, int]:
        raise NotImplementedError

    def _run_context_value(self, run: Run) -> Any:
        return run

    @property
    def run_id(self) -> str:
        """MLflow's run id (starting the run if needed; waits up to 10 s for a server)."""
        return self.start().run_id

    def start(self) -> Run:
        """Starts the run (a chain starts its evaluation's parent run too)."""
        if self._run is None:
            self._run = Run(connection().request("start", **self._target()))
        return self._run

    def end(self, status: str = "FINISHED") -> None:
        """Ends the run (an evaluation also ends its chains still open); a sync point that raises
        refusals of earlier calls."""
        assert status in _STATUS, f"status must be one of {sorted(_STATUS)}"
        self.start()
        if status == "KILLED":
            # Ctrl-C: the run ends KILLED without waiting for room in the buffer or for a daemon
            # that is away, within ARMORY_EXIT_FLUSH_SECONDS.
            bound = float(os.environ.get("ARMORY_EXIT_FLUSH_SECONDS", "10"))
            c = connection()
            c.request("end", timeout=bound, outage=False, urgent=True, status=status, **self._target())
            c.flush("durable", timeout=bound, outage=False, urgent=True)
            return
        connection().request("end", status=status, **self._target())
        _sync_point()

    @contextmanager
    def run(self):
        """Runs it: FINISHED on success, FAILED on an exception, KILLED on Ctrl-C. Inside, it is
        the active run `track_metrics` logs to."""
        run = self.start()
        token = _active_runs.set(_active_runs.get() + (run,))
        try:
            yield self._run_context_value(run)
        except BaseException as e:
            self.end(_status_for(e))
            raise
        finally:
            _active_runs.reset(token)
        self.end("FINISHED")


class _Components:
    """use_*/add_* for evaluations (defaults) and chains."""

    _target_id: int

    def _use(self, role: str, components: Iterable[Any], append: bool = False) -> None:
        ids = [c._armory_id for c in components if isinstance(c, Trackable)]
        connection().send("use", target=self._target_id, role=role, ids=ids, append=append)

    def use_dataset(self, dataset: Any) -> None:
        self.dataset = dataset
        self._use("dataset", [dataset])

    def use_perturbations(self, perturbations: Iterable[Any]) -> None:
        self.perturbations = list(perturbations)
        self._use("perturbations", self.perturbations)

    def use_model(self, model: Any) -> None:
        self.model = model
        self._use("model", [model])

    def use_metrics(self, metrics: Union[Mapping[str, Any], Iterable[Any]]) -> None:
        self.metrics = dict(metrics) if isinstance(metrics, Mapping) else {str(i): m for i, m in enumerate(metrics)}
        self._use("metrics", self.metrics.values())

    def use_exporters(self, exporters: Iterable[Any]) -> None:
        self.exporters = list(exporters)
        self._use("exporters", self.exporters)


class Chain(Trackable, _Components, _RunLifecycle):
    """One evaluation chain, run as a nested MLflow run. Logging starts it if needed."""

    def __init__(self, name: str, evaluation: "Evaluation"):
        self.name = name
        self.evaluation = evaluation
        self.dataset = evaluation.dataset
        self.perturbations = list(evaluation.perturbations)
        self.model = evaluation.model
        self.metrics = dict(evaluation.metrics)
        self.exporters = list(evaluation.exporters)
        self.track_call = track_call
        self._run: Optional[Run] = None
        super().__init__()

    def _armory_register(self) -> None:
        self._target_id = self._armory_id
        connection().send("chain", id=self._armory_id, evaluation=self.evaluation._id, name=self.name)

    def add_perturbation(self, perturbation: Any) -> None:
        self.perturbations.append(perturbation)
        self._use("perturbations", [perturbation], append=True)

    def add_metric(self, name: str, metric: Any) -> None:
        self.metrics[name] = metric
        self._use("metrics", [metric], append=True)

    def add_exporter(self, exporter: Any) -> None:
        self.exporters.append(exporter)
        self._use("exporters", [exporter], append=True)

    def get_tracked_params(self) -> Dict[str, str]:
        """The params the nested run gets: the chain's own, then its components' (later wins)."""
        return self.tracked_params

    def _target(self) -> Dict[str, int]:
        return {"chain": self._armory_id}

    def log_metric(self, key: str, value: float, step: Optional[int] = None, timestamp: Optional[int] = None) -> None:
        (self._run or self.start()).log_metric(key, value, step, timestamp)

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None, timestamp: Optional[int] = None) -> None:
        (self._run or self.start()).log_metrics(metrics, step, timestamp)

    def log_param(self, key: str, value: Any) -> None:
        self.start().log_param(key, value)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.start().log_params(params)

    def set_tag(self, key: str, value: Any) -> None:
        self.start().set_tag(key, value)

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> int:
        return self.start().log_artifact(local_path, artifact_path)

    def log_dict(self, dictionary: Any, artifact_file: str) -> int:
        return self.start().log_dict(dictionary, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> int:
        return self.start().log_text(text, artifact_file)


class Evaluation(_Components, _RunLifecycle):
    """An Armory evaluation: the MLflow experiment `name`, a parent run, a nested run per chain."""

    def __init__(self, name: str, description: Optional[str] = None, author: Optional[str] = None):
        self.name = name
        self.description = description
        self.author = author
        self._id = self._target_id = _next_id()
        self.dataset: Any = None
        self.perturbations: list = []
        self.model: Any = None
        self.metrics: Dict[str, Any] = {}
        self.exporters: list = []
        self.chains: Dict[str, Chain] = {}
        self._run: Optional[Run] = None
        if not name or len(name) > _MAX_EXPERIMENT_NAME:
            raise ArmoryError([refusal("INVALID_VALUE", "evaluation", f"The evaluation name has {len(name)} characters; MLflow needs "
                                       f"an experiment name of 1 to {_MAX_EXPERIMENT_NAME} characters.")])
        connection().send("evaluation", id=self._id, name=name, description=description)

    @contextmanager
    def autotrack(self):
        """A trackable context; yields `track_call`."""
        with trackable_context():
            yield track_call

    @contextmanager
    def add_chain(self, name: str):
        """Configures a chain inside its own trackable context; yields it. Starts nothing."""
        with trackable_context():
            chain = Chain(name, self)
            yield chain
        self.chains[name] = chain

    def _target(self) -> Dict[str, int]:
        return {"evaluation": self._id}

    def _run_context_value(self, run: Run) -> Any:
        return self

    def wait_uploaded(self, timeout: float) -> Dict[str, Any]:
        """Waits until everything recorded so far is confirmed by the store (bounded)."""
        return connection().flush("uploaded", timeout=timeout)

    def __enter__(self) -> "Evaluation":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(_status_for(exc))
