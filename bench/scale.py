"""Benchmark: the pipeline at competition scale, on synthetic ISIC 2024 cohorts, in bounded memory.

    python bench/scale.py [--sizes 10000,50000,200000] [--image-size 64] [--root runs/bench_scale]

For each size N (training images): `synth --layout isic2024 --train-images N`, `folds`, `train-cnns` on
fold 0 for 1 epoch of `small` with `--negatives-per-patient 50` and without, `stack` (no CNN:
metadata, `tbp_lv_*` columns and patient context; it writes the report), `report` again alone, and
`predict` on the test split with one bundle trained (every fold, 1 epoch) on the smallest cohort. Every stage runs in its own process;
its peak RSS is the largest sum of RSS over the process and its children, sampled every 0.2 s.
Writes bench/results/scale.json: `records`, a list of {n_images, stage, seconds, peak_rss_mb,
images_per_second}, and the issue's ratios. Targets (issue 14): train-cnns peak RSS at the largest N
at most 1.25x its value at the smallest and under 4 GB; training images/s at the largest N at least
0.9x the rate at the smallest; stack + report at the largest N under 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import provenance  # noqa: E402

from rundir.io import write_json  # noqa: E402


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run `python cli.py COMMAND...`; its wall seconds and the peak RSS (MB) of its process tree."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "cli.py", *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-4000:]}")
    return time.perf_counter() - started, peak / 1e6


def training_rate(run: Path) -> float:
    """Training images per second of the trained pair (`history.json`: its epochs, validation passes included)."""
    return json.loads((run / "cnn" / "small" / "fold0" / "history.json").read_text())["sampling"]["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "bench_scale")
    parser.add_argument("--fresh", action="store_true", help="delete --root first")
    parser.add_argument("--result", default="scale.json")
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(args.root, ignore_errors=True)
    records = []
    result = ROOT / "bench" / "results" / args.result  # rewritten after every stage, so a cut-short run keeps its records

    def record(n: int, stage: str, command: list[str], images: int | None = None) -> dict:
        seconds, rss = run_measured(command)
        entry = {"n_images": n, "stage": stage, "seconds": round(seconds, 1), "peak_rss_mb": round(rss, 1),
                 "images_per_second": round((images if images is not None else n) / seconds, 1)}
        records.append(entry)
        print(json.dumps(entry), flush=True)
        write_json({**provenance(), "image_size": args.image_size, "k": args.k, "complete": False, "records": records}, result)
        return entry

    sizes = [int(s) for s in args.sizes.split(",")]
    bundle = args.root / "bundle"
    for n in sizes:
        data, base = args.root / f"data_{n}", args.root / f"run_{n}"
        record(n, "synth", ["synth", "--out", str(data), "--layout", "isic2024", "--train-images", str(n), "--image-size",
                            str(args.image_size), "--prevalence", "0.01", "--seed", "0"])
        record(n, "folds", ["folds", "--data", str(data), "--run", str(base), "--k", str(args.k)])
        for sampled in (False, True):
            run = _with_folds(args.root / f"run_{n}_{'neg50' if sampled else 'all'}", base)
            options = ["--negatives-per-patient", "50"] if sampled else []
            entry = record(n, "train-cnns" + (" --negatives-per-patient 50" if sampled else ""), [
                "train-cnns", "--data", str(data), "--run", str(run), "--models", f"small:{args.image_size}", "--epochs", "1",
                "--fold", "0", "--target", "mel", *options,
            ])
            entry["training_images_per_second"] = round(training_rate(run), 1)
        # the stack and report at N rows: metadata, tbp_lv_* columns and patient context, no CNN (a CNN
        # stack needs every fold trained, hours at the larger sizes on 2 cores)
        record(n, "stack", ["stack", "--data", str(data), "--run", str(base)])
        record(n, "report", ["report", "--run", str(base), "--data", str(data)])
        if n == sizes[0]:  # one bundle (every fold, 1 epoch, negatives sampled) scores every size's test split
            run = _with_folds(args.root / f"run_{n}_bundle", base)
            shutil.rmtree(bundle, ignore_errors=True)
            for step in (["train-cnns", "--data", str(data), "--run", str(run), "--models", f"small:{args.image_size}",
                          "--epochs", "1", "--target", "mel", "--negatives-per-patient", "50"],
                         ["stack", "--data", str(data), "--run", str(run)], ["export", "--run", str(run), "--out", str(bundle)]):
                run_measured(step)
        test_images = len(pd.read_csv(data / "test-metadata.csv", usecols=["isic_id"]))
        record(n, "predict", ["predict", "--bundle", str(bundle), "--data", str(data), "--split", "test", "--out", str(base / "predict")], test_images)

    by = {(r["n_images"], r["stage"]): r for r in records}
    sizes = sorted({r["n_images"] for r in records})
    small, large = sizes[0], sizes[-1]
    ratios = {
        "train_rss_largest_over_smallest": by[(large, "train-cnns")]["peak_rss_mb"] / by[(small, "train-cnns")]["peak_rss_mb"],
        "train_rss_largest_mb": by[(large, "train-cnns")]["peak_rss_mb"],
        "train_rate_largest_over_smallest": by[(large, "train-cnns")]["training_images_per_second"]
        / by[(small, "train-cnns")]["training_images_per_second"],
        "stack_plus_report_seconds_largest": by[(large, "stack")]["seconds"] + by[(large, "report")]["seconds"],
    }
    targets = {
        "train_rss_ratio_at_most_1.25": ratios["train_rss_largest_over_smallest"] <= 1.25,
        "train_rss_under_4gb": ratios["train_rss_largest_mb"] < 4000,
        "train_rate_ratio_at_least_0.9": ratios["train_rate_largest_over_smallest"] >= 0.9,
        "stack_plus_report_under_600s": ratios["stack_plus_report_seconds_largest"] < 600,
    }
    path = write_json({**provenance(), "image_size": args.image_size, "k": args.k, "complete": True, "records": records,
                       "ratios": ratios, "targets_met": targets}, result)
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    print(f"targets met: {targets}\nwrote {path}")


def _with_folds(run: Path, base: Path) -> Path:
    """A fresh run directory holding the folds of `base` (so every run of one size shares its folds)."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shutil.copyfile(base / "folds.parquet", run / "folds.parquet")
    return run


if __name__ == "__main__":
    main()
