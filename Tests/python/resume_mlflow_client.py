"""Unchanged MLflow code through `armoryd://` for the resumable-session tests: a run that logs
`--points` metric points paced over about `--seconds`; prints its run id as JSON."""
import argparse
import json
import time

import mlflow

parser = argparse.ArgumentParser()
parser.add_argument("--name", required=True)
parser.add_argument("--points", type=int, default=20000)
parser.add_argument("--seconds", type=float, default=6.0)
args = parser.parse_args()

mlflow.set_experiment(f"resume-mlflow-{args.name}")
client = mlflow.MlflowClient()
with mlflow.start_run() as run:
    mlflow.log_param("batch_size", 16)
    pause = args.seconds / max(1, args.points // 100)
    for step in range(args.points):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
        if step % 100 == 99:
            time.sleep(pause)
print(json.dumps({"run": run.info.run_id}), flush=True)
