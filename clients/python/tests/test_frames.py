"""The hand-written metric frames (`Connection.send_metric`) against Python's own JSON decoder,
and its values through a real armoryd into the store, bit for bit."""
import json
import math
import random
import struct

from mlflow.tracking import MlflowClient

from armory_track import _connection


def random_floats(n, seed=7):
    rng = random.Random(seed)
    special = [0.0, -0.0, 1.0, -1.0, 0.1, 1e-320, 5e-324, 1.7976931348623157e308, 1e16, 123456789.125,
               math.nan, math.inf, -math.inf]
    drawn = [struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(n)]
    return special + drawn


def frames(buffer):
    out, i = [], 0
    while i < len(buffer):
        (length,) = struct.unpack(">I", buffer[i:i + 4])
        out.append(bytes(buffer[i + 4:i + 4 + length]))
        i += 4 + length
    return out


def test_hot_metric_frames_match_the_general_encoder_and_land_exactly(daemon):
    c = _connection.connection()
    run = c.request("create_run", experiment_id="0", run_name="frames")
    key = "loss é/ü"
    run_head = _connection.metric_frame_head(run["handle"])
    values = random_floats(3000)
    # Hold the flusher back (it neither sends nor turns queued metrics into frames meanwhile) to
    # read the frames as written; `send_metric` itself takes no lock below its queue's bound.
    with c._send_lock, c._lock:
        start = c._seq
        for step, v in enumerate(values):
            c.send_metric(run_head, _connection.metric_key(key), v, step, 1795400000000 + step)
        c._move_metrics()
        written = frames(c._buffer)
    # A run's queued metrics become frames of up to 1000 metrics, each with the next seq.
    assert [len(json.loads(f)["metrics"]) for f in written] == [1000, 1000, 1000, 13]
    rows = []
    for n, frame in enumerate(written):
        decoded = json.loads(frame, parse_constant=lambda token: (_ for _ in ()).throw(ValueError(token)))
        assert {k: v for k, v in decoded.items() if k != "metrics"} == {"op": "log", "run": run["handle"], "seq": start + n + 1}
        rows += decoded["metrics"]
    for step, (v, row) in enumerate(zip(values, rows)):
        assert row[0] == key and row[2:] == [step, 1795400000000 + step]
        if isinstance(row[1], str):
            assert row[1] == _connection.protocol_number(v)
        else:
            assert struct.pack("<d", row[1]) == struct.pack("<d", v), row
    c.request("end", run=run["handle"], status="FINISHED")
    c.flush("uploaded", timeout=60)
    history = MlflowClient(tracking_uri="file://" + str(daemon.store)).get_metric_history(run["run_id"], key)
    stored = {m.step: m.value for m in history}
    assert len(stored) == len(values)
    for step, v in enumerate(values):
        assert struct.pack("<d", stored[step]) == struct.pack("<d", v) or (math.isnan(v) and math.isnan(stored[step]))
