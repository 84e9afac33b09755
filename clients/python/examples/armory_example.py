"""An Armory-style evaluation through armoryd, written as an Armory user writes one.

Two chains share a dataset tracked in `autotrack`; each chain has its own model; metrics and
exports are logged per chain. Run it with a daemon listening (`armoryd &`, or `make demo`).
"""
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass

from armory_track import Evaluation, Trackable, track_init_params, track_param, track_params


@dataclass
class Dataset(Trackable):
    name: str
    batch_size: int


@track_init_params
class Classifier(Trackable):
    def __init__(self, name: str, weights: str):
        super().__init__()
        self.name = name
        self.weights = weights


@track_params
def load_dataset(split: str, batch_size: int) -> Dataset:
    return Dataset(name=f"cifar10-{split}", batch_size=batch_size)


@track_init_params
class PGD(Trackable):
    def __init__(self, epsilon: float, steps: int):
        super().__init__()


def png(width: int, height: int, pixel) -> bytes:
    raw = b"".join(b"\0" + bytes(pixel(x, y) for x in range(width)) for y in range(height))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def main() -> None:
    track_param("seed", 42)
    evaluation = Evaluation("armory-example-python", description="The example evaluation, from Python")

    with evaluation.autotrack() as track_call:
        dataset = track_call(load_dataset, split="test", batch_size=16)
    evaluation.use_dataset(dataset)

    with evaluation.add_chain("benign") as chain:
        chain.use_model(chain.track_call(Classifier, name="resnet18", weights="imagenet"))
    with evaluation.add_chain("attacked") as chain:
        chain.use_model(chain.track_call(Classifier, name="resnet18", weights="robust-l2"))
        chain.use_perturbations([chain.track_call(PGD, epsilon=0.031, steps=10)])

    with evaluation.run():
        for name, chain in evaluation.chains.items():
            with chain.run():
                for step in range(100):
                    chain.log_metric("loss", 2.0 * math.exp(-step / (20 if name == "benign" else 35)) + 0.05, step=step)
                accuracy = 0.91 if name == "benign" else 0.37
                chain.log_metric("accuracy", accuracy)
                chain.log_dict({"value": accuracy}, "metrics/accuracy.txt")
                with tempfile.TemporaryDirectory() as directory:
                    path = os.path.join(directory, "input.png")
                    with open(path, "wb") as f:
                        f.write(png(32, 32, lambda x, y: (x * 8 + y * 4) % 256))
                    chain.log_artifact(path, "exports/00000/00")

    print(f"evaluation {evaluation.name}: parent run {evaluation.run_id}")
    for name, chain in evaluation.chains.items():
        print(f"  chain {name}: run {chain.run_id}")


if __name__ == "__main__":
    main()
