"""Benchmark: wall time and CV figures of `python cli.py demo` (the synthetic end-to-end run).

    python bench/demo.py [--out runs/bench_demo]

Runs the demo in a fresh process (TensorFlow start-up included) and writes
bench/results/demo.json with every model's OOF AUC, the stack's, and the wall time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import provenance  # noqa: E402

from ensemble.report import read_report  # noqa: E402
from rundir.io import write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_demo")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "cli.py", "demo", "--out", str(args.out)], cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    report = read_report(args.out)
    result = {
        **provenance(),
        "wall_seconds": round(seconds, 1),
        "n_images": report["n_images"],
        "n_melanoma": report["n_melanoma"],
        "entries": report["entries"],
    }
    write_json(result, ROOT / "bench" / "results" / "demo.json")
    print(f"demo: {seconds:.0f} s; " + ", ".join(f"{e['name']} AUC {e['auc']:.3f}" for e in report["entries"]))


if __name__ == "__main__":
    main()
