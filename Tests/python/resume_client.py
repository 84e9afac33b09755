"""An evaluation that streams through `armory_track` for the resumable-session tests: params, a
tag, `--points` metric points paced over about `--seconds`, and an artifact of `--artifact-mb`
random bytes; prints its run ids and the artifact's SHA-256 as JSON on its last line."""
import argparse
import hashlib
import json
import os
import sys
import time

from armory_track import Evaluation, track_param

parser = argparse.ArgumentParser()
parser.add_argument("--name", required=True)
parser.add_argument("--points", type=int, default=20000)
parser.add_argument("--seconds", type=float, default=6.0)
parser.add_argument("--artifact-mb", type=float, default=0)
parser.add_argument("--workdir", default=".")
args = parser.parse_args()

track_param("seed", 7)
evaluation = Evaluation(f"resume-{args.name}", description="streams across daemon restarts")
with evaluation.add_chain("chain") as chain:
    track_param("attack.eps", 0.03)
digest = None
with evaluation.run():
    with chain.run():
        chain.log_param("batch_size", 16)
        chain.set_tag("phase", "streaming")
        pause = args.seconds / max(1, args.points // 100)
        for step in range(args.points):
            chain.log_metric("loss", 1.0 / (step + 1), step=step)
            if step % 100 == 99:
                time.sleep(pause)
        if args.artifact_mb:
            path = os.path.join(args.workdir, f"{args.name}.bin")
            data = os.urandom(int(args.artifact_mb * (1 << 20)))
            with open(path, "wb") as f:
                f.write(data)
            digest = hashlib.sha256(data).hexdigest()
            chain.log_artifact(path)
            os.unlink(path)
        chain.log_metric("done", 1.0)
print(json.dumps({"parent": evaluation.run_id, "chain": chain.run_id, "sha256": digest}), flush=True)
sys.exit(0)
