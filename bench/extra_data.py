"""Benchmark: does another labelled dataset in every training fold help (`folds --extra-data`)?

    python bench/extra_data.py [--models small:32] [--epochs 12] [--k 5] [--color-constancy shades-of-gray] [--run runs/bench_extra_data]

HAM10000 (../shared/data/ham10000) k-fold, one recipe, twice: without and with the isic9 images that
are not HAM10000's as extra training data. To keep an external check, those isic9 images (not in
HAM10000 by id or perceptual hash, `external.external_set`) are split, stratified by class with a
fixed seed, into an extra-training half and an external half that neither arm trains on. Each arm runs
folds -> train-cnns (diagnosis head) -> stack -> export, then `validate` on the external half (with
the ISIC 2019 metadata joined, as bench/external.py does). Writes bench/results/extra_data.json:
`without_extra` and `with_extra`, each with `cv_mel_auc` and `external_mel_auc` (the stack's; the CNN's
alone under `*_cnn`) and `cv_balanced_accuracy` (the CNN's 7-class, prior-adjusted argmax), the
extra-data counts, and each arm's seconds. Target (issue 29): extra data raises the external AUC.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from common import cnn_bench_parser, provenance, run_cli_steps, trained_with  # noqa: E402
from external import SHARED, external_set  # noqa: E402

from metadata.dataset import load_dataset  # noqa: E402
from rundir.io import write_json  # noqa: E402


def isic9_halves(isic9: Path, ham: pd.DataFrame, out: Path, seed: int) -> dict[str, object]:
    """The isic9 images not in HAM10000 (`external.external_set`), each class's split half into OUT/extra and half
    into OUT/external (class folders of links), seeded: the same halves for every benchmark with the same seed."""
    shutil.rmtree(out, ignore_errors=True)
    exclusions = external_set(isic9, ham, out / "all")
    rng = np.random.default_rng(seed)
    counts = {"extra": 0, "external": 0}
    for class_dir in sorted((out / "all" / "Train").iterdir()):
        images = sorted(class_dir.glob("*.jpg"))
        order = rng.permutation(len(images))
        for rank, index in enumerate(order):
            half = "extra" if rank % 2 == 0 else "external"
            link = out / half / "Train" / class_dir.name / images[index].name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(images[index].resolve())
            counts[half] += 1
    return {"isic9_not_in_ham10000": exclusions, "halves": counts}


def arm(args, name: str, extra: Path | None, external: Path) -> dict[str, object]:  # noqa: ANN001
    """One arm: train, export, validate on the external half; its figures."""
    run = args.run / name
    for refitted in ("bundle", "validation"):  # the stack is refitted below (finished CNN pairs are kept): export and validate afresh
        shutil.rmtree(run / refitted, ignore_errors=True)
    common = ["--data", str(args.data), "--run", str(run)]
    folds = ["folds", *common, "--k", str(args.k), *(["--extra-data", f"{extra},format=class-folders"] if extra else [])]
    seconds = run_cli_steps([
        folds,
        ["train-cnns", *common, "--models", args.models, "--epochs", str(args.epochs), "--target", "diagnosis", "--class-weight", "none",
         "--color-constancy", args.color_constancy, "--seed", str(args.seed)],
        ["stack", *common, "--seed", str(args.seed)],
        ["report", *common, "--bootstrap", "200"],
        ["export", "--run", str(run), "--out", str(run / "bundle")],
        ["validate", "--bundle", str(run / "bundle"), "--data", str(external), "--metadata", str(args.isic2019_metadata),
         "--metadata-mode", "as-given", "--out", str(run / "validation")],
    ])
    report = json.loads((run / "report.json").read_text())
    entries = {e["name"]: e for e in report["entries"]}
    cnn = next(e for e in report["entries"] if e["kind"] == "cnn")
    multiclass = {e["name"]: e for e in report["multiclass"]}
    validation = json.loads((run / "validation" / "validation.json").read_text())
    return {
        "cv_mel_auc": entries["lightgbm_stack"]["auc"],
        "cv_mel_auc_ci": entries["lightgbm_stack"]["auc_ci"],
        "cv_mel_auc_cnn": cnn["auc"],
        "external_mel_auc": validation["mel_auc"],
        "external_mel_auc_ci": validation["mel_auc_ci"],
        "external_mel_auc_cnn": validation["mel_auc_cnn_only"],
        "cv_balanced_accuracy": multiclass[cnn["name"]]["balanced_accuracy"],
        "external_images": validation["n_images"],
        "external_melanomas": validation["n_melanoma"],
        "extra_data": report.get("extra_data"),
        "trained_with": trained_with(run / "cnn" / cnn["name"]),
        "seconds": seconds,
    }


def main() -> None:
    parser = cnn_bench_parser(__doc__.splitlines()[0], "ham10000")
    parser.set_defaults(run=ROOT / "runs" / "bench_extra_data", models="small:32", epochs=12, k=5, color_constancy="shades-of-gray")
    parser.add_argument("--isic9", type=Path, default=SHARED / "isic9")
    parser.add_argument("--isic2019-metadata", type=Path, default=SHARED / "isic2019" / "ISIC_2019_Training_Metadata.csv")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    halves = args.run / "isic9_halves"
    split = isic9_halves(args.isic9, load_dataset(args.data).table, halves, args.seed)
    classes = pd.Series([p.parent.name for p in (halves / "external" / "Train").glob("*/*.jpg")]).value_counts().to_dict()
    arms = {
        "without_extra": arm(args, "without_extra", None, halves / "external"),
        "with_extra": arm(args, "with_extra", halves / "extra", halves / "external"),
    }
    result = {
        **provenance(),
        "recipe": {"models": args.models, "epochs": args.epochs, "k": args.k, "target": "diagnosis", "color_constancy": args.color_constancy, "seed": args.seed},
        **split,
        "external_classes": classes,
        **arms,
        "targets": {"extra_data_raises_external_auc": arms["with_extra"]["external_mel_auc"] > arms["without_extra"]["external_mel_auc"]},
    }
    write_json(result, ROOT / "bench" / "results" / "extra_data.json")
    for name in arms:
        a = arms[name]
        print(f"{name}: CV AUC stack {a['cv_mel_auc']:.3f} (CNN {a['cv_mel_auc_cnn']:.3f}), external AUC stack {a['external_mel_auc']:.3f} "
              f"(CNN {a['external_mel_auc_cnn']:.3f}), 7-class balanced accuracy {a['cv_balanced_accuracy']:.3f}")


if __name__ == "__main__":
    main()
