"""The competitions' submission formats: one registry, named in the challenge vocabulary every command uses
(`isic2018`, `isic2019`, `isic2020`, `isic2024`: the same names as the data layouts of those challenges).

Kept apart from `ensemble.submission` (which builds and checks the CSVs) so the CLI can list the
names without importing the numerical stack.

>>> layout_submission_format("isic2024").id_column, layout_submission_format("ham10000").id_column
('isic_id', 'image_name')
"""

from __future__ import annotations

from dataclasses import dataclass

from cnn.outputs import MELANOMA, class_column
from rundir.layout import PRIMARY_STACK


@dataclass(frozen=True)
class SubmissionFormat:
    """A challenge's CSV: the id column, then each prediction column and the run's column it is read from."""

    title: str
    id_column: str
    columns: dict[str, str]  # submission column -> prediction column (`prob` or `prob_<CLASS>`)
    default_models: tuple[str, ...]  # without --model: the first of these the run has (the last one otherwise, refused by name)

    @property
    def header(self) -> list[str]:
        return [self.id_column, *self.columns]

    @property
    def multiclass(self) -> bool:
        return any(source != MELANOMA for source in self.columns.values())


ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
# ISIC 2018 Task 3 calls actinic keratosis / intraepithelial carcinoma AKIEC; the unified code is AK.
ISIC2018_COLUMNS = {column: class_column(code) for column, code in {"MEL": "MEL", "NV": "NV", "BCC": "BCC", "AKIEC": "AK", "BKL": "BKL", "DF": "DF", "VASC": "VASC"}.items()}

# the differential-diagnosis stack (fusion.diagnosis_stack) where the run has one: the best balanced accuracy measured here
MULTICLASS_DEFAULTS = ("diagnosis_stack", "mean_blend")
SUBMISSION_FORMATS: dict[str, SubmissionFormat] = {
    "isic2020": SubmissionFormat("SIIM-ISIC 2020 (melanoma probability)", "image_name", {"target": MELANOMA}, (PRIMARY_STACK,)),
    "isic2024": SubmissionFormat("ISIC 2024 (malignancy probability)", "isic_id", {"target": MELANOMA}, (PRIMARY_STACK,)),
    "isic2019": SubmissionFormat("ISIC 2019 (9 diagnoses)", "image", {c: class_column(c) for c in ISIC2019_CLASSES}, MULTICLASS_DEFAULTS),
    "isic2018": SubmissionFormat("ISIC 2018 Task 3 (7 diagnoses)", "image", ISIC2018_COLUMNS, MULTICLASS_DEFAULTS),
}


BINARY_DEFAULT = "isic2020"  # the binary format of data whose own challenge has none (or no layout name of one)


def layout_submission_format(layout: str) -> SubmissionFormat:
    """The binary submission format of a data layout's own challenge (what `stack` writes to RUN/submission.csv):
    the layout's name where it names a binary challenge format (one vocabulary: `isic2024` data, `isic2024`
    submissions), else SIIM-ISIC 2020's."""
    own = SUBMISSION_FORMATS.get(layout)
    return own if own is not None and not own.multiclass else SUBMISSION_FORMATS[BINARY_DEFAULT]
