"""The seeds' flow, unchanged MLflow code, through armoryd (run with MLFLOW_TRACKING_URI=armoryd://).

An evaluation runs (here with armory_track); afterwards plain MLflow resumes one of its chain runs
by id to add a metric and a folder of artifacts, exactly as Armory's documentation shows.
"""
import os
import tempfile

import mlflow

from armory_track import Evaluation


def main() -> None:
    evaluation = Evaluation("armory-example-resume", description="An evaluation resumed with MLflow's own API")
    with evaluation.add_chain("benign") as chain:
        pass
    with evaluation.run(), chain.run():
        chain.log_metric("accuracy", 0.91)

    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "report.txt"), "w") as f:
            f.write("extra results\n")
        # Unchanged MLflow code (the seeds' example):
        with mlflow.start_run(run_id=chain.run_id):
            mlflow.log_metric("custom_metric", 42)
            mlflow.log_artifacts(directory)

    run = mlflow.MlflowClient().get_run(chain.run_id)
    print(f"resumed run {chain.run_id}: metrics {dict(sorted(run.data.metrics.items()))}")


if __name__ == "__main__":
    main()
