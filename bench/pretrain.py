"""Benchmark: label efficiency of self-supervised pretraining (`pretrain`, then `--weights BACKBONE`).

    python bench/pretrain.py [--model small:32] [--epochs 12] [--k 5] [--pretrain-epochs 15] [--color-constancy shades-of-gray] [--run runs/bench_pretrain]

Pretrains one backbone (SimCLR) on every shared image, labels ignored: HAM10000 and the isic9 set
(`pretrain --data ham10000 --data isic9`; reused when finished). Then, on HAM10000's k patient-grouped
folds (`folds`), fits the diagnosis-head CNN of one recipe from random init and from the backbone, on
10%, 25% and 100% of each fold's training labels (stratified by diagnosis, seeded; the validation fold
always whole), through `cnn.train.fit_fold` on images decoded once in memory. Per point: the pooled
out-of-fold melanoma AUC and 7-class balanced accuracy (prior-adjusted argmax), and the melanoma AUC
of the fold models' mean on the external half of bench/extra_data.py (isic9 images not in HAM10000,
never trained on). Writes bench/results/pretrain.json. Targets (issue 29): at 10% of the labels the
pretrained init beats random init by >= 0.03 melanoma AUC; at 100% it is not worse.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import provenance, run_cli_steps  # noqa: E402
from external import SHARED  # noqa: E402
from extra_data import isic9_halves  # noqa: E402

from cnn.backbones import parse_model_specs  # noqa: E402
from cnn.options import COLOR_CONSTANCY_CHOICES, CnnConfig  # noqa: E402
from cnn.pipeline import decoded_store, predict_tta  # noqa: E402
from cnn.targets import TargetSpec  # noqa: E402
from cnn.train import array_fold_inputs, fit_fold  # noqa: E402
from evaluation.metrics import multiclass_summary, roc_auc  # noqa: E402
from metadata.dataset import load_dataset  # noqa: E402
from metadata.folds import attach_folds  # noqa: E402
from rundir.io import read_table, write_json  # noqa: E402

FRACTIONS = (0.1, 0.25, 1.0)


def labelled_subset(train: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """`fraction` of the rows of each diagnosis (at least one), seeded."""
    if fraction >= 1:
        return train
    diagnosis = train["diagnosis"].astype(str)
    order = pd.Series(np.random.default_rng(seed).random(len(train)), index=train.index).groupby(diagnosis).rank(method="first")
    wanted = np.maximum(1, (diagnosis.map(diagnosis.value_counts()) * fraction).round())
    return train[order <= wanted]


def fit_point(images: np.ndarray, rows: pd.DataFrame, external: np.ndarray, *, model: str, config: CnnConfig, spec: TargetSpec, fraction: float) -> dict:
    """Every fold fitted on `fraction` of its training labels: pooled OOF probabilities, training priors, external mean."""
    oof, priors, external_probs, seconds = np.zeros((len(rows), spec.n_outputs)), np.zeros((len(rows), spec.n_outputs)), [], []
    for fold in sorted(int(f) for f in rows["fold"].unique()):  # Python ints: keras seeds refuse numpy ones
        started = time.perf_counter()
        keras.utils.set_random_seed(config.seed + fold)
        tf.random.set_global_generator(tf.random.Generator.from_seed(config.seed + fold))
        held_out = (rows["fold"] == fold).to_numpy()
        train = labelled_subset(rows[~held_out], fraction, config.seed + fold)
        y_train = spec.labels(train)
        inputs = array_fold_inputs(images[train.index.to_numpy()], y_train, images[held_out], config=config, fold=fold, test_images=external)
        fitted = fit_fold(model, inputs, rows.loc[held_out, "target"].to_numpy(np.float32), config=config, target=spec, fold=fold)
        oof[held_out] = predict_tta(fitted.model, inputs.val, config.tta)
        priors[held_out] = spec.training_prior(y_train, config.class_weight)
        external_probs.append(predict_tta(fitted.model, inputs.test, config.tta))
        seconds.append(round(time.perf_counter() - started, 1))
    return {"oof": oof, "priors": priors, "external": np.mean(external_probs, axis=0), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ham10000", type=Path, default=SHARED / "ham10000")
    parser.add_argument("--isic9", type=Path, default=SHARED / "isic9")
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench_pretrain")
    parser.add_argument("--model", default="small:32")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--pretrain-batch-size", type=int, default=128)
    parser.add_argument("--color-constancy", default="shades-of-gray", choices=COLOR_CONSTANCY_CHOICES, help="for pretraining and fine-tuning alike")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ((model, size),) = parse_model_specs(args.model, 32).items()
    backbone = args.run / "backbone"
    seconds = run_cli_steps([
        ["pretrain", "--data", str(args.ham10000), "--data", f"{args.isic9},format=class-folders", "--model", args.model, "--out", str(backbone),
         "--epochs", str(args.pretrain_epochs), "--batch-size", str(args.pretrain_batch_size), "--seed", str(args.seed),
         "--color-constancy", args.color_constancy],
        *([] if (args.run / "folds.parquet").exists() else [["folds", "--data", str(args.ham10000), "--run", str(args.run), "--k", str(args.k), "--seed", str(args.seed)]]),
    ])
    table = load_dataset(args.ham10000).table
    rows = attach_folds(table, read_table(args.run / "folds.parquet", "folds"), "folds").reset_index(drop=True)
    halves = isic9_halves(args.isic9, table, args.run / "isic9_halves", args.seed)
    external_files = sorted((args.run / "isic9_halves" / "external" / "Train").glob("*/*.jpg"))
    external_mel = np.array([f.parent.name == "melanoma" for f in external_files], dtype=int)
    images = decoded_store(rows["image_path"].astype(str).tolist(), size, color_constancy=args.color_constancy)
    external = decoded_store([str(f) for f in external_files], size, color_constancy=args.color_constancy)
    spec = TargetSpec(tuple(c for c in ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC") if c in set(rows["diagnosis"].astype(str))))
    points = []
    for init in ("random", "pretrained"):
        config = CnnConfig(image_size=size, epochs=args.epochs, seed=args.seed, target="diagnosis", class_weight="none", color_constancy=args.color_constancy,
                           weights=str(backbone) if init == "pretrained" else "none")
        for fraction in FRACTIONS:
            fitted = fit_point(images, rows, external, model=model, config=config, spec=spec, fraction=fraction)
            mel = list(spec.classes).index("MEL")
            summary = multiclass_summary(rows["diagnosis"].astype(str).to_numpy(), fitted["oof"], list(spec.classes), fitted["priors"])
            point = {"init": init, "label_fraction": fraction, "cv_mel_auc": roc_auc(rows["target"].to_numpy(), fitted["oof"][:, mel]),
                     "cv_balanced_accuracy": summary["balanced_accuracy"], "external_mel_auc": roc_auc(external_mel, fitted["external"][:, mel]),
                     "fold_seconds": fitted["seconds"]}
            points.append(point)
            print(json.dumps(point))
    by = {(p["init"], p["label_fraction"]): p for p in points}
    gain = {f: by[("pretrained", f)]["cv_mel_auc"] - by[("random", f)]["cv_mel_auc"] for f in FRACTIONS}
    result = {
        **provenance(),
        "recipe": {"model": args.model, "epochs": args.epochs, "k": args.k, "target": "diagnosis", "augment": "light", "class_weight": "none",
                   "batch_size": CnnConfig().batch_size, "learning_rate": CnnConfig().learning_rate, "color_constancy": args.color_constancy, "seed": args.seed},
        "pretraining": {k: v for k, v in json.loads((backbone / "backbone.json").read_text()).items() if k != "versions"},
        "external_half": {**halves, "melanomas": int(external_mel.sum())},
        "points": points,
        "pretrained_minus_random_cv_mel_auc": {str(f): g for f, g in gain.items()},
        "targets": {"gain_at_10_percent_at_least_0.03": gain[0.1] >= 0.03, "not_worse_at_100_percent": gain[1.0] >= 0},
        "seconds": seconds,
    }
    write_json(result, ROOT / "bench" / "results" / "pretrain.json")


if __name__ == "__main__":
    main()
