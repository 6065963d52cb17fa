"""benchmarks/step_cost.py runs and measures every row, on a tiny model."""
import importlib.util
import os
import subprocess
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("step_cost", os.path.join(HERE, "..", "benchmarks", "step_cost.py"))
step_cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_cost)


@pytest.mark.parametrize("model,rows", [("conv", 6), ("mlp", 4), ("unet", 6), ("dit", 6), ("qwen", 6)])  # the MLP has no classes: no κ rows
def test_step_cost_measures_every_row(model, rows, monkeypatch, capsys):
    monkeypatch.setitem(step_cost.imagenet_twinflow.MODELS, "S/2", (1, 32, 2))  # a 1-block DiT, for speed
    results = step_cost.main(["--model", model, "--batch", "8", "--width", "8", "--steps", "1",
                              "--warmup", "0", "--device", "cpu", "--qwen-layers", "1"])
    assert len(results) == rows
    for r in results.values():
        assert r["ms"] > 0 and r["saved_mb"] > 0
    # every printed "× flow" is the row's time and memory over plain, unguided flow matching's
    flow = results[("flow", True, 0.0)]
    printed = {(row[0], row[1] == "split", float(row[2])): row for row in map(str.split, capsys.readouterr().out.splitlines())
               if row and row[0] in ("flow", "rcgm", "twinflow")}
    assert sorted(printed) == sorted(results)
    for key, r in results.items():  # columns: method form kappa ms/step × images/s saved-MB ×
        assert printed[key][3] == f"{r['ms']:.1f}" and printed[key][4] == f"{r['ms'] / flow['ms']:.2f}"
        assert printed[key][5] == f"{8 / r['ms'] * 1000:.1f}"  # batch 8 over the seconds per step
        assert printed[key][6] == f"{r['saved_mb']:.1f}"
        assert printed[key][7] == f"{r['saved_mb'] / flow['saved_mb']:.2f}"
    # The tutorial form runs every part on the whole batch: 4× the samples in the graph, so 4× the
    # activations (the weights are not counted); the split form saves what flow matching saves.
    whole, split = results[("twinflow", False, 0.0)], results[("twinflow", True, 0.0)]
    assert 3.8 < whole["saved_mb"] / split["saved_mb"] < 4.2
    assert split["saved_mb"] < 1.05 * results[("flow", True, 0.0)]["saved_mb"]


def test_a_row_reports_the_median_step(monkeypatch):
    """Timed steps of 100, 3, 1, 50 and 2 s (a clock that says so): the row reports 3 s, which is not
    the first, middle or last step, nor the mean, the minimum or the maximum."""
    durations, now, calls = [100.0, 3.0, 1.0, 50.0, 2.0], [0.0], [0]

    def clock():  # perf_counter is read at the start and at the end of each timed step
        calls[0] += 1
        if calls[0] % 2 == 0:
            now[0] += durations[(calls[0] // 2 - 1) % len(durations)]
        return now[0]
    monkeypatch.setattr(step_cost, "time", types.SimpleNamespace(perf_counter=clock))  # step_cost's clock only
    results = step_cost.main(["--model", "mlp", "--batch", "8", "--width", "8", "--steps", "5",
                              "--warmup", "0", "--device", "cpu"])
    assert [r["ms"] for r in results.values()] == [3000.0] * 4


def test_every_step_cost_command_in_gpu_checks_sh_parses():
    """benchmarks/gpu_checks.sh has never run (no GPU lent yet): its flags must at least still exist."""
    with open(os.path.join(HERE, "..", "benchmarks", "gpu_checks.sh")) as f:
        script = f.read().replace("\\\n", " ")
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0  # the shell syntax
    commands = [line.split("benchmarks/step_cost.py", 1)[1].split() for line in script.splitlines()
                if line.startswith("check python benchmarks/step_cost.py")]
    assert len(commands) >= 2
    for flags in commands:
        step_cost.parser.parse_args(flags)  # an unknown flag or a bad choice exits
