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
    _, info = seg_model.build_backbone("resnet_18_imagenet", fallback=True)
    assert info["name"] == "resnet_tiny" and info["pretrained"] is False
    assert info["fallback_from"] == "resnet_18_imagenet" and "no network" in info["fallback_reason"]
    with pytest.raises(RuntimeError, match="Offline\\? Pass a local preset folder"):
        seg_model.build_backbone("resnet_18_imagenet")


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
    for name in ("experiment.json", "experiment.md", "experiment_panel.png"):
        assert os.path.isfile(tmp_path / name)
