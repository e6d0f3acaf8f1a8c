"""The fitted stack model: the one object that turns CNN outputs, metadata and dermoscopy features into
a calibrated melanoma probability and an alert, wherever a lesion is scored.

The scoring sequence is written here once: standardise each CNN's fold-model outputs (`CnnScales`),
build the stack's features (metadata, patient context, image features), average the fold boosters,
choose each missingness pattern's scorer (the stack, or one CNN alone), calibrate per pattern, and
compare with the pattern's alert threshold. The `stack` stage fits it and scores the run's test
rows with it; `export` adds the operating points and puts its files in the bundle; `predict`,
`validate` and the triage service score new patients with the loaded copy.

Fitting follows LightGBM's scikit-learn wrapper: `fit` returns the model, the fitted state is
private, `save`/`load` write and read text files (no pickles). The out-of-fold results of a fit
(`oof_`, `masked_oof_`, `training_features_`) are what the `stack` stage writes.

>>> rng = np.random.default_rng(0)
>>> n = 150
>>> melanoma = rng.random(n) < 0.3
>>> rows = pd.DataFrame({
...     "image_id": [f"i{k}" for k in range(n)], "patient_id": [f"p{k // 3}" for k in range(n)],
...     "age": rng.uniform(20, 80, n).round(), "sex": rng.choice(["female", "male"], n), "site": "torso",
...     "target": melanoma.astype(int), "fold": np.arange(n) % 3})
>>> cnn_oof = {"small": rows[["image_id", "fold"]].assign(prob=np.clip(0.3 * melanoma + 0.7 * rng.random(n), 0.01, 0.99))}
>>> model = StackModel(num_boost_round=20).fit(rows, cnn_oof=cnn_oof)
>>> round(model.oof_auc_, 2)
0.82
>>> new = rows.head(3).drop(columns=["target", "fold"])
>>> cnn_outputs = {"small": pd.DataFrame({f"prob_fold{k}": [0.9, 0.2, 0.5] for k in range(3)})}
>>> model.predict(new, cnn_outputs=cnn_outputs).table["prob"].round(2).tolist()
[0.91, 0.04, 0.25]
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from cnn.outputs import aligned
from errors import DataError, OptionError, RunStateError
from evaluation.metrics import roc_auc
from evaluation.operating_point import OperatingPoint, choose_operating_point
from fusion.cnn_scores import CnnScales
from fusion.image_features.stage import FeatureRecipe
from fusion.missingness import MaskedCopy, PatternCalibration, PlattCalibration, masked_copies, missingness_pattern
from fusion.stacker import LightGBMStacker, build_stack_features, cross_val_stack, default_lgb_params
from rundir.io import atomic_write, write_json
from rundir.layout import StackModelLayout

STATE_FORMAT = "melanoma-pipeline-stack-model"
STATE_VERSION = 1
KEYS = ["image_id", "patient_id", "fold", "target"]  # the bookkeeping columns of OOF tables


@dataclass(frozen=True)
class StackPrediction:
    """What the stack says about a set of rows (all indexed like the rows)."""

    table: pd.DataFrame  # score, prob, pattern, operating_point; alert_threshold and alert once the model has operating points
    cnn_scores: pd.DataFrame  # each CNN's standardised log-odds (`cnn_<name>`)
    absent_features: list[str]  # stack features the rows have no column for (scored as missing)


def masked_oof_table(train: pd.DataFrame, oof_scores: np.ndarray, copies: list[MaskedCopy], masked_scores: dict[str, np.ndarray]) -> pd.DataFrame:
    """OOF scores of every row under every pattern it can take: the rows as given and each masked copy.

    One row per (image, pattern); where two copies give an image the same pattern (a row that already
    lacked a field), the copy built for that pattern wins.
    """
    keys = train[KEYS].reset_index(drop=True)
    parts = [keys.assign(design="complete", pattern=missingness_pattern(train).to_numpy(), score=oof_scores)]
    parts += [keys.assign(design=c.design, pattern=c.pattern.to_numpy(), score=masked_scores[c.design]) for c in copies]
    table = pd.concat(parts, ignore_index=True)
    own = table["design"] == table["pattern"]
    table = table.iloc[np.argsort(~own.to_numpy(), kind="stable")].drop_duplicates(["image_id", "pattern"])
    return table.sort_index().reset_index(drop=True)


class StackModel:
    """A LightGBM stack per fold over CNN scores, metadata, patient context and dermoscopy features,
    with its per-pattern scorer choice, calibration and (once chosen) alert thresholds."""

    def __init__(self, *, num_boost_round: int = 300, seed: int = 0, params: dict[str, object] | None = None) -> None:
        if num_boost_round < 1:
            raise OptionError(f"--rounds {num_boost_round}: the stack needs at least 1 boosting round.")
        self.num_boost_round, self.seed = int(num_boost_round), int(seed)
        self.params = default_lgb_params() if params is None else dict(params)
        self._boosters: dict[int, LightGBMStacker] = {}
        self._features: list[str] = []
        self._scales = CnnScales({})
        self._calibration: PatternCalibration | None = None
        self._operating_points: dict[str, OperatingPoint] = {}
        self._feature_recipe: FeatureRecipe | None = None
        self._oof: dict[str, pd.DataFrame] = {}

    # --- fitting -------------------------------------------------------------------------------

    def fit(
        self, rows: pd.DataFrame, *, cnn_oof: dict[str, pd.DataFrame], image_features: pd.DataFrame | None = None,
        feature_recipe: FeatureRecipe | None = None,
    ) -> StackModel:
        """Fit on training `rows` (canonical columns plus `target` and `fold`): the boosters on the rows
        as given plus their masked copies (`fusion.missingness`), then each pattern's scorer and
        calibration on their OOF scores.

        `cnn_oof`: each CNN's OOF table as `train-cnns` wrote it (`image_id`, `fold`, `prob`; every
        image of `rows`, in any order: the fold models' scales are fitted on it as written);
        `image_features`: the dermoscopy features of `rows` (computed by `feature_recipe`), or None.
        """
        self._scales = CnnScales.fit(cnn_oof)
        self._feature_recipe = feature_recipe
        by_row = {name: aligned(table, rows["image_id"], f"the OOF table of CNN {name}", "train") for name, table in cnn_oof.items()}
        scores = self._scales.oof_scores(by_row).set_axis(rows.index) if cnn_oof else pd.DataFrame(index=rows.index)
        features = build_stack_features(rows, scores, image_features)
        copies = [c for c in masked_copies(rows, self.seed) if c.design != "complete"]
        target, folds = rows["target"].to_numpy(dtype=int), rows["fold"].to_numpy()
        result = cross_val_stack(
            features, target, folds, features.iloc[:0], num_boost_round=self.num_boost_round, seed=self.seed, params=self.params,
            masked_features={c.design: build_stack_features(c.rows, scores, image_features) for c in copies}, increasing=tuple(scores.columns),
        )
        self._boosters = dict(zip(sorted(int(f) for f in np.unique(folds)), result.models))
        self._features = list(features.columns)
        masked = masked_oof_table(rows, result.oof_probs, copies, result.masked_oof)
        self._calibration = self._fit_calibration(masked, rows["image_id"], scores)
        pattern = missingness_pattern(rows).to_numpy()
        oof_score = self._calibration.chosen_scores(result.oof_probs, pattern, _columns(scores))
        oof = rows[KEYS].assign(prob=self._calibration.apply(oof_score, pattern), score=oof_score, pattern=pattern)
        self._oof = {"oof": oof, "masked": masked, "features": features, "copies": pd.DataFrame({"design": [c.design for c in copies]})}
        return self

    def _fit_calibration(self, masked: pd.DataFrame, image_ids: pd.Series, scores: pd.DataFrame) -> PatternCalibration:
        """Each pattern's scorer and calibration on the masked OOF table, which gets the chosen score,
        scorer, `prob` (the calibration new patients get) and `prob_cross_fitted` (each fold by a
        calibration fitted without it, for an honest calibration error)."""
        # a lesion's CNN scores are never masked: each masked row takes its image's
        cnn_of_masked = {c: scores[c].set_axis(image_ids).reindex(masked["image_id"]).to_numpy() for c in scores}
        calibration = PatternCalibration.fit(masked["score"], masked["target"], masked["fold"], masked["pattern"], alternatives=cnn_of_masked)
        masked["score"] = calibration.chosen_scores(masked["score"], masked["pattern"], cnn_of_masked)
        masked["scorer"] = masked["pattern"].map(calibration.sources).map(calibration.scorers)
        masked["prob"] = calibration.apply(masked["score"], masked["pattern"])
        masked["prob_cross_fitted"] = calibration.apply(masked["score"], masked["pattern"], masked["fold"])
        return calibration

    def _fitted_output(self, name: str) -> pd.DataFrame:
        if name not in self._oof:
            raise RuntimeError("no out-of-fold results: this model was loaded, not fitted here.")
        return self._oof[name]

    @property
    def oof_(self) -> pd.DataFrame:
        """The training rows' OOF `prob` (calibrated), `score` and `pattern`, with image_id, patient_id, fold, target."""
        return self._fitted_output("oof")

    @property
    def masked_oof_(self) -> pd.DataFrame:
        """OOF scores per image and missingness pattern (what the alert thresholds are chosen on)."""
        return self._fitted_output("masked")

    @property
    def training_features_(self) -> pd.DataFrame:
        """The stack's features of the training rows, as the boosters saw them."""
        return self._fitted_output("features")

    @property
    def masked_designs_(self) -> list[str]:
        return self._fitted_output("copies")["design"].tolist()

    @property
    def oof_auc_(self) -> float:
        oof = self.oof_
        return roc_auc(oof["target"].to_numpy(dtype=int), oof["prob"])

    # --- what it takes ---------------------------------------------------------------------------

    @property
    def cnn_names(self) -> list[str]:
        return self._scales.names

    @property
    def cnn_columns(self) -> list[str]:
        """The stack's CNN score columns, `cnn_<name>`."""
        return self._scales.columns

    @property
    def features(self) -> list[str]:
        return list(self._features)

    @property
    def folds(self) -> list[int]:
        return list(self._boosters)

    @property
    def feature_recipe(self) -> FeatureRecipe | None:
        """How the dermoscopy features it takes are computed (None: it takes none)."""
        return self._feature_recipe

    @property
    def pattern_sources(self) -> dict[str, str]:
        """Each missingness pattern -> the pattern whose OOF rows calibrate it and set its threshold."""
        return dict(self._require_calibration().sources)

    @property
    def operating_points(self) -> dict[str, OperatingPoint]:
        """The alert threshold of each pattern source (empty until `with_operating_points`)."""
        return dict(self._operating_points)

    def _require_calibration(self) -> PatternCalibration:
        if self._calibration is None:
            raise RuntimeError("fit or load the stack model first.")
        return self._calibration

    # --- scoring ---------------------------------------------------------------------------------

    def cnn_scores(self, cnn_outputs: dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Each CNN's standardised log-odds (`cnn_<name>`) from its fold models' outputs (`prob_fold<k>`)."""
        return self._scales.scores(cnn_outputs)

    def predict(self, rows: pd.DataFrame, *, cnn_outputs: dict[str, pd.DataFrame], image_features: pd.DataFrame | None = None) -> StackPrediction:
        """Score `rows` (canonical columns; a lesion's patient context comes from the other rows of its
        patient): `cnn_outputs` holds each CNN's fold-model probabilities (`prob_fold<k>`), rows
        aligned with `rows`; `image_features` the dermoscopy features (None: scored as missing).

        Each lesion is judged by the scorer, calibration and operating point of its missingness pattern."""
        calibration = self._require_calibration()
        scores = self.cnn_scores(cnn_outputs).set_axis(rows.index) if self._scales.by_cnn else pd.DataFrame(index=rows.index)
        built = build_stack_features(rows, scores, image_features)
        features = built.reindex(columns=self._features)
        stack_score = np.mean([booster.predict(features) for booster in self._boosters.values()], axis=0) if len(rows) else np.empty(0)
        pattern = missingness_pattern(rows).to_numpy()
        score = calibration.chosen_scores(stack_score, pattern, _columns(scores))
        source = pd.Series(pattern, index=rows.index).map(calibration.sources)
        table = pd.DataFrame({"score": score, "prob": calibration.apply(score, pattern), "pattern": pattern, "operating_point": source}, index=rows.index)
        if self._operating_points:
            table["alert_threshold"] = source.map({name: point.threshold for name, point in self._operating_points.items()})
            table["alert"] = (table["prob"] >= table["alert_threshold"]).astype(int)
        return StackPrediction(table, scores, [f for f in self._features if f not in built.columns])

    def with_operating_points(self, masked_oof: pd.DataFrame, *, sensitivity: float = 0.95, n_boot: int = 1000, seed: int = 0) -> StackModel:
        """A copy whose alert threshold per pattern source is chosen on the OOF probabilities of that
        source's rows, inputs masked (`masked_oof_`), for the target sensitivity: a lesion of a
        pattern gets a promise measured on lesions that lacked what it lacks."""
        points = {}
        for source in sorted(set(self._require_calibration().sources.values())):
            rows = masked_oof[masked_oof["pattern"] == source]
            if not (rows["target"] == 1).any():
                raise DataError(f"no out-of-fold melanoma of pattern {source!r}; a sensitivity cannot be targeted for it.")
            points[source] = choose_operating_point(rows["target"], rows["prob"], rows["patient_id"], sensitivity, n_boot=n_boot, seed=seed)
        chosen = copy.copy(self)
        chosen._operating_points, chosen._oof = points, {}
        return chosen

    def recalibrated(self, calibrations: dict[str, PlattCalibration], points: dict[str, OperatingPoint]) -> StackModel:
        """A copy with a site's calibrations composed onto some pattern sources' and their operating
        points replaced by ones measured on the site (`ensemble.recalibrate`); other sources unchanged."""
        changed = copy.copy(self)
        changed._calibration = self._require_calibration().followed_by(calibrations)
        changed._operating_points, changed._oof = {**self._operating_points, **points}, {}
        return changed

    def gain_share(self) -> pd.Series:
        """Each feature's share of the total split gain, averaged over the fold boosters."""
        shares = []
        for stacker in self._boosters.values():
            gain = pd.Series(stacker.booster.feature_importance("gain"), index=stacker.booster.feature_name(), dtype=float)
            shares.append(gain / gain.sum() if gain.sum() > 0 else gain)
        return pd.concat(shares, axis=1).mean(axis=1) if shares else pd.Series(dtype=float)

    # --- files -------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write `model_fold<k>.txt` per fold and `stack_model.json` (written last: a folder with it is whole)."""
        layout = StackModelLayout(folder)
        layout.root.mkdir(parents=True, exist_ok=True)
        for fold, stacker in self._boosters.items():
            atomic_write(layout.booster(fold), stacker.save)
        for stale in layout.boosters:  # a refit on fewer folds leaves none of the old ones behind
            if int(stale.stem.removeprefix("model_fold")) not in self._boosters:
                stale.unlink()
        write_json(self._state(), layout.state)

    def _state(self) -> dict[str, object]:
        return {
            "format": STATE_FORMAT, "format_version": STATE_VERSION, "num_boost_round": self.num_boost_round, "seed": self.seed,
            "folds": self.folds, "features": self._features, "cnn_scales": self._scales.to_json(),
            "calibration": self._require_calibration().to_json(),
            "operating_points": {source: point.to_json() for source, point in self._operating_points.items()},
            "image_features": None if self._feature_recipe is None else self._feature_recipe.to_json(),
        }

    @classmethod
    def load(cls, folder: Path) -> StackModel:
        """A saved model (its boosters and state); refuses a folder without one, naming the command that writes it."""
        layout = StackModelLayout(folder)
        if not layout.state.is_file():
            raise RunStateError(f"{layout.state} is missing: fit the stack with `python cli.py stack` (a bundle: re-export it).")
        state = json.loads(layout.state.read_text())
        if state.get("format") != STATE_FORMAT or state.get("format_version") != STATE_VERSION:
            raise RunStateError(f"{layout.state}: written by another version of the pipeline; re-run `python cli.py stack`.")
        model = cls(num_boost_round=state["num_boost_round"], seed=state["seed"])
        model._boosters = {int(f): LightGBMStacker(booster=lgb.Booster(model_file=str(layout.booster(f)))) for f in state["folds"]}
        model._features = list(state["features"])
        model._scales = CnnScales.from_json(state["cnn_scales"])
        model._calibration = PatternCalibration.from_json(state["calibration"])
        model._operating_points = {s: OperatingPoint.from_json(p) for s, p in state["operating_points"].items()}
        model._feature_recipe = None if state["image_features"] is None else FeatureRecipe.from_json(state["image_features"])
        return model


def _columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: frame[c].to_numpy() for c in frame.columns}
