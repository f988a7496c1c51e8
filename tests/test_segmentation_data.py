"""Segmentation recipe data and metrics: loaders, corruptions, augmentation, IoU.

Tiny generated images and masks; no model.
"""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

import _segmentation_data as seg_data
import _segmentation_metrics as seg_metrics


def write_png(path, array):
    array = np.asarray(array, np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(array))


def make_folder(root, n=4, size=16, values=(0, 255), seed=0):
    """image/N.png (gray) + label/N.png with `values`; returns the masks as classes."""
    rng = np.random.default_rng(seed)
    classes = []
    for i in range(n):
        mask = rng.integers(0, len(values), (size, size))
        classes.append(mask)
        write_png(os.path.join(root, "image", f"{i}.png"), rng.integers(0, 256, (size, size)))
        write_png(os.path.join(root, "label", f"{i}.png"), np.asarray(values)[mask])
    return classes


# --------------------------------------------------------------------- loader
def test_folder_maps_mask_values_to_classes_and_resizes(tmp_path):
    classes = make_folder(str(tmp_path), n=3, size=16, values=(0, 255))
    data = seg_data.load_folder(str(tmp_path), 16)
    assert data.images.shape == (3, 16, 16, 3) and data.images.dtype == np.uint8
    assert data.class_names == ["value_0", "value_255"]
    np.testing.assert_array_equal(data.masks[1], classes[1])  # 0 -> 0, 255 -> 1
    assert data.ids == ["0", "1", "2"]
    # gray is repeated into RGB
    np.testing.assert_array_equal(data.images[..., 0], data.images[..., 2])

    small = seg_data.load_folder(str(tmp_path), 8, class_names=["membrane", "cell"])
    assert small.images.shape == (3, 8, 8, 3) and small.masks.shape == (3, 8, 8)
    assert set(np.unique(small.masks)) <= {0, 1}
    assert small.class_names == ["membrane", "cell"]


def test_folder_sorts_numbered_files_naturally(tmp_path):
    make_folder(str(tmp_path), n=12, size=8)
    assert seg_data.load_folder(str(tmp_path), 8).ids[:3] == ["0", "1", "2"]
    assert seg_data.load_folder(str(tmp_path), 8).ids[-2:] == ["10", "11"]


def test_folder_with_train_subfolder_is_found(tmp_path):
    make_folder(str(tmp_path / "train"), n=2, size=8)
    assert len(seg_data.load_folder(str(tmp_path), 8)) == 2


def test_missing_mask_is_a_clear_error(tmp_path):
    make_folder(str(tmp_path), n=3, size=8)
    os.remove(tmp_path / "label" / "1.png")
    with pytest.raises(seg_data.DataError, match=r"1 image\(s\) in .* have no mask .*'1.png'"):
        seg_data.load_folder(str(tmp_path), 8)


def test_mask_without_image_is_a_clear_error(tmp_path):
    make_folder(str(tmp_path), n=2, size=8)
    write_png(str(tmp_path / "label" / "7.png"), np.zeros((8, 8)))
    with pytest.raises(seg_data.DataError, match=r"have no image .*'7.png'"):
        seg_data.load_folder(str(tmp_path), 8)


def test_size_mismatch_is_a_clear_error(tmp_path):
    make_folder(str(tmp_path), n=2, size=8)
    write_png(str(tmp_path / "label" / "0.png"), np.zeros((8, 10)))
    with pytest.raises(seg_data.DataError, match=r"0.png is 8x8 but its mask .* is 10x8"):
        seg_data.load_folder(str(tmp_path), 8)


def test_non_image_files_are_clear_errors(tmp_path):
    make_folder(str(tmp_path), n=2, size=8)
    (tmp_path / "image" / "notes.txt").write_text("hello")
    (tmp_path / "label" / "notes.txt").write_text("hello")
    with pytest.raises(seg_data.DataError, match=r"notes.txt is not an image file"):
        seg_data.load_folder(str(tmp_path), 8)
    os.remove(tmp_path / "image" / "notes.txt")
    os.remove(tmp_path / "label" / "notes.txt")
    (tmp_path / "image" / "1.png").write_bytes(b"not really a png")
    with pytest.raises(seg_data.DataError, match=r"1.png could not be decoded as an image"):
        seg_data.load_folder(str(tmp_path), 8)


def test_colour_masks_and_unexpected_values_are_errors(tmp_path):
    make_folder(str(tmp_path), n=2, size=8)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 255
    write_png(str(tmp_path / "label" / "0.png"), colour)
    with pytest.raises(seg_data.DataError, match="is a colour mask"):
        seg_data.load_folder(str(tmp_path), 8)
    make_folder(str(tmp_path), n=2, size=8, values=(0, 128, 255))
    with pytest.raises(seg_data.DataError, match=r"values \[128\] that are not in"):
        seg_data.load_folder(str(tmp_path), 8, mask_values=[0, 255])


def test_missing_folders_are_errors(tmp_path):
    with pytest.raises(seg_data.DataError, match="does not exist"):
        seg_data.load_folder(str(tmp_path / "nope"), 8)
    with pytest.raises(seg_data.DataError, match="no image/ and label/"):
        seg_data.load_folder(str(tmp_path), 8)


def test_tfds_oxford_pet_trimaps_map_to_three_classes():
    import tensorflow_datasets as tfds

    def as_dataset(self, *args, **kwargs):
        def examples():
            for i in range(3):
                mask = np.full((20, 24, 1), 2, np.uint8)  # background
                mask[5:15, 6:18] = 1  # pet
                mask[5, 6:18] = 3  # border
                yield {"image": np.full((20, 24, 3), 10 * i, np.uint8),
                       "segmentation_mask": mask, "file_name": f"cat_{i}.jpg"}
        return tf.data.Dataset.from_generator(
            examples,
            output_signature={
                "image": tf.TensorSpec((None, None, 3), tf.uint8),
                "segmentation_mask": tf.TensorSpec((None, None, 1), tf.uint8),
                "file_name": tf.TensorSpec((), tf.string),
            },
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        data = seg_data.load_data("tfds:oxford_iiit_pet", 16, split="train", max_examples=2)
    assert len(data) == 2 and data.images.shape == (2, 16, 16, 3)
    assert data.class_names == ["pet", "background", "border"]
    assert set(np.unique(data.masks)) == {0, 1, 2}
    assert data.ids == ["cat_0.jpg", "cat_1.jpg"]


def test_unknown_tfds_name_is_an_error():
    with pytest.raises(seg_data.DataError, match="Unknown TFDS segmentation data set"):
        seg_data.load_data("tfds:mnist", 16)


def test_split_is_deterministic_and_disjoint():
    data = seg_data.make_synthetic(10, 16)
    a_train, a_val = seg_data.split(data, 0.3, seed=0)
    _, b_val = seg_data.split(data, 0.3, seed=0)
    assert a_val.ids == b_val.ids and len(a_val) == 3 and len(a_train) == 7
    assert not set(a_val.ids) & set(a_train.ids)
    assert seg_data.split(data, 0.3, seed=1)[1].ids != a_val.ids
    picked = seg_data.select(a_train, 2, 6, count=2, seed=0)
    assert len(picked) == 2 and set(picked.ids) <= set(a_train.ids[2:6])
    with pytest.raises(seg_data.DataError, match="Cannot take 5"):
        seg_data.select(a_train, 2, 6, count=5)


# ---------------------------------------------------------------- corruption
def _batches(data, corruption, corrupt_seed=0):
    ds = seg_data.make_dataset(data, batch_size=len(data), training=False,
                               corruption=corruption, corrupt_seed=corrupt_seed)
    images, masks = next(iter(ds))
    return images.numpy(), masks.numpy()


@pytest.mark.parametrize("spec", ["gaussian_noise:0.2", "blur:1.5", "contrast:0.3"])
def test_corruptions_change_images_only_and_are_fixed_per_image(spec):
    data = seg_data.make_synthetic(3, 24)
    clean_images, clean_masks = _batches(data, None)
    corruption = seg_data.parse_corruption(spec)
    images, masks = _batches(data, corruption)
    np.testing.assert_array_equal(masks, clean_masks)
    assert not np.allclose(images, clean_images)
    assert images.min() >= 0 and images.max() <= 1
    again, _ = _batches(data, corruption)
    np.testing.assert_array_equal(images, again)  # a fixed corrupted copy
    # An image is corrupted the same way in any subset (seeded by its id).
    alone, _ = _batches(data.subset([2]), corruption)
    np.testing.assert_allclose(alone[0], images[2], atol=1e-6)


def test_corruption_draws_depend_on_the_corrupt_seed():
    data = seg_data.make_synthetic(2, 16)
    noise = seg_data.parse_corruption("gaussian_noise:0.1")
    assert not np.allclose(_batches(data, noise, 0)[0], _batches(data, noise, 1)[0])
    clean = _batches(data, None)[0]
    np.testing.assert_allclose(_batches(data, seg_data.parse_corruption("contrast:1"))[0],
                               clean, atol=1e-6)


@pytest.mark.parametrize("spec", ["noise:0.1", "gaussian_noise", "blur:0", "contrast:x",
                                  "gaussian_noise:-1"])
def test_bad_corruption_specs_are_errors(spec):
    with pytest.raises(ValueError, match="--corrupt"):
        seg_data.parse_corruption(spec)


# -------------------------------------------------------------- augmentation
def test_augmentation_keeps_masks_aligned_pixel_exact():
    # Every pixel of the mask is unique (0..255) and the image encodes it in
    # every channel, so any misalignment shows.
    mask = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = np.repeat(mask[..., None], 3, axis=-1)
    data = seg_data.SegmentationData(
        images=np.stack([image, image]), masks=np.stack([mask, mask]), ids=["a", "b"],
        class_names=[str(i) for i in range(256)], source="pattern",
    )
    ds = seg_data.make_dataset(data, batch_size=2, training=True, crop_size=8, seed=3)
    views = set()
    for images, masks in ds.take(20):
        for img, m in zip(images.numpy(), masks.numpy()):
            assert img.shape == (8, 8, 3) and m.shape == (8, 8)
            np.testing.assert_array_equal(np.round(img * 255).astype(int)[..., 0], m)
            # the crop is a window of the original, possibly flipped
            rows, cols = m // 16, m % 16
            assert len(np.unique(np.diff(rows, axis=0))) == 1
            assert len(np.unique(np.diff(cols, axis=1))) == 1
            views.add((int(m[0, 0]), int(np.diff(rows, axis=0)[0, 0]),
                       int(np.diff(cols, axis=1)[0, 0])))
    flips = {(dr, dc) for _, dr, dc in views}
    assert flips == {(1, 1), (1, -1), (-1, 1), (-1, -1)}  # all four flip combinations
    assert len({corner for corner, _, _ in views}) > 5  # many crop positions


def test_training_pipeline_is_deterministic_for_a_seed():
    data = seg_data.make_synthetic(4, 16)

    def first(seed):
        ds = seg_data.make_dataset(data, batch_size=2, training=True, crop_size=8, seed=seed)
        return [m.numpy() for _, m in ds.take(3)]

    assert all(np.array_equal(a, b) for a, b in zip(first(0), first(0)))
    assert not all(np.array_equal(a, b) for a, b in zip(first(0), first(1)))


# ------------------------------------------------------------------- metrics
def test_iou_dice_and_accuracy_match_hand_computed_values():
    y_true = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    y_pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1]])
    cm = seg_metrics.confusion_matrix(y_true, y_pred, 2)
    np.testing.assert_array_equal(cm, [[2, 1], [1, 4]])
    m = seg_metrics.metrics_from_confusion(cm, ["membrane", "cell"])
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 4, FP 1, FN 1 -> 4/6
    assert m["per_class_iou"] == {"membrane": 0.5, "cell": pytest.approx(2 / 3)}
    assert m["mean_iou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["pixel_accuracy"] == 0.75
    assert m["dice"] == pytest.approx(8 / 10)  # class 1: 2*4 / (2*4 + 1 + 1)
    assert m["per_class_dice"]["membrane"] == pytest.approx(4 / 6)


def test_absent_class_has_no_iou_and_is_left_out_of_the_mean():
    m = seg_metrics.metrics_from_confusion(
        seg_metrics.confusion_matrix([0, 0, 1], [0, 0, 1], 3))
    assert m["per_class_iou"]["2"] is None
    assert m["mean_iou"] == 1.0 and "dice" not in m
    with pytest.raises(ValueError, match="outside 0..2"):
        seg_metrics.confusion_matrix([0, 3], [0, 1], 3)


def test_outputs_are_written_atomically(tmp_path):
    path = str(tmp_path / "out" / "results.json")
    seg_metrics.write_json(path, {"a": np.float32(1.5), "b": np.arange(2)})
    with open(path) as f:
        assert f.read().startswith('{\n  "a": 1.5')
    with pytest.raises(RuntimeError):
        seg_metrics.atomic_write(path, lambda tmp: (_ for _ in ()).throw(RuntimeError()))
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json"]  # no temp file left


def test_noise_on_gray_images_is_gray():
    data = seg_data.make_synthetic(2, 16)  # gray discs
    assert data.gray().all()
    images, _ = _batches(data, seg_data.parse_corruption("gaussian_noise:0.2"))
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    colour = seg_data.SegmentationData(
        images=np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3)).astype(np.uint8),
        masks=np.zeros((1, 16, 16), np.uint8), ids=["c"], class_names=["a", "b"], source="c")
    assert not colour.gray().any()
    noisy, _ = _batches(colour, seg_data.parse_corruption("gaussian_noise:0.2"))
    clean, _ = _batches(colour, None)
    delta = noisy - clean
    assert not np.allclose(delta[..., 0], delta[..., 1])


def test_outputs_get_the_usual_permissions(tmp_path):
    path = str(tmp_path / "results.json")
    seg_metrics.write_json(path, {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_validation_folder_replaces_the_split(tmp_path):
    import image_segmentation as recipe

    make_folder(str(tmp_path / "train"), n=4, size=8)
    make_folder(str(tmp_path / "val"), n=2, size=8, seed=1)
    args = recipe.parse_args(["--data", str(tmp_path / "train"), "--validation-data",
                              str(tmp_path / "val"), "--image-size", "8"])
    train, val = recipe.load_splits(args)
    assert len(train) == 4 and len(val) == 2  # nothing held out of the training folder
    make_folder(str(tmp_path / "val3"), n=2, size=8, values=(0, 128, 255))
    args.validation_data = str(tmp_path / "val3")
    with pytest.raises(seg_data.DataError, match="--validation-data has 3 classes"):
        recipe.load_splits(args)
