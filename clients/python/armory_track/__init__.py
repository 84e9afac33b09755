"""armory_track: Armory's experiment tracking through armoryd.

A drop-in for `armory.track` (same names and semantics) plus Armory evaluations whose runs armoryd
writes to MLflow: calls return in microseconds, records are durable in the daemon, and many
evaluation processes share one daemon.
"""
from ._connection import ArmoryError, ArmoryWarning, Connection, connection, socket_candidates
from .evaluation import Chain, Evaluation, Run, attach, track_metrics, track_system_metrics
from .track import (
    Trackable,
    get_current_params,
    reset_params,
    track_call,
    track_init_params,
    track_param,
    track_params,
    trackable_context,
    tracking_context,
)


def flush(wait: str = "durable", timeout: float = 10.0):
    """Waits until everything sent is durable (or `wait="uploaded"`); raises earlier refusals."""
    return connection().flush(wait, timeout)


__all__ = [
    "ArmoryError", "ArmoryWarning", "Chain", "Connection", "Evaluation", "Run", "Trackable", "attach", "connection", "flush",
    "get_current_params", "reset_params", "socket_candidates", "track_call", "track_init_params", "track_param",
    "track_metrics", "track_params", "track_system_metrics", "trackable_context", "tracking_context",
]
