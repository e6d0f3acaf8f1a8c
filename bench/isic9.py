"""Benchmark: the 9-class "Skin cancer ISIC" set: train on Train/, evaluate on Test/.

    python bench/isic9.py [--models small:64] [--epochs 12] [--k 5]

The CNNs are trained with patient/duplicate-grouped CV on Train/ (diagnosis head); the Test/
images are scored by the mean of the fold models. Reports multi-class accuracy and balanced
accuracy (the unified vocabulary merges "seborrheic keratosis" and "pigmented benign keratosis"
into BKL, so 8 classes), melanoma AUC and the confusion matrix, on all 118 test images and on
those without an exact or near duplicate in Train/ (the published set ships some in both).
Writes bench/results/isic9.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from common import cnn_bench_parser, provenance, run_cli_steps  # noqa: E402
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix  # noqa: E402

from evaluation.metrics import roc_auc  # noqa: E402
from metadata.dataset import load_dataset  # noqa: E402
from metadata.inspect import inspect_dataset  # noqa: E402
from rundir.io import write_json  # noqa: E402


def scores(truth: np.ndarray, test: pd.DataFrame, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, melanoma AUC and confusion matrix of the argmax prediction."""
    predicted = np.array(classes)[test[[f"prob_{c}" for c in classes]].to_numpy().argmax(axis=1)]
    return {
        "n_images": int(len(test)),
        "accuracy": float(accuracy_score(truth, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
        "melanoma_auc": roc_auc((truth == "MEL").astype(int), test["prob"].to_numpy()),
        "confusion_matrix": {"labels": classes, "rows_true_cols_pred": confusion_matrix(truth, predicted, labels=classes).tolist()},
    }


def main() -> None:
    parser = cnn_bench_parser(__doc__.splitlines()[0], "isic9")
    args = parser.parse_args()
    common = ["--data", str(args.data), "--run", str(args.run)]
    steps = [["folds", *common, "--k", str(args.k)],
             ["train-cnns", *common, "--models", args.models, "--epochs", str(args.epochs), "--target", "diagnosis"]]
    seconds = sum(run_cli_steps(steps).values())
    table = load_dataset(args.data).table.set_index("image_id")
    pairs = pd.DataFrame(inspect_dataset(args.data)["duplicate_pairs"]["across_train_test"])
    leaked = set(pairs["image_id_a"]) | set(pairs["image_id_b"]) if len(pairs) else set()
    results = {}
    for name in args.models.split(","):
        model = name.split(":")[0]
        test = pd.read_parquet(args.run / "cnn" / model / "test.parquet")
        classes = [c.removeprefix("prob_") for c in test.columns if c.startswith("prob_") and not c.startswith("prob_fold")]
        truth = table["diagnosis"].reindex(test["image_id"]).astype(str).to_numpy()
        clean = ~test["image_id"].isin(leaked).to_numpy()
        results[model] = {"all_test": scores(truth, test, classes), "test_without_train_duplicates": scores(truth[clean], test[clean], classes)}
        print(f"{model}: accuracy {results[model]['all_test']['accuracy']:.3f}, balanced accuracy "
              f"{results[model]['all_test']['balanced_accuracy']:.3f}, melanoma AUC {results[model]['all_test']['melanoma_auc']:.3f} "
              f"(without leaked duplicates: accuracy {results[model]['test_without_train_duplicates']['accuracy']:.3f})")
    write_json({**provenance(), "recipe": {k: str(v) for k, v in vars(args).items()}, "models": results,
                "wall_seconds": round(seconds, 1), "anchor_accuracy": "0.43-0.6 (published custom CNNs)"},
               ROOT / "bench" / "results" / "isic9.json")


if __name__ == "__main__":
    main()
