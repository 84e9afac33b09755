"""MLflow's limits on keys and values, checked at the call (the daemon checks them again): a call
MLflow would refuse raises here, naming the key, the limit and the fix, instead of failing later
at a sync point. The limits come from the daemon's `hello` reply when it states them."""
from __future__ import annotations

import logging
import os
import posixpath
import re
from typing import Any, Dict, Mapping, Optional

_KEY = re.compile(r"^[/\w.\- :]*$")

DEFAULTS = {"max_key_length": 250, "max_param_value_length": 6000, "max_tag_value_length": 8000,
            "max_frame_bytes": 8 << 20}
MAX_EXPERIMENT_NAME = 500


def limits(hello: Optional[Mapping[str, Any]]) -> Dict[str, int]:
    """The daemon's limits (its hello reply), MLflow's defaults where it states none."""
    stated = (hello or {}).get("limits", {}) or {}
    return {name: int(stated.get(name, default)) for name, default in DEFAULTS.items()}


def refusal(code: str, op: str, message: str, key: Optional[str] = None) -> Dict[str, Any]:
    """An error as the daemon would send it, for a call refused before it was sent."""
    return {"op": "error", "seq": None, "failed_op": op, "code": code, "key": key, "message": message}


def key_problem(key: Any, kind: str, max_length: int) -> Optional[str]:
    """Why MLflow refuses `key` as a metric, param or tag key, or None."""
    if not isinstance(key, str):
        return f"Invalid {kind} key {key!r}: keys are strings."
    if not key:
        return f"Invalid {kind} key '': keys must not be empty."
    if len(key) > max_length:
        return f"Invalid {kind} key '{key[:60]}…': {len(key)} characters, MLflow allows at most {max_length}. Use a shorter key."
    if not _KEY.match(key):
        return (f"Invalid {kind} key '{key}': keys may only contain alphanumerics, underscores (_), dashes (-), "
                "periods (.), spaces ( ), colons (:) and slashes (/).")
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith("..") or norm.startswith("/"):
        return (f"Invalid {kind} key '{key}': keys are used as file paths and must not resolve to another name "
                f"(this one resolves to '{norm}'): no leading '/', no '//', no '.' or '..' segments, no trailing '/'.")
    return None


def value_problem(key: str, value: str, kind: str, max_length: int) -> Optional[str]:
    """Why MLflow refuses a param's or tag's value, or None."""
    if len(value) > max_length:
        return (f"{kind.capitalize()} '{key}' has a value of {len(value)} characters; MLflow allows at most {max_length}. "
                "Shorten it, or log it as an artifact (log_text, log_dict).")
    return None


def truncates_long_values() -> bool:
    """MLflow's own rule (MLFLOW_TRUNCATE_LONG_VALUES, default true): a param or tag value over
    the limit is cut to it with a warning instead of refused."""
    return os.environ.get("MLFLOW_TRUNCATE_LONG_VALUES", "true").strip().lower() not in ("false", "0", "no", "off")


def warn_truncated(key: str, value: str, kind: str, max_length: int) -> None:
    logging.getLogger("armory_track").warning(
        "%s '%s' has a value of %d characters: truncated to MLflow's limit of %d, as MLflow does. Log the whole value as an "
        "artifact (log_text, log_dict); MLFLOW_TRUNCATE_LONG_VALUES=false refuses such values instead.",
        kind.capitalize(), key, len(value), max_length)
