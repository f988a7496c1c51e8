"""Segmentation models for the recipe: a U-Net-style decoder on a keras-hub encoder.

`UNetSegmenter(backbone, num_classes)` takes any functional keras-hub image
backbone (ResNet, MobileNet, ...), finds the last layer at each output
stride (2, 4, 8, ...) and builds a decoder that upsamples the encoder's
output by 2 at a time, concatenating the encoder's feature map of the same
stride (a skip connection) and applying Conv-BatchNorm-ReLU, up to the input
resolution, then a 1x1 convolution to the class logits.

The model keeps the encoder as `model.backbone`, as keras-hub tasks do, so
`keras_peft.model_blocks(model)` reads it as:

- stem: the encoder's layers before its first block (ResNet: `conv1_conv`,
  `conv1_bn`; MobileNet: `input_conv`, `input_batch_norm`);
- blocks: the encoder's blocks, bottom to top (ResNet: `stack0_block0`,
  `stack0_block1`, `stack1_block0`, ...; MobileNet: `block_0`, `block_1`
  (= `block_1_0`, `block_1_1`), ...);
- head: everything outside the encoder: the decoder (`decoder_s8_conv`,
  `decoder_s8_bn`, ...) and `segmentation_logits`.

`--model deeplabv3` builds keras-hub's own `DeepLabV3ImageSegmenter` on a
ResNet encoder instead; its backbone holds the ASPP and decoder layers
(the *neck* for model_blocks), its head is the final 1x1 convolution.

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import keras_hub
import numpy as np

__all__ = [
    "BACKBONE_CONFIGS",
    "DEFAULT_BACKBONE",
    "UNetSegmenter",
    "build_backbone",
    "build_segmenter",
    "output_stride",
]

DEFAULT_BACKBONE = "resnet_18_imagenet"
"""Downloaded by keras-hub when online; offline the recipe falls back to `resnet_tiny`."""
FALLBACK_BACKBONE = "resnet_tiny"

# Small encoders built from a config with random weights: they work offline
# and fit 2 CPU cores. Pretrain them with the recipe itself and chain the runs
# with --init.
BACKBONE_CONFIGS = {
    # A ResNet-18-style encoder cut after its third stage (output stride 16),
    # narrower: 0.93 M parameters.
    "resnet_tiny": (
        "ResNetBackbone",
        {
            "input_conv_filters": [64],
            "input_conv_kernel_sizes": [7],
            "stackwise_num_filters": [64, 96, 128],
            "stackwise_num_blocks": [2, 2, 2],
            "stackwise_num_strides": [1, 2, 2],
            "block_type": "basic_block",
            "use_pre_activation": False,
            "image_shape": (None, None, 3),
        },
    ),
    # A small MobileNetV3-style encoder (output stride 16).
    "mobilenet_tiny": (
        "MobileNetBackbone",
        {
            "stackwise_expansion": [[48, 72], [96, 128], [128, 160]],
            "stackwise_num_blocks": [2, 2, 2],
            "stackwise_num_filters": [[24, 24], [40, 40], [64, 64]],
            "stackwise_kernel_size": [[3, 3], [5, 5], [5, 5]],
            "stackwise_num_strides": [[2, 1], [2, 1], [2, 1]],
            "stackwise_se_ratio": [[None, None], [0.25, 0.25], [0.25, 0.25]],
            "stackwise_activation": [["relu", "relu"], ["hard_swish"] * 2,
                                     ["hard_swish"] * 2],
            "stackwise_padding": [[1, 1], [2, 2], [2, 2]],
            "output_num_filters": 128,
            "depthwise_filters": 16,
            "depthwise_stride": 1,
            "depthwise_residual": False,
            "last_layer_filter": 128,
            "squeeze_and_excite": None,
            "input_activation": "hard_swish",
            "output_activation": "hard_swish",
            "input_num_filters": 16,
            "image_shape": (None, None, 3),
        },
    ),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PROBE_SIZE = 64


def build_backbone(name: str, *, fallback: bool = False):
    """A keras-hub backbone, and how it was obtained.

    `name`: a key of `BACKBONE_CONFIGS` (random weights), a keras-hub preset
    name (downloaded), or a local preset folder. With `fallback=True`, a
    preset that cannot be loaded (no network) is replaced by
    `resnet_tiny` with random weights, and the returned info says so.

    Returns:
        `(backbone, info)`; `info` has `name`, `pretrained` and, after a
        fallback, `fallback_from` and `fallback_reason`.
    """
    if name in BACKBONE_CONFIGS:
        cls_name, config = BACKBONE_CONFIGS[name]
        backbone = getattr(keras_hub.models, cls_name)(**copy.deepcopy(config))
        return backbone, {"name": name, "pretrained": False, "source": "config, random init"}
    try:
        backbone = keras_hub.models.Backbone.from_preset(os.path.expanduser(name))
    except Exception as error:  # network, missing folder, unknown preset
        if not fallback:
            raise RuntimeError(
                f"Could not load keras-hub backbone {name!r}: {type(error).__name__}: "
                f"{str(error)[:300]}. Offline? Pass a local preset folder, --init "
                "CHECKPOINT (a model.keras an earlier run wrote), or one of the random-init "
                f"configs {sorted(BACKBONE_CONFIGS)}."
            ) from error
        backbone, info = build_backbone(FALLBACK_BACKBONE)
        info.update(
            fallback_from=name,
            fallback_reason=f"{type(error).__name__}: {str(error)[:200]}",
        )
        return backbone, info
    return backbone, {"name": name, "pretrained": True, "source": "keras-hub preset"}


def _skip_layers(backbone) -> list[tuple[int, str]]:
    """(stride, layer name) of the last layer at each stride below the output's."""
    layers = [
        layer for layer in backbone.layers[1:]
        if not isinstance(layer.output, (list, tuple, dict)) and len(layer.output.shape) == 4
    ]
    probe = keras.Model(backbone.input, [layer.output for layer in layers] + [backbone.output])
    *outputs, final = probe(np.zeros((1, _PROBE_SIZE, _PROBE_SIZE, 3), "float32"))
    last = {}
    for layer, out in zip(layers, outputs):
        height = out.shape[1]
        if height and _PROBE_SIZE % height == 0:
            last[_PROBE_SIZE // height] = layer.name
    final = _PROBE_SIZE // final.shape[1]
    strides = sorted(s for s in last if 1 < s < final)
    expected = [2**i for i in range(1, len(strides) + 1)]
    if strides != expected or 2 * strides[-1] != final:
        raise ValueError(
            f"Backbone {backbone.name!r}: could not find one feature map per stride "
            f"2, 4, ..., {final} (found strides {strides}); the U-Net decoder needs them."
        )
    return [(s, last[s]) for s in strides]


@keras.saving.register_keras_serializable(package="keras_peft_recipes")
class UNetSegmenter(keras.Model):
    """A U-Net-style decoder on a keras-hub image backbone (see the module docstring).

    Args:
        backbone: a functional keras-hub image backbone taking `(H, W, 3)`.
        num_classes: number of classes (the logits' channels).
        decoder_filters: filters of the decoder's convolutions, from the
            coarsest level up; one per upsampling step (default: halving
            from 96, at least 16).
        normalize: scale [0, 1] inputs with the ImageNet mean and standard
            deviation before the backbone (what pretrained keras-hub
            encoders expect).
    """

    def __init__(self, backbone, num_classes, decoder_filters=None, normalize=True, **kwargs):
        # === Layers ===
        skips = _skip_layers(backbone)
        steps = len(skips) + 1
        if decoder_filters is None:
            decoder_filters = [max(16, 96 // 2**i) for i in range(steps)]
        decoder_filters = [int(f) for f in decoder_filters]
        if len(decoder_filters) != steps:
            raise ValueError(
                f"decoder_filters needs {steps} entries (one per upsampling step of "
                f"{backbone.name!r}). Received: {decoder_filters}."
            )
        features = keras.Model(
            backbone.inputs,
            [backbone.get_layer(name).output for _, name in skips] + [backbone.output],
            name="encoder_features",
        )
        scale = [1.0 / s for s in IMAGENET_STD] if normalize else 1.0
        offset = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)] if normalize else 0.0

        # === Functional model ===
        inputs = keras.Input((None, None, 3), name="images")
        x = keras.layers.Rescaling(scale, offset, name="input_normalization")(inputs)
        *skip_maps, x = features(x)
        strides = [s for s, _ in skips]
        for filters, stride in zip(decoder_filters, [*reversed(strides), 1]):
            # float32 even under mixed precision: XLA rejects the float16
            # gradient of a bilinear resize ("mixed precision is disallowed").
            x = keras.layers.UpSampling2D(2, interpolation="bilinear", dtype="float32",
                                          name=f"decoder_s{stride}_up")(x)
            if stride > 1:
                skip = skip_maps[strides.index(stride)]
                x = keras.layers.Concatenate(name=f"decoder_s{stride}_concat")([x, skip])
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                    name=f"decoder_s{stride}_conv")(x)
            x = keras.layers.BatchNormalization(name=f"decoder_s{stride}_bn")(x)
            x = keras.layers.ReLU(name=f"decoder_s{stride}_relu")(x)
        # float32 logits also under mixed precision
        outputs = keras.layers.Conv2D(num_classes, 1, dtype="float32",
                                      name="segmentation_logits")(x)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.decoder_filters = decoder_filters
        self.normalize = bool(normalize)
        self.output_stride = 2 * strides[-1]

    def get_config(self):
        return {
            "name": self.name,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
            "decoder_filters": self.decoder_filters,
            "normalize": self.normalize,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def _deeplab(backbone, num_classes):
    keys = sorted(getattr(backbone, "pyramid_outputs", {}) or {})
    if "P2" not in keys or len(keys) < 2:
        raise ValueError(
            "--model deeplabv3 needs an encoder with feature pyramid outputs P2, P3, ... "
            f"(a keras-hub ResNet). {backbone.name!r} has {keys or 'none'}; use --model unet."
        )
    top = keys[-1]
    level = int(top[1:])
    deeplab_backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=backbone,
        spatial_pyramid_pooling_key=top,
        upsampling_size=2 ** (level - 2),
        dilation_rates=[2, 4, 6],
        low_level_feature_key="P2",
    )
    model = keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=deeplab_backbone, num_classes=num_classes
    )
    model.output_stride = 2**level
    return model


def build_segmenter(backbone, num_classes: int, model_type: str = "unet"):
    """`"unet"`: `UNetSegmenter`; `"deeplabv3"`: keras-hub's `DeepLabV3ImageSegmenter`."""
    if model_type == "unet":
        return UNetSegmenter(backbone, num_classes, name="unet")
    if model_type == "deeplabv3":
        return _deeplab(backbone, num_classes)
    raise ValueError(f"--model must be 'unet' or 'deeplabv3'. Received: {model_type!r}.")


def output_stride(model) -> int:
    """Image sides must be multiples of this (the encoder's total downsampling)."""
    stride = getattr(model, "output_stride", None)
    if stride is None:  # a loaded model: measure it
        backbone = model.backbone
        backbone = getattr(backbone, "image_encoder", backbone)
        probe = keras.Model(backbone.input, backbone.output)
        out = probe(np.zeros((1, _PROBE_SIZE, _PROBE_SIZE, 3), "float32"))
        stride = _PROBE_SIZE // out.shape[1]
        model.output_stride = stride
    return stride
