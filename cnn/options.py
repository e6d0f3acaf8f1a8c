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
CACHE_CHOICES = ("memory", "disk", "none")
STRATEGY_CHOICES = ("auto", "mirrored", "multiworker", "tpu", "none")
