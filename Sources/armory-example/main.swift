import ArmoryProtocol
import ArmoryTrack
import Foundation

// armory-example: a two-chain Armory evaluation through armoryd, as an Armory user writes it.
// A dataset shared by both chains (tracked in `autotrack`), a model per chain with its own
// params, per-chain metrics and exports, one global param. Prints every run id.
// `--points N --seconds S`: each chain logs N loss points paced over about S seconds (default 100
// points at once), e.g. to stream across a daemon restart.

struct Dataset {
    let name: String
    let batches: Int
}
struct Model {
    let name: String
    let weights: String
}
struct Attack { let epsilon: Double }

func loadDataset(split: String, batchSize: Int) -> Dataset { Dataset(name: "cifar10-\(split)", batches: 100) }
func loadModel(name: String, weights: String) -> Model { Model(name: name, weights: weights) }

/// The value after `flag` on the command line, if any.
func option(_ flag: String) -> Double? {
    let arguments = CommandLine.arguments
    guard let index = arguments.firstIndex(of: flag), index + 1 < arguments.count else { return nil }
    return Double(arguments[index + 1])
}
let points = Int(option("--points") ?? 100)
let pausePerHundred = (option("--seconds") ?? 0) / Double(max(1, points / 100))

let tracker: Tracker
do {
    tracker = try Tracker()
} catch {
    FileHandle.standardError.write(Data("armory-example: \(error)\n".utf8))
    exit(3)
}

do {
    tracker.trackParam("seed", 42)

    let evaluation = tracker.evaluation("armory-example", description: "Example two-chain evaluation through armoryd")
    let dataset = evaluation.autotrack { track in
        track.trackable(
            track.trackCall("load_dataset", ["split": "test", "batch_size": 16]) {
                loadDataset(split: "test", batchSize: 16)
            })
    }
    evaluation.useDataset(dataset)

    evaluation.addChain("benign") { chain in
        chain.useModel(
            chain.trackable(
                chain.trackCall("load_model", ["name": "resnet18", "weights": "imagenet"]) {
                    loadModel(name: "resnet18", weights: "imagenet")
                }))
    }
    evaluation.addChain("attacked") { chain in
        chain.useModel(
            chain.trackable(
                chain.trackCall("load_model", ["name": "resnet18", "weights": "robust-l2"]) {
                    loadModel(name: "resnet18", weights: "robust-l2")
                }))
        chain.addPerturbation(chain.trackable(chain.trackInit(Attack.self, ["epsilon": 0.031]) { Attack(epsilon: 0.031) }))
    }

    try evaluation.run { evaluation in
        for (name, chain) in evaluation.chains.sorted(by: { $0.key > $1.key }) {
            let accuracy = name == "benign" ? 0.91 : 0.37
            try chain.run { run in
                for step in 0..<points {
                    run.logMetric("loss", 2.0 * exp(-Double(step) / (name == "benign" ? 20 : 35)) + 0.05, step: Int64(step))
                    if step % 100 == 99 && pausePerHundred > 0 { Thread.sleep(forTimeInterval: pausePerHundred) }
                }
                run.logMetric("accuracy", accuracy)
                try run.logJSON(.object(["value": .double(accuracy)]), artifactFile: "metrics/accuracy.txt")
                let noise = name == "attacked"
                let png = PNG.grayscale(width: 32, height: 32) { x, y in
                    UInt8(truncatingIfNeeded: (x * 8 + y * 4) + (noise ? (x * y * 37) % 23 : 0))
                }
                try run.logBytes(png, artifactFile: "exports/00000/00/input.png")
            }
        }
    }

    // On a server, run ids exist once it has created the runs: wait for them (bounded).
    let parentID = try evaluation.run?.resolveRunID() ?? "?"
    print("evaluation \(evaluation.name): parent run \(parentID)")
    for name in ["benign", "attacked"] {
        print("  chain \(name): run \(try evaluation.chains[name]?.run?.resolveRunID() ?? "?")")
    }
} catch {
    FileHandle.standardError.write(Data("armory-example: \(error)\n".utf8))
    exit(1)
}
