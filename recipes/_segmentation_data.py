"""Images and masks for the segmentation recipe: loading, corruptions, augmentation.

Sources (all end up as a `SegmentationData`: uint8 images `(N, H, W, 3)` and
uint8 class masks `(N, H, W)`, resized to one square size):

- a local folder with `image/` and `label/` (the layout of the ISBI 2012
  membrane data: `image/N.png` + `label/N.png`); mask values are mapped to
  classes in sorted order (ISBI: 0 = membrane -> class 0, 255 = cell
  interior -> class 1), or as `mask_values` says;
- `tfds:oxford_iiit_pet` (downloaded by tensorflow-datasets): the trimap
  masks (1 pet, 2 background, 3 border) become classes 0, 1, 2;
- `synthetic`: generated discs on a noisy background (offline demos, tests).

`corrupt` (Gaussian noise, blur, contrast) changes images only, with a fixed
draw per image (seeded by the image's id), as a corrupted copy of a data set
would. `make_dataset` crops and flips training images and their masks
together.

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf

__all__ = [
    "CORRUPTIONS",
    "Corruption",
    "DataError",
    "SegmentationData",
    "corrupt",
    "load_data",
    "load_folder",
    "load_tfds",
    "make_dataset",
    "make_synthetic",
    "parse_corruption",
    "select",
    "split",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
MAX_CLASSES = 64
"""More distinct mask values than this means the masks are not class maps."""
CORRUPTIONS = ("gaussian_noise", "blur", "contrast")
# Oxford-IIIT Pet trimaps: 1 = pet, 2 = background, 3 = border.
PET_MASK_VALUES = (1, 2, 3)
PET_CLASS_NAMES = ("pet", "background", "border")


class DataError(ValueError):
    """A data source cannot be used as it is (the message says why and what to do)."""


@dataclasses.dataclass
class SegmentationData:
    """Images, masks and where they came from.

    Attributes:
        images: uint8 `(N, H, W, 3)`.
        masks: uint8 `(N, H, W)`, class indices `0..len(class_names) - 1`.
        ids: one name per image (file stem, or `tfds` id); corruption draws
            are seeded by it, so an image is corrupted the same way in any
            subset.
        class_names: one per class.
        source: a description for the results.
    """

    images: np.ndarray
    masks: np.ndarray
    ids: list
    class_names: list
    source: str

    def __len__(self):
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def gray(self) -> np.ndarray:
        """Per image: True when it is gray (its three channels are equal)."""
        x = self.images
        return np.all((x[..., 0] == x[..., 1]) & (x[..., 0] == x[..., 2]), axis=(1, 2))

    def subset(self, indices) -> SegmentationData:
        indices = list(indices)
        return dataclasses.replace(
            self,
            images=self.images[indices],
            masks=self.masks[indices],
            ids=[self.ids[i] for i in indices],
        )


# ------------------------------------------------------------------- folders
def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _listing(folder: str) -> dict:
    """stem -> file name, for the visible files of `folder`."""
    out = {}
    for name in sorted(os.listdir(folder), key=_natural_key):
        if name.startswith(".") or os.path.isdir(os.path.join(folder, name)):
            continue
        stem = os.path.splitext(name)[0]
        if stem in out:
            raise DataError(
                f"Two files in {folder} have the stem {stem!r} ({out[stem]!r}, {name!r}); "
                "images and masks are paired by stem, so stems must be unique."
            )
        out[stem] = name
    return out


def _decode(path: str) -> np.ndarray:
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise DataError(
            f"{path} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)}). "
            "Keep only images in image/ and label/."
        )
    try:
        with open(path, "rb") as f:
            return tf.io.decode_image(f.read(), expand_animations=False).numpy()
    except tf.errors.InvalidArgumentError as error:
        raise DataError(
            f"{path} could not be decoded as an image ({error.message.splitlines()[0]})."
        ) from None


def _as_rgb(image: np.ndarray, path: str) -> np.ndarray:
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 2:  # gray + alpha
        return np.repeat(image[..., :1], 3, axis=-1)
    if channels in (3, 4):
        return image[..., :3]
    raise DataError(f"{path} has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")


def _as_single_channel(mask: np.ndarray, path: str) -> np.ndarray:
    if mask.shape[-1] == 1:
        return mask[..., 0]
    colour = mask[..., :3] if mask.shape[-1] >= 3 else mask[..., :1]
    if np.all(colour == colour[..., :1]):
        return colour[..., 0]
    raise DataError(
        f"{path} is a colour mask (its channels differ). Masks must hold one value per "
        "class in a single channel (e.g. 0 and 255, or 0, 1, 2, ...)."
    )


def _find_pair_folders(folder: str) -> tuple[str, str]:
    for root in (folder, os.path.join(folder, "train")):
        image_dir, label_dir = os.path.join(root, "image"), os.path.join(root, "label")
        if os.path.isdir(image_dir) and os.path.isdir(label_dir):
            return image_dir, label_dir
    if not os.path.isdir(folder):
        raise DataError(f"Data folder {folder!r} does not exist.")
    raise DataError(
        f"Data folder {folder!r} has no image/ and label/ subfolders (nor train/image and "
        "train/label). Expected image/N.png with its mask in label/N.png."
    )


def _paired_listings(image_dir: str, label_dir: str):
    """stem -> file name in each folder; DataError unless every image has its mask."""
    images, labels = _listing(image_dir), _listing(label_dir)
    if not images:
        raise DataError(f"{image_dir} has no files.")
    missing = [images[s] for s in images if s not in labels]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) in {image_dir} have no mask in {label_dir} (paired by "
            f"file stem): {missing[:5]}."
        )
    orphans = [labels[s] for s in labels if s not in images]
    if orphans:
        raise DataError(
            f"{len(orphans)} mask(s) in {label_dir} have no image in {image_dir}: {orphans[:5]}."
        )
    return images, labels


def load_folder(
    folder: str,
    image_size: int,
    *,
    mask_values=None,
    class_names=None,
    max_examples: int | None = None,
) -> SegmentationData:
    """Loads `folder/image/*` and their masks `folder/label/*` (paired by file stem).

    Images become RGB (gray is repeated) and are resized to
    `image_size x image_size` by area averaging; masks are mapped to classes
    (`mask_values[i]` -> class `i`; by default the sorted distinct values of
    all masks) and resized by nearest neighbour.

    Raises:
        DataError: missing folders, an image without a mask (or a mask
            without an image), a file that is not an image, an image and
            mask of different sizes, a colour mask, or mask values that are
            not in `mask_values`.
    """
    image_dir, label_dir = _find_pair_folders(folder)
    images, labels = _paired_listings(image_dir, label_dir)
    stems = list(images)[:max_examples] if max_examples else list(images)
    raw_images, raw_masks = [], []
    for stem in stems:
        image_path = os.path.join(image_dir, images[stem])
        mask_path = os.path.join(label_dir, labels[stem])
        image = _as_rgb(_decode(image_path), image_path)
        mask = _as_single_channel(_decode(mask_path), mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} "
                f"is {mask.shape[1]}x{mask.shape[0]} (width x height); they must match."
            )
        raw_images.append(image)
        raw_masks.append(mask)

    found = sorted(set(np.unique(np.concatenate([np.unique(m) for m in raw_masks])).tolist()))
    if mask_values is None:
        if len(found) > MAX_CLASSES:
            raise DataError(
                f"The masks in {label_dir} hold {len(found)} distinct values; more than "
                f"{MAX_CLASSES} means they are not class maps. Pass the class values "
                "explicitly (--mask-values 0,255)."
            )
        if len(found) < 2:
            raise DataError(
                f"Every mask in {label_dir} has the single value {found}: nothing to segment."
            )
        mask_values = found
    mask_values = [int(v) for v in mask_values]
    unknown = sorted(set(found) - set(mask_values))
    if unknown:
        raise DataError(
            f"The masks in {label_dir} hold values {unknown[:10]} that are not in "
            f"mask_values={mask_values}."
        )
    lookup = np.zeros(256, np.uint8)
    lookup[mask_values] = np.arange(len(mask_values), dtype=np.uint8)
    if class_names is None:
        class_names = [f"value_{v}" for v in mask_values]
    _check_class_names(class_names, len(mask_values))
    return SegmentationData(
        images=np.stack([_resize_image(im, image_size) for im in raw_images]),
        masks=np.stack([_resize_mask(lookup[m], image_size) for m in raw_masks]),
        ids=stems,
        class_names=list(class_names),
        source=os.path.normpath(folder),
    )


def _check_class_names(class_names, num_classes):
    if len(class_names) != num_classes:
        raise DataError(
            f"Got {len(class_names)} class names ({list(class_names)}) for {num_classes} "
            "classes."
        )


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image.astype(np.uint8)
    out = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="area")
    return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask.astype(np.uint8)
    out = tf.image.resize(mask[..., None], (size, size), method="nearest")
    return out.numpy()[..., 0].astype(np.uint8)


# ---------------------------------------------------------------------- TFDS
def load_tfds(spec: str, image_size: int, *, split: str, max_examples: int | None = None):
    """`tfds:oxford_iiit_pet` (the only TFDS source the recipe maps masks for).

    Raises:
        DataError: an unknown data set name.
        RuntimeError: tensorflow-datasets could not download or prepare it.
    """
    name = spec.split(":", 1)[1]
    if name.split("/")[0].split(":")[0] != "oxford_iiit_pet":
        raise DataError(
            f"Unknown TFDS segmentation data set {name!r}: the recipe maps the masks of "
            "'tfds:oxford_iiit_pet'. For other data, export image/N.png + label/N.png and "
            "pass the folder."
        )
    import tensorflow_datasets as tfds

    print(f"Loading {spec} ({split}) with tensorflow-datasets; the first use downloads it "
          "(about 800 MB). Offline, pass --data FOLDER or --data synthetic.")
    try:
        ds = tfds.load(name, split=split, shuffle_files=False)
    except Exception as error:  # network, quota, disk: say what to do instead
        raise RuntimeError(
            f"Could not load {spec} (split {split!r}) with tensorflow-datasets: "
            f"{type(error).__name__}: {str(error)[:300]}. Offline? Pass a local folder "
            "(--data FOLDER with image/N.png + label/N.png, e.g. "
            "../shared/data/isbi2012-membrane/train) or --data synthetic."
        ) from error
    if max_examples:
        ds = ds.take(max_examples)
    lookup = np.full(256, 255, np.uint8)
    lookup[list(PET_MASK_VALUES)] = np.arange(len(PET_MASK_VALUES), dtype=np.uint8)
    images, masks, ids = [], [], []
    for i, example in enumerate(ds.as_numpy_iterator()):
        image = _as_rgb(example["image"], f"{spec}[{i}]")
        mask = lookup[_as_single_channel(example["segmentation_mask"], f"{spec}[{i}]")]
        if (mask == 255).any():
            raise DataError(
                f"{spec} example {i} has mask values outside {PET_MASK_VALUES}."
            )
        images.append(_resize_image(image, image_size))
        masks.append(_resize_mask(mask, image_size))
        file_name = example.get("file_name", b"")
        ids.append(file_name.decode() if isinstance(file_name, bytes) and file_name
                   else f"{split}_{i}")
    if not images:
        raise DataError(f"{spec} split {split!r} is empty.")
    return SegmentationData(
        images=np.stack(images), masks=np.stack(masks), ids=ids,
        class_names=list(PET_CLASS_NAMES), source=f"{spec} ({split})",
    )


# ----------------------------------------------------------------- synthetic
def make_synthetic(num_examples: int, image_size: int, seed: int = 0) -> SegmentationData:
    """Bright discs (class 1) on a darker, textured background (class 0)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:image_size, :image_size]
    images, masks = [], []
    for _ in range(num_examples):
        mask = np.zeros((image_size, image_size), np.uint8)
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.uniform(0, image_size, 2)
            r = rng.uniform(0.08, 0.2) * image_size
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        image = 0.3 + 0.4 * mask + rng.normal(0, 0.08, mask.shape)
        image = np.clip(image * 255, 0, 255).astype(np.uint8)
        images.append(np.repeat(image[..., None], 3, axis=-1))
        masks.append(mask)
    return SegmentationData(
        images=np.stack(images), masks=np.stack(masks),
        ids=[f"synthetic_{seed}_{i}" for i in range(num_examples)],
        class_names=["background", "disc"], source=f"synthetic (seed {seed})",
    )


def load_data(spec: str, image_size: int, *, split: str = "train", mask_values=None,
              class_names=None, max_examples=None, synthetic_examples: int = 32):
    """Dispatches on `spec`: `tfds:NAME`, `synthetic`, or a folder."""
    if spec.startswith("tfds:"):
        data = load_tfds(spec, image_size, split=split, max_examples=max_examples)
        if class_names is not None:
            _check_class_names(class_names, data.num_classes)
            data.class_names = list(class_names)
        return data
    if spec == "synthetic":
        n = max_examples or synthetic_examples
        data = make_synthetic(n, image_size, seed=0 if split == "train" else 1)
        if class_names is not None:
            _check_class_names(class_names, data.num_classes)
            data.class_names = list(class_names)
        return data
    return load_folder(spec, image_size, mask_values=mask_values, class_names=class_names,
                       max_examples=max_examples)


# -------------------------------------------------------------------- splits
def split(data: SegmentationData, validation_split: float, seed: int = 0):
    """A deterministic (seeded) split into training and validation parts."""
    if not 0 < validation_split < 1:
        raise DataError(
            f"validation_split must be in (0, 1). Received: {validation_split!r}."
        )
    n = len(data)
    n_val = max(1, round(n * validation_split))
    if n - n_val < 1:
        raise DataError(f"{n} image(s) are too few to hold out {validation_split:.0%}.")
    order = np.random.default_rng(seed).permutation(n)
    return data.subset(sorted(order[n_val:])), data.subset(sorted(order[:n_val]))


def select(data: SegmentationData, start=None, stop=None, count=None, seed=0):
    """`data[start:stop]`, then `count` of those drawn with `seed` (in their order)."""
    part = data.subset(range(len(data))[slice(start, stop)])
    if len(part) == 0:
        raise DataError(
            f"The training range {start}:{stop} of {len(data)} image(s) is empty."
        )
    if count is not None:
        if not 1 <= count <= len(part):
            raise DataError(
                f"Cannot take {count} training image(s) from {len(part)} (range {start}:{stop})."
            )
        chosen = np.random.default_rng(seed).choice(len(part), size=count, replace=False)
        part = part.subset(sorted(chosen.tolist()))
    return part


# --------------------------------------------------------------- corruptions
@dataclasses.dataclass(frozen=True)
class Corruption:
    """`gaussian_noise` (sigma on [0, 1] intensities), `blur` (sigma in pixels) or
    `contrast` (factor around each image's mean)."""

    kind: str
    value: float

    def __str__(self):
        return f"{self.kind}:{self.value:g}"


def parse_corruption(spec: str | None) -> Corruption | None:
    if spec in (None, "", "none"):
        return None
    kind, _, value = spec.partition(":")
    if kind not in CORRUPTIONS or not value:
        raise ValueError(
            "--corrupt must be gaussian_noise:SIGMA, blur:SIGMA or contrast:FACTOR. "
            f"Received: {spec!r}."
        )
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--corrupt {spec!r}: {value!r} is not a number.") from None
    if not math.isfinite(number) or number < 0 or (kind == "blur" and number == 0):
        raise ValueError(
            f"--corrupt {spec!r}: the value must be a finite number >= 0 (> 0 for blur)."
        )
    return Corruption(kind, number)


def image_key(image_id: str) -> int:
    """A stable 31-bit number per image id (seeds its corruption draw)."""
    return zlib.crc32(str(image_id).encode()) & 0x7FFFFFFF


def _gaussian_kernel(sigma: float):
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum(), radius


def corrupt(image, key, corruption: Corruption | None, seed: int = 0, grayscale: bool = False):
    """Corrupts one float image `(H, W, C)` in [0, 1]; the same (key, seed) gives the same draw.

    `grayscale` (a bool or bool tensor): the image is gray (channels equal),
    so the noise is gray too.
    """
    if corruption is None:
        return image
    if corruption.kind == "gaussian_noise":
        noise = tf.random.stateless_normal(
            tf.shape(image), seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(key, tf.int64)]),
            stddev=corruption.value,
        )
        noise = tf.where(grayscale, tf.broadcast_to(noise[..., :1], tf.shape(noise)), noise)
        return tf.clip_by_value(image + noise, 0.0, 1.0)
    if corruption.kind == "contrast":
        mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)
        return tf.clip_by_value((image - mean) * corruption.value + mean, 0.0, 1.0)
    kernel, radius = _gaussian_kernel(corruption.value)
    channels = image.shape[-1] or 3
    x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
    k = tf.constant(kernel)
    kx = tf.tile(tf.reshape(k, (1, -1, 1, 1)), (1, 1, channels, 1))
    ky = tf.tile(tf.reshape(k, (-1, 1, 1, 1)), (1, 1, channels, 1))
    x = tf.nn.depthwise_conv2d(x, kx, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, ky, [1, 1, 1, 1], "VALID")
    return tf.clip_by_value(x[0], 0.0, 1.0)


# ------------------------------------------------------------------ pipeline
def augment(image, mask, seed, crop_size: int | None, flip: bool = True):
    """Random crop and flips, the same for `image` `(H, W, C)` and `mask` `(H, W)`.

    `seed` is a shape-[2] int tensor (stateless ops: the same seed, the same result).
    """
    mask = tf.cast(mask, image.dtype)[..., None]
    both = tf.concat([image, mask], axis=-1)
    channels = both.shape[-1]
    if crop_size:
        both = tf.image.stateless_random_crop(
            both, (crop_size, crop_size, channels), seed=seed
        )
    if flip:
        both = tf.image.stateless_random_flip_left_right(both, seed=seed + 1)
        both = tf.image.stateless_random_flip_up_down(both, seed=seed + 2)
    return both[..., :-1], tf.cast(tf.round(both[..., -1]), tf.int32)


def make_dataset(
    data: SegmentationData,
    *,
    batch_size: int,
    training: bool,
    corruption: Corruption | None = None,
    corrupt_seed: int = 0,
    crop_size: int | None = None,
    flip: bool = True,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of `(image float32 in [0, 1], mask int32)`.

    Training: shuffled, repeated forever (pass `steps_per_epoch` to `fit`),
    cropped and flipped with image and mask kept aligned; deterministic for
    a given `seed`. Otherwise: the images in order, once, whole.
    Corruptions apply to images only, the same way in both.
    """
    keys = np.array([image_key(i) for i in data.ids], np.int64)
    ds = tf.data.Dataset.from_tensor_slices((data.images, data.masks, keys, data.gray()))

    def load(image, mask, key, gray):
        image = corrupt(tf.cast(image, tf.float32) / 255.0, key, corruption, corrupt_seed, gray)
        return image, tf.cast(mask, tf.int32)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training:
        ds = ds.cache().shuffle(len(data), seed=seed, reshuffle_each_iteration=True).repeat()
        randoms = tf.data.Dataset.random(seed=seed)
        ds = tf.data.Dataset.zip((ds, randoms)).map(
            lambda pair, r: augment(
                pair[0], pair[1], tf.stack([r, tf.constant(seed, tf.int64)]), crop_size, flip
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
