"""proto/: every vector validates against its op's JSON Schema, and live daemon frames against theirs."""
import json
import re
from pathlib import Path

import jsonschema
import pytest

from conftest import ROOT, RawClient

SCHEMAS = {p.stem: json.loads(p.read_text()) for p in (ROOT / "proto" / "schemas").glob("*.json")}
VECTORS = json.loads((ROOT / "proto" / "vectors.json").read_text())["vectors"]


def validate(name, message):
    jsonschema.validate(message, SCHEMAS[name], cls=jsonschema.Draft202012Validator)


def parse_python_style(payload):
    # Python's json accepts the bare NaN/Infinity tokens the protocol allows.
    return json.loads(payload)


@pytest.mark.parametrize("vector", [v for v in VECTORS if "op" in v["expect"]], ids=lambda v: v["name"])
def test_valid_vectors_match_their_schema(vector):
    frame = bytes.fromhex(vector["frame_hex"])
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    message = parse_python_style(frame[4:].decode())
    validate(vector["expect"]["op"], message)


def test_every_op_has_a_schema_and_a_vector():
    ops = {v["expect"]["op"] for v in VECTORS if "op" in v["expect"]}
    client_ops = {name for name, s in SCHEMAS.items() if s["properties"]["op"].get("const") == name} - {"ack", "error"}
    assert ops == client_ops


def json_or_none(text):
    """A default written as JSON (`"durable"`, `10000`, `false`), else None (words: "the daemon's clock")."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def op_table():
    """PROTOCOL.md's "Every op" table: op → (kind, members as {name: optional?, default or None}, reply schema)."""
    text = (ROOT / "proto" / "PROTOCOL.md").read_text()
    section = text.split("\n## Every op\n")[1].split("\n## ")[0]
    table = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        op, kind, members, reply = [cell.strip() for cell in line.strip("|").split("|")]
        parsed = {}
        for m in re.finditer(r"`(\w+)`(\?)?(?: \(([^)]*)\))?", members):
            parsed[m.group(1)] = (bool(m.group(2)), json_or_none(m.group(3)))
        table[op.strip("`")] = (kind, parsed, reply.strip("`"))
    return table


def test_the_op_table_names_every_op_with_its_kind_members_defaults_schema_vector_and_reply():
    table = op_table()
    vector_ops = {v["expect"]["op"] for v in VECTORS if "op" in v["expect"]}
    client_ops = {name for name, s in SCHEMAS.items() if s["properties"]["op"].get("const") == name} - {"ack", "error"}
    assert set(table) == client_ops == vector_ops
    from armory_track._connection import _REQUEST_OPS
    assert {op for op, (kind, _, _) in table.items() if kind == "request"} == _REQUEST_OPS
    for op, (kind, members, reply) in table.items():
        schema = SCHEMAS[op]
        assert (reply == "—") == (kind == "fire-and-forget"), op
        if kind == "request":
            assert reply in SCHEMAS and SCHEMAS[reply]["properties"]["op"]["const"] == "reply", op
        assert set(members) == set(schema["properties"]) - {"op", "seq"}, op
        for name, (optional, default) in members.items():
            assert (name not in schema["required"]) == optional, (op, name)
            assert schema["properties"][name].get("default") == default, (op, name)


def test_live_daemon_frames_match_their_schemas(daemon):
    c = RawClient(daemon.socket)
    validate("hello-reply", c.hello())
    c.send("trackable", id=1)
    validate("params-reply", c.request("get_trackable", id=1))
    validate("params-reply", c.request("get_params"))
    c.send("evaluation", id=2, name="schemas")
    c.send("chain", id=3, evaluation=2, name="c")
    run = c.request("start", chain=3)
    validate("run-reply", run)
    opened = c.request("artifact_open", run=run["handle"], path="a.txt")
    validate("artifact-open-reply", opened)
    c.send("artifact_chunk", artifact=opened["artifact"], data="aGk=")
    validate("artifact-close-reply", c.request("artifact_close", artifact=opened["artifact"]))
    validate("run-reply", c.request("run_info", run=run["handle"]))
    validate("flush-reply", c.request("flush", wait="uploaded", timeout_ms=5000))
    validate("status-reply", c.request("status"))
    validate("run-reply", c.request("end", evaluation=2, status="FINISHED"))
    validate("experiment-reply", c.request("experiment", name="schemas"))
    experiment = c.request("experiment", name="schemas-created", create=True)
    validate("experiment-reply", experiment)
    validate("empty-reply", c.request("set_experiment_tag", experiment_id=experiment["experiment_id"], key="k", value="v"))
    validate("run-reply", c.request("create_run", experiment_id=experiment["experiment_id"], run_name="r"))
    validate("sync-reply", c.request("sync_status"))
    seq = c.send("param", key="bad//key", value="x")
    seen = {}
    while "error" not in seen:
        message = c.recv()
        seen[message["op"]] = message
    validate("error", seen["error"])
    assert seen["error"]["seq"] == seq and seen["error"]["failed_op"] == "param"
    while "ack" not in seen:
        message = c.recv()
        seen[message["op"]] = message
    validate("ack", seen["ack"])
    c.close()
