"""The README's MNIST table, from the metrics.json files that mnist_twinflow.py runs wrote.

    for m in flow rcgm twinflow; do python mnist_twinflow.py --method $m; done
    python benchmarks/mnist_table.py out/mnist_flow out/mnist_rcgm out/mnist_twinflow
"""
import argparse
import json
import os

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs", nargs="+", help="--out folders of mnist_twinflow.py runs (each holds metrics.json)")


def load(run_dir):
    path = os.path.join(run_dir, "metrics.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: not a readable metrics.json of mnist_twinflow.py ({e})")


def table(run_dirs):
    runs = [load(d) for d in run_dirs]
    columns = [k for k in runs[0] if k.startswith("nfe")]
    for d, run in zip(run_dirs, runs):
        if [k for k in run if k.startswith("nfe")] != columns:
            raise SystemExit(f"error: {d} was sampled at other NFEs than {run_dirs[0]} (--many-steps?): "
                             f"one table needs the same columns")
    nfes = [k[3:] for k in columns]
    lines = ["| method | train time | " + " | ".join(f"{n} NFE acc / FD" for n in nfes)
             + f" | FD 1 NFE ÷ FD {nfes[-1]} NFE |",
             "|---|---|" + "---|" * len(nfes) + "---|"]
    for run in runs:
        cells = [f"{run[k]['accuracy']:.2%} / {run[k]['fd']:.1f}" for k in columns]
        ratio = run[columns[0]]["fd"] / run[columns[-1]]["fd"]
        # (a run evaluated with --eval from an older checkpoint may not know its training time)
        minutes = f"{run['train_seconds'] / 60:.1f} min" if "train_seconds" in run else "not recorded"
        lines.append(f"| {run['method']} | {minutes} | " + " | ".join(cells) + f" | {ratio:.2f}× |")
    data = runs[0]["data"]
    lines.append(f"| *real digits* | | {data['accuracy']:.2%} / {data['fd']:.1f} (the floor) |" + " |" * len(nfes))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(parser.parse_args().runs))
