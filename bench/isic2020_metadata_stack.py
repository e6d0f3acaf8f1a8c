"""Benchmark: the stack with zero CNNs (metadata + patient context) on the real ISIC 2020 metadata.

    python bench/isic2020_metadata_stack.py [--data ../shared/data/isic2020] [--run runs/bench_isic2020]

5 patient-grouped folds; prints and writes bench/results/isic2020_metadata_stack.json. Reference:
a simple LightGBM with age/sex/site and 5 patient-context features reaches 0.756 CV AUC.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import provenance, run_cli_steps  # noqa: E402

from ensemble.report import read_report  # noqa: E402
from fusion.stack_model import StackModel  # noqa: E402
from rundir.io import write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "isic2020")
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench_isic2020")
    args = parser.parse_args()
    common_args = ["--data", str(args.data), "--run", str(args.run)]
    seconds = sum(run_cli_steps([["folds", *common_args, "--k", "5"], ["stack", *common_args]]).values())
    report = read_report(args.run)
    features = StackModel.load(args.run / "stack").features
    stack = next(e for e in report["entries"] if e["name"] == "lightgbm_stack")
    result = {
        **provenance(),
        "data": str(args.data),
        "n_images": report["n_images"],
        "n_melanoma": report["n_melanoma"],
        "features": features,
        "cv_auc": stack["auc"],
        "pauc_80tpr": stack["pauc_80tpr"],
        "fold_auc": stack["fold_auc"],
        "wall_seconds_folds_plus_stack": round(seconds, 1),
        "reference_auc": 0.756,
    }
    write_json(result, ROOT / "bench" / "results" / "isic2020_metadata_stack.json")
    print(f"ISIC 2020 metadata-only stack: CV AUC {stack['auc']:.4f} (pAUC {stack['pauc_80tpr']:.4f}), "
          f"folds {', '.join(f'{a:.3f}' for a in stack['fold_auc'])}; {seconds:.0f} s")


if __name__ == "__main__":
    main()
