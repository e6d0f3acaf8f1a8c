"""Benchmark: 5-fold CV on the real HAM10000 images (5,984 at 128 px, 7 diagnoses), from scratch.

    python bench/ham10000_cv.py [--models small:64] [--epochs 12] [--k 5] [--augment light]

Runs folds -> train-cnns (diagnosis head) -> stack -> report through the CLI and writes
bench/results/ham10000_cv.json: melanoma-vs-rest OOF AUC of each CNN and of the stack, and each
CNN's 7-class balanced accuracy (argmax of its OOF class probabilities). Targets (issue 4): best
CNN >= 0.92 AUC, stack >= 0.93, balanced accuracy >= 0.65.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import pandas as pd  # noqa: E402
from sklearn.metrics import balanced_accuracy_score  # noqa: E402

from metadata.dataset import load_dataset  # noqa: E402
from metadata.io import write_json  # noqa: E402
from common import cnn_bench_parser, provenance, run_cli_steps  # noqa: E402


def balanced_accuracy(oof: pd.DataFrame, diagnosis: pd.Series) -> float:
    """7-class balanced accuracy of the argmax over the OOF `prob_<CLASS>` columns."""
    class_columns = [c for c in oof.columns if c.startswith("prob_")]
    predicted = oof[class_columns].to_numpy().argmax(axis=1)
    names = [c.removeprefix("prob_") for c in class_columns]
    truth = diagnosis.reindex(oof["image_id"]).astype(str).to_numpy()
    return float(balanced_accuracy_score(truth, [names[i] for i in predicted]))


def main() -> None:
    parser = cnn_bench_parser(__doc__.splitlines()[0], "ham10000")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--augment", default="light")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    args = parser.parse_args()
    common = ["--data", str(args.data), "--run", str(args.run)]
    steps = [
        ["folds", *common, "--k", str(args.k)],
        ["train-cnns", *common, "--models", args.models, "--epochs", str(args.epochs), "--target", "diagnosis",
         "--batch-size", str(args.batch_size), "--augment", args.augment, "--learning-rate", str(args.learning_rate)],
        ["stack", *common],
    ]
    seconds = run_cli_steps(steps)
    report = json.loads((args.run / "report.json").read_text())
    diagnosis = load_dataset(args.data).table.set_index("image_id")["diagnosis"]
    cnns = {}
    for entry in report["entries"]:
        if entry["kind"] == "cnn":
            oof = pd.read_parquet(args.run / "cnn" / entry["name"] / "oof.parquet")
            histories = sorted((args.run / "cnn" / entry["name"]).glob("fold*/history.json"))
            cnns[entry["name"]] = {"mel_auc": entry["auc"], "auc_ci": entry["auc_ci"], "fold_auc": entry["fold_auc"],
                                   "balanced_accuracy_7class": balanced_accuracy(oof, diagnosis),
                                   # from each fold's own history, so a resumed run still reports its training time
                                   "fold_train_seconds": [round(json.loads(h.read_text())["seconds"]) for h in histories]}
    stacks = {e["name"]: e for e in report["entries"] if e["kind"] == "stack"}
    stack = stacks["lightgbm_stack"]
    result = {
        **provenance(),
        "recipe": {k: v for k, v in vars(args).items() if k not in ("data", "run")},
        "n_images": report["n_images"],
        "n_melanoma": report["n_melanoma"],
        "cnns": cnns,
        "stack": {"mel_auc": stack["auc"], "auc_ci": stack["auc_ci"], "fold_auc": stack["fold_auc"],
                  "pauc_80tpr": stack["pauc_80tpr"]},
        "logreg_stack_mel_auc": stacks["logreg_stack"]["auc"],
        "stack_vs_best_cnn": report["stack_vs_best_cnn"],
        "wall_seconds": seconds,
        "targets": {"best_cnn_auc": 0.92, "stack_auc": 0.93, "balanced_accuracy": 0.65},
    }
    write_json(result, ROOT / "bench" / "results" / "ham10000_cv.json")
    for name, figures in cnns.items():
        print(f"{name}: melanoma AUC {figures['mel_auc']:.4f}, 7-class balanced accuracy "
              f"{figures['balanced_accuracy_7class']:.4f}")
    print(f"stack: melanoma AUC {stack['auc']:.4f}; wall time {seconds}")


if __name__ == "__main__":
    main()
