"""The allowed values of the training options, importable without TensorFlow.

The CLI and config-file validation check a value against these before TensorFlow loads, so a typo
stops the run at once with the allowed values instead of minutes later inside training.
"""

from __future__ import annotations

TARGET_CHOICES = ("auto", "mel", "diagnosis")
LOSS_CHOICES = ("bce", "focal")
CLASS_WEIGHT_CHOICES = ("balanced", "sqrt", "none")
AUGMENT_LEVELS = ("none", "light", "strong")
MIX_CHOICES = ("none", "mixup", "cutmix")
CACHE_CHOICES = ("auto", "memory", "disk", "none")
STRATEGY_CHOICES = ("auto", "mirrored", "multiworker", "tpu", "none")
COLOR_CONSTANCY_CHOICES = ("none", "shades-of-gray", "shades-of-gray-cropped")  # see cnn.pipeline.COLOR_CONSTANCY
DEFAULT_CACHE_BUDGET_GB = 1.0  # decoded uint8 images `--cache auto` keeps in memory (200,000 at 64 px need 2.5 GB)
