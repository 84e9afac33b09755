"""`armory-mlflow-server`: the MLflow UI on the local store (~/.armory/mlruns), as Armory's own."""
import os
import shutil
import sys


def main() -> None:
    args = sys.argv[1:]
    mlflow = shutil.which("mlflow")
    if mlflow is None:
        sys.exit("armory-mlflow-server: the `mlflow` command is not installed here: `pip install mlflow`.")
    if "--backend-store-uri" not in args:
        home = os.environ.get("ARMORY_HOME") or os.path.join(os.path.expanduser("~"), ".armory")
        args += ["--backend-store-uri", "file://" + os.path.join(os.path.abspath(home), "mlruns")]
    if "--host" not in args:
        args += ["--host", "127.0.0.1"]
    if "--port" not in args:
        args += ["--port", "5000"]
    # MLflow 3.13+ refuses its file store unless this is set.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.execv(mlflow, [mlflow, "server", *args])
