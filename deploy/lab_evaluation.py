"""An evaluation as a lab host runs it, for the lab test bed and its benchmark: one experiment,
a parent run and `--chains` nested chain runs, each with a param, a tag, `--steps` steps of
`--keys` metrics (every value distinct, so a lost or doubled point shows) and a small artifact.

    ARMORY_SOCKET=… python deploy/lab_evaluation.py --experiment lab --label host0-eval0

`--start-at` (epoch seconds) holds the work until that moment, so that many processes begin
together; `--pace` spreads the steps over that many seconds. Prints one line when done:
`done <label>` once the daemon holds every record durably (it uploads on its own).
"""
import argparse
import os
import tempfile
import time

from armory_track import Evaluation


def metric_value(label: str, chain: int, key: int, step: int) -> float:
    """The value of one point, recomputable by a checker."""
    return step + key / 1000 + chain / 1_000_000 + (sum(label.encode()) % 997) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--label", required=True, help="names the chains: <label>-c<i>")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keys", type=int, default=1)
    parser.add_argument("--start-at", type=float, default=0)
    parser.add_argument("--pace", type=float, default=0, help="seconds to spread the steps over")
    parser.add_argument("--no-artifact", action="store_true")
    args = parser.parse_args()

    evaluation = Evaluation(args.experiment, description=f"lab evaluation {args.label}")
    for c in range(args.chains):
        with evaluation.add_chain(f"{args.label}-c{c}"):
            pass
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    with evaluation.run():
        evaluation.start().set_tag("lab.label", args.label)
        for c, chain in enumerate(evaluation.chains.values()):
            with chain.run():
                chain.log_param("host_label", args.label)
                chain.set_tag("lab.chain", str(c))
                for step in range(args.steps):
                    chain.log_metrics({f"m{k}": metric_value(args.label, c, k, step) for k in range(args.keys)}, step=step)
                    if args.pace:
                        time.sleep(args.pace / args.steps / args.chains)
                if not args.no_artifact:
                    with tempfile.TemporaryDirectory() as directory:
                        path = os.path.join(directory, "report.txt")
                        with open(path, "w") as f:
                            f.write(f"{args.label} chain {c}\n" * 100)
                        chain.log_artifact(path, "reports")
    print(f"done {args.label}", flush=True)


if __name__ == "__main__":
    main()
