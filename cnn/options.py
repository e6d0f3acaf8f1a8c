"""The training recipe (`CnnConfig`) and the allowed values of its options, importable without TensorFlow.

Every option value is checked once, when the recipe is built: the CLI and config-file validation
check a value against these before TensorFlow loads, so a typo stops the run at once with the
allowed values instead of minutes later inside training. Each tuple of choices is a TF-free copy of
a registry's keys (`tests/test_cnn.py` checks they stay equal):

    COLOR_CONSTANCY_CHOICES  cnn.pipeline.COLOR_CONSTANCY      AUGMENT_LEVELS  cnn.pipeline.AUGMENTATIONS
    TTA_VIEW_CHOICES         cnn.pipeline.TTA_VIEWS            MIX_CHOICES     cnn.pipeline.MIXES
    LOSS_CHOICES             cnn.targets.LOSSES                STRATEGY_CHOICES  cnn.train.STRATEGIES
    CLASS_WEIGHT_CHOICES     cnn.targets.CLASS_WEIGHT_POWERS

>>> CnnConfig(epochs=2, tta=("none", "hflip")).tta
('none', 'hflip')
>>> CnnConfig(loss="hinge")
Traceback (most recent call last):
errors.OptionError: --loss 'hinge': choose one of 'bce', 'focal'.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_origin

from errors import OptionError

TARGET_CHOICES = ("auto", "mel", "diagnosis")
LOSS_CHOICES = ("bce", "focal")
CLASS_WEIGHT_CHOICES = ("balanced", "sqrt", "none")
AUGMENT_LEVELS = ("none", "light", "strong")
MIX_CHOICES = ("none", "mixup", "cutmix")
CACHE_CHOICES = ("auto", "memory", "disk", "none")
STRATEGY_CHOICES = ("auto", "mirrored", "multiworker", "tpu", "none")
COLOR_CONSTANCY_CHOICES = ("none", "shades-of-gray", "shades-of-gray-cropped")
TTA_VIEW_CHOICES = ("none", "hflip", "vflip", "rot90", "rot180", "rot270")
DEFAULT_CACHE_BUDGET_GB = 1.0  # decoded uint8 images `--cache auto` keeps in memory (200,000 at 64 px need 2.5 GB)

# Numeric fields -> (lowest allowed, whether the lowest is excluded), checked at construction.
LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "image_size": (1, False), "epochs": (1, False), "batch_size": (1, False), "learning_rate": (0, True), "weight_decay": (0, False),
    "label_smoothing": (0, False), "cache_budget_gb": (0, False), "negatives_per_patient": (1, False), "patience": (0, False),
    "temperature": (0, True), "projection_dim": (1, False),
}


def check_choices_and_bounds(recipe: object) -> None:
    """Refuse a recipe field outside its `Literal` choices or below its `LOWER_BOUNDS`, naming the option."""
    hints = typing.get_type_hints(type(recipe))
    for field in fields(recipe):
        value, hint = getattr(recipe, field.name), hints[field.name]
        if get_origin(hint) is Literal and value not in get_args(hint):
            raise OptionError(f"{option_name(field.name)} {value!r}: choose one of {', '.join(map(repr, get_args(hint)))}.")
        if field.name in LOWER_BOUNDS and value is not None:
            low, excluded = LOWER_BOUNDS[field.name]
            if value < low or (excluded and value == low):
                raise OptionError(f"{option_name(field.name)} {value}: must be {'above' if excluded else 'at least'} {low}.")


def option_name(field: str) -> str:
    """The command-line option of a recipe field (`class_weight` -> `--class-weight`)."""
    return "--" + field.replace("_", "-").replace("cache-budget-gb", "cache-budget")


@dataclass(frozen=True)
class CnnConfig:
    """Training recipe shared by every (model, fold) pair of a `train-cnns` call."""

    image_size: int = 64  # default; each model of a run may have its own (see `cnn.backbones.parse_model_specs`)
    epochs: int = 5
    batch_size: int = 32
    weights: str = "none"  # none, imagenet, a weights file or a pretrained BACKBONE folder (cnn.backbones.feature_extractor)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4  # AdamW's decoupled decay
    seed: int = 0
    tta: tuple[str, ...] = ("none", "hflip", "vflip")  # views from TTA_VIEW_CHOICES
    target: Literal[TARGET_CHOICES] = "auto"
    loss: Literal[LOSS_CHOICES] = "bce"
    class_weight: Literal[CLASS_WEIGHT_CHOICES] = "none"
    label_smoothing: float = 0.0
    augment: Literal[AUGMENT_LEVELS] = "light"
    mix: Literal[MIX_CHOICES] = "none"
    cache: Literal[CACHE_CHOICES] = "auto"  # see cnn.pipeline.choose_cache
    cache_budget_gb: float = DEFAULT_CACHE_BUDGET_GB  # decoded uint8 images kept in memory up to this size (auto)
    negatives_per_patient: int | None = None  # each epoch: every positive, at most this many negatives per patient
    deterministic: bool = False  # TensorFlow op determinism: identical OOF on CPU for the same seed
    patience: int = 0  # stop after this many epochs without a better validation AUC; 0 = never
    strategy: Literal[STRATEGY_CHOICES] = "auto"
    mixed_precision: bool = False  # float16 (GPU) / bfloat16 (TPU) compute; a no-op on a CPU
    jit: bool | None = None  # XLA: None leaves it to Keras (on for one GPU); a no-op on a CPU
    color_constancy: Literal[COLOR_CONSTANCY_CHOICES] = "none"  # applied the same at scoring (bundle)
    illuminant_augment: bool = False  # re-light training images under illuminants of other training images

    def __post_init__(self) -> None:
        check_choices_and_bounds(self)
        if not 0 <= self.label_smoothing < 1:
            raise OptionError(f"--label-smoothing {self.label_smoothing}: give a share from 0 up to (not including) 1.")
        unknown = [view for view in self.tta if view not in TTA_VIEW_CHOICES]
        if unknown or not self.tta:
            raise OptionError(f"--tta {','.join(self.tta)}: name one or more of {', '.join(TTA_VIEW_CHOICES)}.")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CnnConfig:
        """The recipe from a command's recipe options, by field name; `tta` may be the command line's
        comma-separated list. A key that is no field is a bug (an option renamed on one side only),
        never silently left at its default.

        >>> CnnConfig.from_options({"epochs": 2, "tta": "none, hflip"}).tta
        ('none', 'hflip')
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"CnnConfig has no field(s) {unknown}: an option and the recipe disagree on a name.")
        values = dict(options)
        if isinstance(values.get("tta"), str):
            values["tta"] = tuple(view.strip() for view in values["tta"].split(",") if view.strip())
        return cls(**values)


@dataclass(frozen=True)
class PretrainConfig:
    """Recipe of `pretrain`: SimCLR on unlabelled images (cnn.pretrain), checked at construction.

    >>> PretrainConfig(backbone="small", image_size=32, epochs=1).augment
    'strong'
    >>> PretrainConfig(backbone="small", image_size=32, temperature=0)
    Traceback (most recent call last):
    errors.OptionError: --temperature 0: must be above 0.
    """

    backbone: str
    image_size: int
    epochs: int = 20
    batch_size: int = 128  # images per batch; each gives two views, the other 2 x (batch - 1) views are its negatives
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1  # NT-Xent's softmax temperature (SimCLR)
    projection_dim: int = 64  # the projection head's output, discarded after pretraining
    augment: Literal[AUGMENT_LEVELS] = "strong"  # each view's augmentation (cnn.pipeline.AUGMENTATIONS)
    color_constancy: Literal[COLOR_CONSTANCY_CHOICES] = "none"
    cache: Literal[CACHE_CHOICES] = "auto"
    cache_budget_gb: float = DEFAULT_CACHE_BUDGET_GB
    seed: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        check_choices_and_bounds(self)
        if self.augment == "none":
            raise OptionError("--augment none: two identical views teach a contrastive objective nothing; choose light or strong.")
        if self.batch_size < 2:
            raise OptionError(f"--batch-size {self.batch_size}: a contrastive batch needs at least 2 images (each is the others' negative).")
