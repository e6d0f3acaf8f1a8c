"""Backbone registry: image models looked up by name, as keras.applications and timm do.

Every backbone takes float32 RGB in [0, 255] and carries its own preprocessing as ordinary Keras
layers (no Lambda layers, so saved models load with `safe_mode`). Adding a backbone is adding one
`Backbone` entry to `BACKBONES`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import keras
from keras import layers

from errors import OptionError
from rundir.io import read_json
from rundir.layout import BackboneLayout

# Preprocessing conventions of keras.applications, as layers.
Preprocess = Callable[[], list[layers.Layer]]


def _included() -> list[layers.Layer]:
    """The application normalises its own [0, 255] input (EfficientNet, MobileNetV3, ConvNeXt)."""
    return []


def _symmetric() -> list[layers.Layer]:
    """'tf' mode: scale to [-1, 1] (ResNetV2, MobileNetV2, the compact CNN)."""
    return [layers.Rescaling(1 / 127.5, offset=-1.0)]


def _imagenet_standardise() -> list[layers.Layer]:
    """'torch' mode: [0, 1] then ImageNet mean/std per channel (DenseNet)."""
    mean = [0.485 * 255, 0.456 * 255, 0.406 * 255]
    variance = [(0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2]
    return [layers.Normalization(mean=mean, variance=variance)]


def _residual_block(x: keras.KerasTensor, filters: int, name: str, pool: bool = True) -> keras.KerasTensor:
    """Two 3x3 convolutions plus a shortcut (projected when the width changes), then an optional 2x max-pool."""
    shortcut = x if x.shape[-1] == filters else layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_proj")(x)
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    x = layers.BatchNormalization(name=f"{name}_bn1")(x)
    x = layers.Activation("relu", name=f"{name}_relu1")(x)
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(x)
    x = layers.BatchNormalization(name=f"{name}_bn2")(x)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    x = layers.Activation("relu", name=f"{name}_out")(x)
    return layers.MaxPooling2D(2, name=f"{name}_pool")(x) if pool else x


def compact_cnn(
    input_shape: tuple[int, int, int],
    weights: str | None = None,
    *,
    width: int = 32,
    stage_multipliers: tuple[int, ...] = (1, 2, 4),
    stem_stride: int = 2,
    blocks_per_stage: int = 1,
) -> keras.Model:
    """A residual CNN that trains from scratch on a CPU.

    `stem_stride` 2 is one strided convolution; 4 adds a second convolution and a max-pool, as
    ResNet's stem does, so a 128 px image costs the residual stages what a 32 px map does. Each
    stage is `blocks_per_stage` residual blocks at its width, the last followed by a 2x max-pool.
    """
    if weights == "imagenet":
        raise OptionError("the compact CNNs have no ImageNet weights; use --weights none or a weights file path.")
    if stem_stride not in (2, 4):
        raise ValueError(f"stem_stride must be 2 or 4, got {stem_stride}.")
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(width // 2 if stem_stride == 4 else width, 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    if stem_stride == 4:
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv2")(x)
        x = layers.BatchNormalization(name="stem_bn2")(x)
        x = layers.Activation("relu", name="stem_relu2")(x)
        x = layers.MaxPooling2D(2, name="stem_pool")(x)
    for stage, multiplier in enumerate(stage_multipliers):
        for block in range(blocks_per_stage):
            last = block == blocks_per_stage - 1
            name = f"stage{stage}" if block == 0 else f"stage{stage}_block{block}"
            x = _residual_block(x, width * multiplier, name=name, pool=last)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inputs, x, name=f"compact_cnn_w{width}_s{len(stage_multipliers)}x{blocks_per_stage}")
    if weights is not None:
        model.load_weights(weights)
    return model


def _application(constructor: Callable[..., keras.Model], **fixed: object) -> Callable[..., keras.Model]:
    """Wrap a keras.applications constructor as a pooled feature extractor."""

    def build(input_shape: tuple[int, int, int], weights: str | None = None) -> keras.Model:
        return constructor(include_top=False, weights=weights, input_shape=input_shape, pooling="avg", **fixed)

    return build


@dataclass(frozen=True)
class Backbone:
    """A named feature extractor with its preprocessing and the smallest input it accepts."""

    name: str
    build: Callable[..., keras.Model]
    preprocess: Preprocess
    min_size: int = 32


apps = keras.applications
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        # 0.3M parameters, three stages after a stride-2 stem: the fastest; 32-64 px.
        Backbone("small", compact_cnn, _symmetric, min_size=8),
        # 1.2M parameters, four stages after a stride-4 stem: 96-128 px at about the cost of `small` at 64.
        Backbone("compact_resnet", partial(compact_cnn, stage_multipliers=(1, 2, 4, 8), stem_stride=4),
                 _symmetric, min_size=64),
        # 2.8M parameters, two residual blocks in each of four stages after a stride-2 stem: the deepest; 64 px.
        Backbone("compact_resnet18", partial(compact_cnn, stage_multipliers=(1, 2, 4, 8), blocks_per_stage=2),
                 _symmetric, min_size=32),
        Backbone("efficientnet_b0", _application(apps.EfficientNetB0), _included),
        Backbone("efficientnet_b1", _application(apps.EfficientNetB1), _included),
        Backbone("efficientnet_b2", _application(apps.EfficientNetB2), _included),
        Backbone("efficientnet_b3", _application(apps.EfficientNetB3), _included),
        Backbone("efficientnetv2_b0", _application(apps.EfficientNetV2B0, include_preprocessing=True), _included),
        Backbone("efficientnetv2_s", _application(apps.EfficientNetV2S, include_preprocessing=True), _included),
        Backbone("mobilenet_v3_small", _application(apps.MobileNetV3Small, include_preprocessing=True), _included),
        Backbone("mobilenet_v3_large", _application(apps.MobileNetV3Large, include_preprocessing=True), _included),
        Backbone("resnet50v2", _application(apps.ResNet50V2), _symmetric),
        Backbone("densenet121", _application(apps.DenseNet121), _imagenet_standardise),
        Backbone("convnext_tiny", _application(apps.ConvNeXtTiny, include_preprocessing=True), _included),
    )
}


def resolve_weights(weights: str) -> str | None:
    """`none` -> None, `imagenet` -> 'imagenet', anything else must be an existing weights file (a pretrained
    BACKBONE folder is `PretrainedBackbone`'s)."""
    if weights.lower() == "none":
        return None
    if weights.lower() == "imagenet":
        return "imagenet"
    if Path(weights).is_dir():
        raise OptionError(f"--weights {weights}: a folder without {BackboneLayout(weights).record.name}; give a folder `pretrain` finished, or a weights file.")
    if not Path(weights).exists():
        raise OptionError(f"--weights {weights}: no such file; give none, imagenet, a weights file path or a pretrained BACKBONE folder.")
    return weights


@dataclass(frozen=True)
class PretrainedBackbone:
    """A backbone `pretrain` wrote (BACKBONE/): what `train-cnns --weights BACKBONE` fine-tunes from.

    Its record says the architecture and image size it was pretrained at; a classifier of another
    backbone or size is refused, since its weights would not fit (or fit only by accident of shape).
    """

    layout: BackboneLayout
    record: dict

    @classmethod
    def at(cls, weights: str) -> PretrainedBackbone | None:
        """The pretrained backbone in the folder `weights`, or None when `weights` names none."""
        layout = BackboneLayout(weights)
        record = read_json(layout.record) if layout.root.is_dir() else None
        return None if record is None else cls(layout, record)

    def check_fits(self, *, backbone: str, image_size: int) -> None:
        """Refuse a classifier of another backbone or image size than the one pretrained."""
        pretrained = (self.record["backbone"], self.record["image_size"])
        if pretrained != (backbone, image_size):
            raise OptionError(
                f"--weights {self.layout.root}: a {pretrained[0]} backbone pretrained at {pretrained[1]} px cannot start a "
                f"{backbone} model at {image_size} px; train --models {pretrained[0]}:{pretrained[1]}, or pretrain --model {backbone}:{image_size}."
            )

    def load_into(self, features: keras.Model, *, backbone: str, image_size: int) -> None:
        """Load the weights into `features` (the backbone as `Backbone.build` made it), refusing a mismatch."""
        self.check_fits(backbone=backbone, image_size=image_size)
        features.load_weights(self.layout.weights)


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name, listing the registered ones when it is unknown."""
    if name not in BACKBONES:
        raise OptionError(f"unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name]


def feature_extractor(
    name: str, image_size: int, weights: str = "none", *, bn_momentum: float = 0.9
) -> tuple[keras.KerasTensor, keras.KerasTensor, keras.Model]:
    """The backbone's input, its pooled features after its preprocessing, and the backbone itself (what
    `pretrain` saves and `--weights BACKBONE` loads): the body of a classifier and of a pretraining model.

    Batch-norm momentum is lowered from the applications' 0.99 to `bn_momentum` so the moving
    statistics used at inference catch up within the few hundred steps of a small-data run.
    """
    backbone = get_backbone(name)
    if image_size < backbone.min_size:
        raise OptionError(f"backbone {name!r} needs images of at least {backbone.min_size} px, got {image_size}.")
    pretrained = PretrainedBackbone.at(weights)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    for layer in backbone.preprocess():
        x = layer(x)
    features = backbone.build((image_size, image_size, 3), weights=None if pretrained else resolve_weights(weights))
    if pretrained is not None:
        pretrained.load_into(features, backbone=name, image_size=image_size)
    for layer in features.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum
    return inputs, features(x), features


def build_classifier(
    name: str,
    image_size: int,
    weights: str = "none",
    *,
    n_outputs: int = 1,
    dropout: float = 0.2,
    bn_momentum: float = 0.9,
) -> keras.Model:
    """Backbone + its preprocessing + dropout and a head; input float32 [0, 255].

    One output is a sigmoid melanoma probability; more are a softmax over diagnoses. `weights`:
    none, imagenet, a weights file, or a BACKBONE folder of `pretrain`.
    """
    inputs, x, _ = feature_extractor(name, image_size, weights, bn_momentum=bn_momentum)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    activation = "sigmoid" if n_outputs == 1 else "softmax"
    outputs = layers.Dense(n_outputs, activation=activation, dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{name}_classifier")


def parse_model_specs(text: str, default_size: int) -> dict[str, int]:
    """`small:64,small:96@1,efficientnet_b0:128` -> {member name: image size}.

    A name without `:SIZE` gets `default_size`. `@SEED` adds another member of the same backbone
    trained from its own seed (cheap diversity for the stack), named `<backbone>_s<SEED>`.

    >>> parse_model_specs("small:64,small:96@1", 64)
    {'small': 64, 'small_s1': 96}
    """
    specs: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        spec, _, seed = item.partition("@")
        name, _, size = spec.partition(":")
        get_backbone(name)
        if not (size or str(default_size)).isdigit():
            raise OptionError(f"--models {item!r}: the size after ':' must be a whole number of pixels.")
        if seed and not seed.isdigit():
            raise OptionError(f"--models {item!r}: the seed after '@' must be a whole number.")
        member = name if int(seed or 0) == 0 else f"{name}_s{int(seed)}"
        if member in specs:
            raise OptionError(f"--models names {member!r} twice; give one a seed of its own, e.g. {name}:{size or default_size}@1.")
        specs[member] = int(size or default_size)
    if not specs:
        raise OptionError("--models is empty; name at least one backbone.")
    return specs


_MEMBER = re.compile(r"^(?P<backbone>.+)_s(?P<seed>\d+)$")


def member_backbone(member: str) -> tuple[str, int]:
    """(backbone, seed offset) of a member named by `parse_model_specs`.

    >>> member_backbone("small"), member_backbone("small_s2")
    (('small', 0), ('small', 2))
    """
    if member in BACKBONES:
        return member, 0
    found = _MEMBER.match(member)
    if found is None or found["backbone"] not in BACKBONES:
        get_backbone(member)  # raises, listing the registered backbones
    return found["backbone"], int(found["seed"])
