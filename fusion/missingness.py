"""Missingness patterns: which inputs a lesion is scored without, and the stack trained for each.

A stack trained only on rows that have age, sex and site learns its "missing" branches from a
handful of rows, so a clinic that uploads photos without a form gets scores from those branches.
Here the inputs a lesion can lack are named (`METADATA_FIELDS`, and the patient context of a
patient with one lesion), every lesion falls into one `pattern`, and *masked copies* of the
training rows (fields blanked, each lesion made its own patient) are built by the same code that
builds features for new patients. The stack trains on the rows as given plus those copies, and its
held-out predictions on each copy say how it ranks, how it is calibrated and where to put the alert
threshold for lesions of that pattern.

Patterns (metadata level x patient context):

- metadata level: `complete` (age, sex and site), `partial` (one or two of them), `no_metadata`
  (none of them; its masked copy also blanks the layout's further numeric columns, such as ISIC
  2024's `tbp_lv_*`, which an upload without a form lacks too);
- `+single_lesion` when the patient has no other lesion to compare with.

>>> import pandas as pd
>>> rows = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["p", "p", "q"],
...                      "age": [50.0, None, None], "sex": ["male", "male", None], "site": ["torso", None, None]})
>>> missingness_pattern(rows).tolist()
['complete', 'partial', 'no_metadata+single_lesion']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fusion.patient_context import extra_numeric_features

METADATA_FIELDS: tuple[str, ...] = ("age", "sex", "site")
METADATA_LEVELS: tuple[str, ...] = ("complete", "partial", "no_metadata")
SINGLE_LESION = "+single_lesion"
PATTERNS: tuple[str, ...] = (*METADATA_LEVELS, *(level + SINGLE_LESION for level in METADATA_LEVELS))
# A pattern with fewer OOF melanomas than this borrows the calibration and threshold of a nearby one
# (`fallback_chain`).
MIN_PATTERN_MELANOMAS = 10


def metadata_level(rows: pd.DataFrame) -> pd.Series:
    """`complete`, `partial` or `no_metadata` per row, from which of age, sex, site are missing."""
    n_missing = rows[list(METADATA_FIELDS)].isna().sum(axis=1).to_numpy()
    levels = np.where(n_missing == 0, "complete", np.where(n_missing == len(METADATA_FIELDS), "no_metadata", "partial"))
    return pd.Series(levels, index=rows.index)


def single_lesion(rows: pd.DataFrame) -> pd.Series:
    """True where the row's patient has no other row (no patient context to compare it with)."""
    patient = rows["patient_id"].fillna(rows["image_id"])
    return patient.map(patient.value_counts()).eq(1)


def missingness_pattern(rows: pd.DataFrame) -> pd.Series:
    """The pattern of each row, e.g. `complete` or `no_metadata+single_lesion` (see the module doc)."""
    return metadata_level(rows).where(~single_lesion(rows), metadata_level(rows) + SINGLE_LESION)


def without_metadata(rows: pd.DataFrame, _: np.random.Generator | None = None) -> pd.DataFrame:
    """The rows with age, sex, site and the layout's further numeric columns (e.g. `tbp_lv_*`) blanked:
    what a lesion uploaded without a form has."""
    blank = [*METADATA_FIELDS, *extra_numeric_features(rows).columns]
    return rows.assign(**{column: pd.Series(np.nan, index=rows.index).astype(rows[column].dtype) for column in blank})


def _mask_some(rows: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Blank a random non-empty, proper subset of the metadata fields in every row (drawn per row)."""
    subsets = np.array([[(code >> bit) & 1 for bit in range(len(METADATA_FIELDS))] for code in range(1, 2 ** len(METADATA_FIELDS) - 1)])
    blank = subsets[rng.integers(len(subsets), size=len(rows))].astype(bool)
    return rows.assign(**{field: rows[field].mask(blank[:, i]) for i, field in enumerate(METADATA_FIELDS)})


def _as_given(rows: pd.DataFrame, _: np.random.Generator) -> pd.DataFrame:
    return rows


def each_lesion_alone(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with every lesion its own patient: no patient context, as for an unnamed upload."""
    return rows.assign(patient_id=rows["image_id"].astype(rows["patient_id"].dtype))


# Metadata level a copy is built for -> how the training rows are masked to reach it.
METADATA_MASKS: dict[str, Callable[[pd.DataFrame, np.random.Generator], pd.DataFrame]] = {
    "complete": _as_given,
    "partial": _mask_some,
    "no_metadata": without_metadata,
}


@dataclass(frozen=True)
class MaskedCopy:
    """The rows of one split as a lesion of `design` would reach the stack; `pattern` is each row's own."""

    design: str  # the pattern the copy was built for
    rows: pd.DataFrame
    pattern: pd.Series  # each row's actual pattern after masking (rows already lacking a field may differ)


def masked_copies(rows: pd.DataFrame, seed: int = 0) -> list[MaskedCopy]:
    """One copy of `rows` per pattern, with fields blanked and/or each lesion made its own patient.

    The `complete` copy is the rows as given. Single-lesion copies are made only when some patient
    has several lesions (otherwise they would repeat the others). Seeded: the same rows and seed give
    the same copies.
    """
    rng = np.random.default_rng(seed)
    several = not single_lesion(rows).all()
    copies = []
    for level, mask in METADATA_MASKS.items():
        masked = mask(rows, rng)
        variants = [(level, masked)] + ([(level + SINGLE_LESION, each_lesion_alone(masked))] if several else [])
        copies += [MaskedCopy(design, variant, missingness_pattern(variant)) for design, variant in variants]
    return copies


@dataclass(frozen=True)
class PlattCalibration:
    """p = sigmoid(slope * logit(score) + intercept), fitted on out-of-fold scores (identity by default).

    Monotone, so it keeps the ranking and moves only the numbers a user reads; two parameters
    stay stable on the few melanomas a pattern may have.

    >>> calibration = PlattCalibration.fit(np.array([0.2, 0.4, 0.6, 0.8] * 25), np.array([0, 0, 1, 1] * 25))
    >>> bool(calibration.slope > 1)
    True
    >>> PlattCalibration().apply(np.array([0.25]))
    array([0.25])
    """

    slope: float = 1.0
    intercept: float = 0.0

    @classmethod
    def fit(cls, scores: np.ndarray, target: np.ndarray) -> PlattCalibration:
        """Fit on scores and labels; identity when only one class is present (nothing to fit)."""
        target = np.asarray(target, dtype=int)
        if len(np.unique(target)) < 2:
            return cls()
        model = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(scores)[:, None], target)
        return cls(slope=float(model.coef_[0, 0]), intercept=float(model.intercept_[0]))

    def apply(self, scores: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(self.slope * _logit(scores) + self.intercept)))

    def to_json(self) -> dict[str, float]:
        return {"slope": self.slope, "intercept": self.intercept}

    def then(self, other: PlattCalibration) -> PlattCalibration:
        """This calibration followed by `other` (fitted on this one's probabilities), as one: the logit is
        linear in both, so the two compose into one slope and intercept.

        >>> first, second = PlattCalibration(2.0, 0.5), PlattCalibration(0.5, -1.0)
        >>> bool(np.allclose(first.then(second).apply(np.array([0.3])), second.apply(first.apply(np.array([0.3])))))
        True
        """
        return PlattCalibration(slope=other.slope * self.slope, intercept=other.slope * self.intercept + other.intercept)


def _logit(scores: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fallback_chain(pattern: str) -> list[str]:
    """Patterns to borrow from, nearest first: the same without patient context, then with less metadata.

    >>> fallback_chain("complete")
    ['complete', 'complete+single_lesion', 'partial+single_lesion', 'no_metadata+single_lesion']
    """
    level = pattern.removesuffix(SINGLE_LESION)
    lower = [lvl + SINGLE_LESION for lvl in METADATA_LEVELS[METADATA_LEVELS.index(level):]]
    return list(dict.fromkeys([pattern, *lower]))


def pattern_sources(pattern: pd.Series, target: pd.Series) -> dict[str, str]:
    """Each pattern -> the pattern whose OOF rows calibrate it and set its threshold.

    A pattern with at least `MIN_PATTERN_MELANOMAS` OOF melanomas is its own source; a rarer one
    borrows from the first pattern of its `fallback_chain` that has them (HAM10000, one lesion per
    patient, has no multi-lesion rows; a set without metadata has no complete rows). The chain ends
    at `no_metadata+single_lesion`, which every masked OOF table holds for every image.
    """
    positive = np.asarray(target).astype(int) == 1
    melanomas = pd.Series(np.asarray(pattern)[positive]).value_counts()
    last = PATTERNS[-1]
    return {p: next((c for c in fallback_chain(p) if melanomas.get(c, 0) >= MIN_PATTERN_MELANOMAS), last) for p in PATTERNS}


STACK_SCORER = "stack"


def _choose_scorers(
    scores: np.ndarray, target: np.ndarray, pattern: np.ndarray, sources: set[str], *, alternatives: dict[str, np.ndarray]
) -> dict[str, str]:
    """Per pattern source, the scorer that ranks its own masked OOF rows best: the stack, or one CNN alone.

    The stack is trained mostly on rows that have what a pattern lacks; where, with those inputs
    masked, it ranks below a CNN of its own (a weak CNN it leans on, too few rows of the pattern), the
    lesions of that pattern are scored by that CNN: the promise "at least as good as the CNNs alone"
    is kept by construction, at the cost of one choice per pattern made on OOF scores.
    """
    chosen = {}
    for name in sorted(sources):
        rows = pattern == name
        if len(np.unique(target[rows])) < 2:
            chosen[name] = STACK_SCORER
            continue
        candidates = {STACK_SCORER: scores[rows], **{c: values[rows] for c, values in alternatives.items()}}
        aucs = {c: roc_auc_score(target[rows], values) for c, values in candidates.items()}
        chosen[name] = max(aucs, key=lambda c: (aucs[c], c == STACK_SCORER))  # ties keep the stack
    return chosen


@dataclass(frozen=True)
class PatternCalibration:
    """One Platt calibration per pattern source, fitted on OOF scores: on every fold (`final`: the
    probabilities users see, so each pattern keeps its ranking) and on all folds but one (`by_fold`:
    each fold calibrated without its own labels, for an honest calibration error). `scorers`: per
    source, `"stack"` or the CNN column (`cnn_<name>`, standardised log-odds) that scores its lesions
    (see `_choose_scorers`)."""

    sources: dict[str, str]
    final: dict[str, PlattCalibration]
    by_fold: dict[int, dict[str, PlattCalibration]]
    scorers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fit(
        cls, scores: np.ndarray, target: np.ndarray, folds: np.ndarray, pattern: np.ndarray, *, alternatives: dict[str, np.ndarray] | None = None
    ) -> PatternCalibration:
        """`alternatives`: CNN scores (column -> standardised log-odds per row) a pattern may be scored by instead of the stack."""
        scores, target, folds, pattern = (np.asarray(a) for a in (scores, target, folds, pattern))
        sources = pattern_sources(pd.Series(pattern), pd.Series(target))
        alternatives = {c: np.asarray(v, dtype=float) for c, v in (alternatives or {}).items()}
        scorers = _choose_scorers(scores, target, pattern, set(sources.values()), alternatives=alternatives)
        scores = cls(sources, {}, {}, scorers).chosen_scores(scores, pattern, alternatives)

        def fitted(rows: np.ndarray) -> dict[str, PlattCalibration]:
            return {s: PlattCalibration.fit(scores[rows & (pattern == s)], target[rows & (pattern == s)]) for s in set(sources.values())}

        return cls(sources, fitted(np.ones(len(scores), bool)), {int(f): fitted(folds != f) for f in np.unique(folds)}, scorers)

    def chosen_scores(self, scores: np.ndarray, pattern: np.ndarray, alternatives: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Each row's score from its pattern source's scorer (the stack's, or a CNN's as a probability)."""
        out = np.asarray(scores, dtype=float).copy()
        source = pd.Series(np.asarray(pattern)).map(self.sources).to_numpy()
        for name, scorer in self.scorers.items():
            if scorer != STACK_SCORER:
                if alternatives is None or scorer not in alternatives:
                    raise ValueError(f"pattern {name!r} is scored by {scorer!r}: pass that CNN score.")
                rows = source == name
                out[rows] = expit(np.asarray(alternatives[scorer], dtype=float)[rows])
        return out

    def apply(self, scores: np.ndarray, pattern: np.ndarray, folds: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities of scores from `chosen_scores`; with `folds`, each row by the calibration its fold did not see."""
        scores, source = np.asarray(scores, dtype=float), pd.Series(np.asarray(pattern)).map(self.sources).to_numpy()
        out = np.full(len(scores), np.nan)
        for fold in ([None] if folds is None else np.unique(folds)):
            calibrations = self.final if fold is None else self.by_fold[int(fold)]
            in_fold = np.ones(len(scores), bool) if fold is None else np.asarray(folds) == fold
            for name, calibration in calibrations.items():
                rows = in_fold & (source == name)
                out[rows] = calibration.apply(scores[rows])
        return out

    def to_json(self) -> dict[str, object]:
        return {"sources": self.sources, "calibrations": {name: c.to_json() for name, c in self.final.items()}, "scorers": self.scorers}

    def followed_by(self, site: dict[str, PlattCalibration]) -> PatternCalibration:
        """The final calibrations with a site's recalibration of some pattern sources composed onto them (`recalibrate`)."""
        return PatternCalibration(self.sources, {name: c.then(site[name]) if name in site else c for name, c in self.final.items()}, {}, self.scorers)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PatternCalibration:
        """The final calibrations (as a bundle carries them) from `to_json` output."""
        return cls(dict(data["sources"]), {n: PlattCalibration(**c) for n, c in data["calibrations"].items()}, {}, dict(data.get("scorers", {})))
