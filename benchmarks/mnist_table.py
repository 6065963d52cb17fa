"""The README's MNIST table, from the metrics.json files that mnist_twinflow.py runs wrote.

    for m in flow rcgm twinflow; do python mnist_twinflow.py --method $m; done
    python benchmarks/mnist_table.py out/mnist_flow out/mnist_rcgm out/mnist_twinflow
"""
import json
import os
import sys


def table(run_dirs):
    runs = [json.load(open(os.path.join(d, "metrics.json"))) for d in run_dirs]
    columns = [k for k in runs[0] if k.startswith("nfe")]
    nfes = [k[3:] for k in columns]
    lines = ["| method | train time | " + " | ".join(f"{n} NFE acc / FD" for n in nfes) + " | FD 1 NFE ÷ FD many |",
             "|---|---|" + "---|" * len(nfes) + "---|"]
    for run in runs:
        cells = [f"{run[k]['accuracy']:.2%} / {run[k]['fd']:.1f}" for k in columns]
        ratio = run[columns[0]]["fd"] / run[columns[-1]]["fd"]
        minutes = run.get("train_seconds", float("nan")) / 60
        lines.append(f"| {run['method']} | {minutes:.1f} min | " + " | ".join(cells) + f" | {ratio:.2f}× |")
    data = runs[0]["data"]
    lines.append(f"| *real digits* | | {data['accuracy']:.2%} / {data['fd']:.1f} (the floor) |" + " |" * len(nfes))
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(table(sys.argv[1:]))
