"""Input pipelines: labeled sets and open-world pools -> per-host numpy batches.

Every source yields the same raw element, `{"image": uint8 [H,W,C], "label": int64 (-1 when
unlabeled), "id": int64}`, read by *this process only* (TFDS: `tfds.split_for_jax_process`;
shards: file-level sharding; in-memory arrays: a strided slice). `preprocess` then puts the image
into the *teacher's* domain (size, channels, normalisation) — pool images included — and applies
the augmentation. Train streams are deterministic functions of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would; eval streams are padded with `mask = 0` rows
so every process runs the same number of steps and each example counts exactly once.

Segmentation (`data.target.task = "segmentation"`, `Domain.task`): a labeled element's `label`
is an int32 mask [H, W] (255 = ignore) instead of a class; sources `npz` (`images` + `masks`),
`folder` (`<path>/<split>/images/*`, `<path>/<split>/masks/*`, matched by file name stem) and
`segmnist` (the offline canvases). `preprocess_segmentation` transforms image and mask with the
same random scale / crop / flip, so they stay aligned; unlabeled pool images take the same path
without a mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import numpy as np

from kd_jax import fileio


class _LazyTensorFlow:
    """`tensorflow`, imported at its first use: the train steps and their benchmarks run without
    it (an accelerator host may have JAX but no TF), the input pipelines need it."""

    _module = None

    def __getattr__(self, name):
        if _LazyTensorFlow._module is None:
            import tensorflow

            # tf.data runs on the host CPU only; keep TF away from accelerators.
            tensorflow.config.set_visible_devices([], "GPU")
            _LazyTensorFlow._module = tensorflow
        return getattr(_LazyTensorFlow._module, name)


tf = _LazyTensorFlow()

NORMALIZATION = {
    # (mean, std) per channel, in [0, 1] units. CIFAR values are the Fast-Datafree/CMI ones,
    # which their public teachers were trained with.
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0,), (1.0,)),
}
AUGMENTATIONS = ("none", "crop", "crop_flip", "inception")
TASKS = ("classification", "segmentation")
# Joint image + mask augmentations of segmentation: a horizontal flip; a random crop of
# `image_size` (padded where smaller: image 0, mask ignore) + flip; the crop after a random
# rescale by a factor in `Domain.scale_range` (DeepLabV3's usual 0.5..2), with or without the
# flip (`scale_crop`: digits are not mirror-symmetric). DFAD's released NYUv2 code resizes to
# 256 px (shorter side) once, then takes 128 px crops + flip: `crop_flip`.
SEG_AUGMENTATIONS = ("none", "flip", "crop_flip", "scale_crop_flip", "scale_crop")
IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class Domain:
    """How the teacher sees an image; every stream (target or pool) is mapped into it."""

    image_size: int
    channels: int
    normalization: str
    eval_crop: float = 1.0  # ImageNet: resize to size/0.875 then centre crop.
    task: str = "classification"  # or "segmentation" (per-pixel labels)
    scale_range: tuple[float, float] = (0.5, 2.0)  # segmentation's `scale_crop(_flip)`
    eval_size: int = 0  # segmentation eval: 0 = full resolution, else resized to S x S

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"config.data.target.task={self.task!r}: use one of {TASKS}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi or self.eval_size < 0:
            raise ValueError(
                f"config.data.scale_range={self.scale_range} needs 0 < lo <= hi and "
                f"config.data.eval_size={self.eval_size} >= 0"
            )
        if self.normalization not in NORMALIZATION:
            raise ValueError(
                f"config.data.normalization={self.normalization!r} is not one of "
                f"{sorted(NORMALIZATION)}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"config.data.channels must be 1 or 3, got {self.channels}")


def domain_from_config(data_cfg) -> Domain:
    return Domain(
        image_size=data_cfg.image_size,
        channels=data_cfg.channels,
        normalization=data_cfg.normalization,
        eval_crop=data_cfg.get("eval_crop", 1.0),
        task=data_cfg.target.get("task", "classification") if "target" in data_cfg else TASKS[0],
        scale_range=tuple(data_cfg.get("scale_range", (0.5, 2.0))),
        eval_size=int(data_cfg.get("eval_size", 0)),
    )


# ---------------------------------------------------------------------------------------------
# Sources: spec -> (host-local tf.data.Dataset of raw elements, number of elements on this host)
# ---------------------------------------------------------------------------------------------


def open_source(
    spec,
    split: str,
    process_index: int = 0,
    process_count: int = 1,
    keep_ids: np.ndarray | None = None,
    classes: tuple[int, ...] | None = None,
):
    """Opens a labeled set or a pool as this host's share.

    spec.source: `tfds` (spec.name, spec.data_dir), `offline_mnist` (bundled MNIST-5k),
    `npz` (spec.path with `images` [N,H,W(,C)] uint8 and optional `labels`), `folder`
    (spec.path/<split>/<class>/*.png|jpg), `shards` (spec.pattern of TFRecord shards written by
    `kd_jax.data.make_shards`), `offline_pool` (the bundled open-world pool, built on first use).
    `keep_ids` keeps only elements whose id is listed (a pool selection); `classes` keeps only
    those labels (NCD splits). Returns (dataset, count on this host).
    """
    kind = spec.source
    if spec.get("task", "classification") == "segmentation":
        return _segmentation_source(spec, split, process_index, process_count)
    if kind == "tfds":
        ds, n = _tfds_source(spec, split, process_index, process_count)
    elif kind == "offline_mnist":
        from kd_jax.data import offline

        d = offline.mnist5k()
        key = "train" if split.startswith("train") else "test"
        ds, n = _array_source(d[f"{key}_images"], d[f"{key}_labels"], process_index, process_count)
    elif kind == "npz":
        ds, n = _npz_source(
            spec.path if "{split}" not in spec.path else spec.path.format(split=split),
            process_index,
            process_count,
        )
    elif kind == "folder":
        ds, n = _folder_source(fileio.join(spec.path, split), process_index, process_count)
    elif kind in ("shards", "offline_pool", "segmnist_pool"):
        pattern = spec.get("pattern", "")
        if kind == "offline_pool":
            from kd_jax.data import offline

            pattern = offline.ensure_offline_pool_shards(cache_dir=spec.get("cache_dir") or None)
        elif kind == "segmnist_pool":
            from kd_jax.data import segmnist

            pattern = segmnist.pool_pattern(spec)
        ds, n = _shard_source(pattern, process_index, process_count, keep_ids)
        keep_ids = None  # already applied before decoding
    else:
        raise ValueError(
            f"config.data source={kind!r}: expected one of tfds, offline_mnist, npz, "
            f"folder, shards, offline_pool, segmnist_pool"
        )
    if keep_ids is not None:
        ds, n = _filter_ids(ds, keep_ids), None
    if classes is not None:
        wanted = tf.constant(np.asarray(classes, np.int64))
        ds = ds.filter(lambda e: tf.reduce_any(tf.equal(e["label"], wanted)))
        n = None
    if n is None:  # count once (cheap for the filtered/in-memory cases this happens in)
        n = int(ds.map(lambda e: e["id"]).reduce(np.int64(0), lambda c, _: c + 1))
    return ds, n


def _segmentation_source(spec, split, process_index, process_count):
    """(dataset, count) of image + mask pairs: `npz`, `folder` or `segmnist`."""
    kind = spec.source
    if kind == "segmnist":
        from kd_jax.data import segmnist

        d = segmnist.canvases(split)
        return _mask_array_source(d["images"], d["masks"], process_index, process_count, "segmnist")
    if kind == "npz":
        path = spec.path.format(split=split) if "{split}" in spec.path else spec.path
        if not fileio.isfile(path):
            raise FileNotFoundError(f"config.data npz file {path!r} does not exist")
        z = fileio.load_npz(path)
        for key in ("images", "masks"):
            if key not in z:
                raise KeyError(
                    f"{path!r} has no {key!r} array (keys: {sorted(z.keys())}); a segmentation "
                    f"npz holds uint8 `images` [N,H,W,C] and `masks` [N,H,W] (255 = ignore)"
                )
        return _mask_array_source(z["images"], z["masks"], process_index, process_count, path)
    if kind == "folder":
        return _mask_folder_source(fileio.join(spec.path, split), process_index, process_count)
    raise ValueError(
        f"config.data.target.source={kind!r} with task='segmentation': use npz, folder or segmnist"
    )


def _mask_array_source(images, masks, process_index, process_count, what):
    images, masks = np.asarray(images), np.asarray(masks)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{what}: images must be uint8 [N,H,W] or [N,H,W,C], got {images.dtype} {images.shape}"
        )
    if masks.shape != images.shape[:3] or masks.dtype.kind not in "iu":
        raise ValueError(
            f"{what}: masks must be integer [N,H,W] = {images.shape[:3]} (255 = ignore), got "
            f"{masks.dtype} {masks.shape}"
        )
    if masks.size and (masks.min() < 0 or masks.max() > IGNORE_INDEX):
        raise ValueError(f"{what}: mask values must be in 0..255, got {masks.min()}..{masks.max()}")
    ids = np.arange(len(images), dtype=np.int64)
    sl = slice(process_index, None, process_count)
    ds = tf.data.Dataset.from_tensor_slices((images[sl], masks[sl].astype(np.int32), ids[sl])).map(
        lambda image, mask, idx: {"image": image, "label": mask, "id": idx}
    )
    return ds, len(ids[sl])


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def _mask_folder_source(root, process_index, process_count):
    images_dir, masks_dir = fileio.join(root, "images"), fileio.join(root, "masks")
    if not fileio.isdir(images_dir) or not fileio.isdir(masks_dir):
        raise FileNotFoundError(
            f"segmentation folder {root!r} needs images/ and masks/ (files matched by name)"
        )

    def by_stem(folder):
        out = {}
        for name in fileio.listdir(folder):
            stem, ext = name.rsplit(".", 1) if "." in name else (name, "")
            if f".{ext.lower()}" in _IMAGE_EXTENSIONS:
                out[stem] = fileio.join(folder, name)
        return out

    images, masks = by_stem(images_dir), by_stem(masks_dir)
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        raise ValueError(
            f"{root!r}: images/ and masks/ must hold the same names; unmatched: {unmatched[:5]}"
        )
    if not images:
        raise FileNotFoundError(f"no images under {images_dir!r}")
    stems = sorted(images)
    ids = np.arange(len(stems))[process_index::process_count]
    files = np.asarray([images[s] for s in stems])[ids]
    mask_files = np.asarray([masks[s] for s in stems])[ids]

    def load(path, mask_path, idx):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        mask = tf.io.decode_image(tf.io.read_file(mask_path), channels=1, expand_animations=False)
        return {"image": image, "label": tf.cast(mask[..., 0], tf.int32), "id": idx}

    ds = tf.data.Dataset.from_tensor_slices((files, mask_files, ids)).map(
        load, num_parallel_calls=tf.data.AUTOTUNE
    )
    return ds, len(ids)


def _element(image, label, idx):
    return {"image": image, "label": tf.cast(label, tf.int64), "id": tf.cast(idx, tf.int64)}


def _array_source(images, labels, process_index, process_count):
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 [N,H,W] or [N,H,W,C], got {images.dtype} {images.shape}"
        )
    labels = np.full(len(images), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    ids = np.arange(len(images), dtype=np.int64)
    sl = slice(process_index, None, process_count)
    ds = tf.data.Dataset.from_tensor_slices((images[sl], labels[sl], ids[sl])).map(_element)
    return ds, len(ids[sl])


def _npz_source(path, process_index, process_count):
    if not fileio.isfile(path):
        raise FileNotFoundError(f"config.data npz file {path!r} does not exist")
    z = fileio.load_npz(path)
    if "images" not in z:
        raise KeyError(f"{path!r} has no 'images' array (keys: {sorted(z.keys())})")
    images, labels = z["images"], z.get("labels")
    return _array_source(images, labels, process_index, process_count)


def _folder_source(root, process_index, process_count):
    if not fileio.isdir(root):
        raise FileNotFoundError(
            f"image folder {root!r} does not exist (expected <path>/<split>/<class>/<image files>)"
        )
    class_names = [d for d in fileio.listdir(root) if fileio.isdir(fileio.join(root, d))]
    files, labels = [], []
    for label, name in enumerate(class_names):
        for ext in ("png", "jpg", "jpeg", "JPEG", "PNG", "bmp"):
            found = fileio.glob(fileio.join(root, name, f"*.{ext}"))
            files += found
            labels += [label] * len(found)
    if not files:
        raise FileNotFoundError(f"no images under {root!r}/<class>/")
    ids = np.arange(len(files))[process_index::process_count]
    files = np.asarray(files)[ids]
    labels = np.asarray(labels, np.int64)[ids]

    def load(path, label, idx):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return _element(image, label, idx)

    ds = tf.data.Dataset.from_tensor_slices((files, labels, ids)).map(
        load, num_parallel_calls=tf.data.AUTOTUNE
    )
    return ds, len(ids)


def _tfds_source(spec, split, process_index, process_count):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(spec.name, data_dir=spec.get("data_dir") or None)
    except Exception as e:  # unknown name: tfds lists close matches in its message
        raise ValueError(f"config.data TFDS dataset {spec.name!r} is unknown: {e}") from e
    host_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count
    )
    try:
        ds = builder.as_dataset(split=host_split, shuffle_files=False)
    except AssertionError as e:  # tfds raises AssertionError when not prepared
        raise FileNotFoundError(
            f"TFDS dataset {spec.name!r} is not prepared in data_dir={builder.data_dir!r}. "
            f"Run `tfds build {spec.name} --data_dir=...` (imagenet2012 needs the manual "
            f"download in <data_dir>/downloads/manual, see the TFDS catalog), or set "
            f"config.data.*.data_dir. ({e})"
        ) from e
    try:
        n = builder.info.splits[host_split].num_examples
    except Exception:
        n = None
    image_key = spec.get("image_key", "image")
    label_key = spec.get("label_key", "label")
    ds = ds.enumerate().map(
        lambda i, e: _element(e[image_key], e.get(label_key, tf.constant(-1, tf.int64)), i)
    )
    if n is None:
        n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
    return ds, n


def _filter_ids(ds, keep_ids):
    keep_ids = np.asarray(keep_ids, np.int64)
    table = np.zeros(int(keep_ids.max(initial=-1)) + 2, bool)
    table[keep_ids] = True
    table = tf.constant(table)
    limit = tf.cast(tf.shape(table)[0] - 1, tf.int64)
    return ds.filter(lambda e: tf.gather(table, tf.minimum(e["id"], limit)))


def _shard_source(pattern, process_index, process_count, keep_ids):
    from kd_jax.data import shards

    before_decode = None
    if keep_ids is not None:
        keep_ids = np.asarray(keep_ids, np.int64)
        table = np.zeros(int(keep_ids.max(initial=-1)) + 2, bool)
        table[keep_ids] = True
        table_t = tf.constant(table)
        limit = tf.cast(tf.shape(table_t)[0] - 1, tf.int64)
        before_decode = lambda i: tf.gather(table_t, tf.minimum(i, limit))
    ds = shards.read_shards(
        pattern, process_index=process_index, process_count=process_count, keep_id_fn=before_decode
    )
    ds = ds.map(lambda e: {"image": e["image"], "label": e["label"], "id": e["id"]})
    n = shards.count_ids(
        pattern, process_index=process_index, process_count=process_count, keep_id_fn=before_decode
    )
    return ds, n


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _to_domain_channels(image, channels):
    have = image.shape[-1]
    if have == channels or have is None:
        return image
    if channels == 1:
        return tf.image.rgb_to_grayscale(image[..., :3])
    return tf.image.grayscale_to_rgb(image)


def _normalize(image, domain: Domain):
    mean, std = NORMALIZATION[domain.normalization]
    mean = tf.constant(mean, tf.float32) * 255.0
    std = tf.constant(std, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std


GEOMETRIES = ("domain", "pad_or_resized", "resized")
COLOURS = ("none", "simclr", "torchvision")


@dataclasses.dataclass(frozen=True)
class ViewAugment:
    """The augmentation of one training view (multi-view methods: UNO's large and small crops).

    `geometry`: `domain` is `data.augment`, as every stream; `resized` a random resized crop
    (area `scale`, aspect 3/4..4/3) to `size` px, then a flip; `pad_or_resized`, UNO's CIFAR
    choice, with p 1/2 the pad-and-crop of `crop` instead of the resized crop, then a flip.
    `colour`: `none`; `simclr` kd_jax's strong view (`_colour_jitter`); `torchvision`
    torchvision's ColorJitter(*jitter) (its four ops in random order) with p `jitter_p`, then
    grayscale, solarize (threshold ~ U[0, 256)), equalize and Gaussian blur (σ ~ U[blur_sigma])
    each with its own p. Jitter and grayscale need RGB: skipped on 1-channel images.
    """

    geometry: str = "domain"
    size: int = 0  # output side in px; 0 = the domain's image_size
    scale: tuple[float, float] = (0.08, 1.0)
    colour: str = "none"
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness .. hue
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    solarize_p: float = 0.0
    equalize_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        if self.geometry not in GEOMETRIES or self.colour not in COLOURS:
            raise ValueError(f"ViewAugment: geometry in {GEOMETRIES}, colour in {COLOURS}: {self}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1 or self.size < 0:
            raise ValueError(f"ViewAugment: need 0 < scale[0] <= scale[1] <= 1, size >= 0: {self}")


PLAIN_VIEW = ViewAugment()
SIMCLR_VIEW = ViewAugment(colour="simclr")  # kd_jax's strong second view (`strong=True`)
# Strong large view and small crop of each recipe. UNO's are its `utils/transforms.py`
# (DonkeyShot21/UNO): the "unsupervised" transform of the large views and
# `get_multicrop_transform` of the small crops; its CIFAR recipe has no grayscale and its
# ImageNet one no solarize / equalize but a Gaussian blur. `simclr` has no small-crop size.
STRONG_AUGMENTS = {
    "simclr": (SIMCLR_VIEW, ViewAugment(geometry="resized", colour="simclr")),
    "uno_cifar": (
        ViewAugment(
            geometry="pad_or_resized",
            scale=(0.5, 1.0),
            colour="torchvision",
            jitter_p=0.6,
            solarize_p=0.1,
            equalize_p=0.1,
        ),
        ViewAugment(
            geometry="resized",
            size=18,
            scale=(0.3, 0.8),
            colour="torchvision",
            jitter_p=0.8,
            solarize_p=0.2,
            equalize_p=0.2,
        ),
    ),
    "uno_imagenet": (
        ViewAugment(
            geometry="resized",
            scale=(0.5, 1.0),
            colour="torchvision",
            jitter_p=0.5,
            grayscale_p=0.2,
            blur_p=0.2,
        ),
        ViewAugment(
            geometry="resized",
            size=96,
            scale=(0.08, 0.5),
            colour="torchvision",
            jitter_p=0.8,
            grayscale_p=0.2,
            blur_p=0.5,
        ),
    ),
}


def _resized_crop(image, size, scale, seed):
    """Random crop of `scale` of the area, aspect 3/4..4/3 (the whole image when 10 draws
    fail), resized to size x size: Inception's / torchvision's RandomResizedCrop."""
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([1, 0, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, box_size)
    return tf.image.resize(image, (size, size), antialias=True)


def _to_size(image, domain: Domain, size: int):
    """The eval-time geometry: resize (ImageNet: shorter side, centre crop) to size x size."""
    if domain.eval_crop < 1.0:  # resize the shorter side, centre crop
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        scale = (size / domain.eval_crop) / tf.cast(tf.minimum(h, w), tf.float32)
        new = tf.cast(tf.round(tf.cast(tf.stack([h, w]), tf.float32) * scale), tf.int32)
        image = tf.image.resize(image, new, antialias=True)
        image = tf.image.resize_with_crop_or_pad(image, size, size)
    elif image.shape[0] != size or image.shape[1] != size:
        image = tf.image.resize(image, (size, size), antialias=True)
    return tf.ensure_shape(image, (size, size, domain.channels))


def _pad_crop(image, size, channels, seed):
    pad = 4 if size >= 32 else 2  # pad 4 px (2 for small images) then crop back
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.image.stateless_random_crop(image, (size, size, channels), seed=seed)


def preprocess(element, domain: Domain, augment: str, seed=None, strong: bool = False, view=None):
    """uint8 image -> normalised float32 [S,S,C] in the teacher's domain, with augmentation.

    `seed` is a stateless [2] int seed (per element), so augmentation is a pure function of
    (run seed, epoch, position) and a resumed run repeats it exactly. `view` (a `ViewAugment`)
    is the view's own augmentation on top of `augment`; `strong` is `view=SIMCLR_VIEW`, the
    colour jitter / grayscale of a second contrastive view (RGB only).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"config.data.augment={augment!r} is not one of {AUGMENTATIONS}")
    view = view or (SIMCLR_VIEW if strong else PLAIN_VIEW)
    image = tf.cast(_to_domain_channels(element["image"], domain.channels), tf.float32)
    size = view.size or domain.image_size
    train = seed is not None and (augment != "none" or view.geometry != "domain")
    if train:
        s = tf.random.experimental.stateless_split(seed, 6)
        # Seeds of the view options, apart so the `domain` + `simclr` draws stay as they were.
        v = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, 1 << 20), 8
        )
    if not train:
        image = _to_size(image, domain, size)
    elif view.geometry == "resized":
        image = _resized_crop(image, size, view.scale, v[0])
    elif view.geometry == "pad_or_resized":
        image = tf.cond(
            tf.random.stateless_uniform([], v[1]) < 0.5,
            lambda: _pad_crop(_to_size(image, domain, size), size, domain.channels, s[1]),
            lambda: _resized_crop(image, size, view.scale, v[0]),
        )
    elif augment == "inception":
        image = _resized_crop(image, size, (0.08, 1.0), s[0])
    else:
        image = _to_size(image, domain, size)
        if augment != "none":  # crop / crop_flip
            image = _pad_crop(image, size, domain.channels, s[1])
    if train:  # a crop of unknown channel count (tf.slice) gets its static shape back
        image = tf.ensure_shape(image, (size, size, domain.channels))
    flip = augment in ("crop_flip", "inception") or view.geometry != "domain"
    if train and flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=s[2])
    if train and view.colour == "simclr" and domain.channels == 3:
        image = _colour_jitter(image, s[3], s[4], s[5])
    if train and view.colour == "torchvision":
        image = _photometric(image, view, domain.channels == 3, v[2:])
    image = tf.clip_by_value(image, 0.0, 255.0)
    return tf.ensure_shape(_normalize(image, domain), (size, size, domain.channels))


def preprocess_segmentation(element, domain: Domain, augment: str, seed=None):
    """uint8 image (+ int mask [H,W] when `element["label"]` is one) -> (normalised float32
    image, int32 mask or None), image and mask under the same geometry.

    Train (`seed` given, `augment` in SEG_AUGMENTATIONS): `scale_crop_flip` rescales both by
    f ~ U(scale_range) (image bilinear, mask nearest), then a random `image_size` crop (padded
    where smaller: image 0, mask IGNORE_INDEX) and a horizontal flip with p 1/2, all from one
    stacked tensor so the same pixels move together; `scale_crop` is that without the flip,
    `crop_flip` without the rescale, `flip` resizes to `image_size` and flips. Eval (`seed` None or `none`): resized to
    `eval_size` when > 0 (mask nearest), else full resolution.
    """
    if augment not in SEG_AUGMENTATIONS:
        raise ValueError(
            f"config.data.augment={augment!r}: segmentation takes one of {SEG_AUGMENTATIONS}"
        )
    image = tf.cast(_to_domain_channels(element["image"], domain.channels), tf.float32)
    label = element["label"]
    has_mask = label.shape.rank == 2
    mask = tf.cast(label, tf.int32)[..., None] if has_mask else None

    def resize(image, mask, size):
        image = tf.image.resize(image, size, method="bilinear", antialias=True)
        if mask is not None:
            mask = tf.image.resize(mask, size, method="nearest")
        return image, mask

    channels = domain.channels
    if seed is None or augment == "none":
        if domain.eval_size:
            image, mask = resize(image, mask, (domain.eval_size, domain.eval_size))
    else:
        s = tf.random.experimental.stateless_split(seed, 3)
        size = domain.image_size
        if augment == "flip":
            image, mask = resize(image, mask, (size, size))
        if augment in ("scale_crop_flip", "scale_crop"):
            lo, hi = domain.scale_range
            factor = tf.random.stateless_uniform([], s[0], lo, hi)
            hw = tf.cast(tf.shape(image)[:2], tf.float32) * factor
            image, mask = resize(image, mask, tf.maximum(tf.cast(tf.round(hw), tf.int32), 1))
        if mask is None:  # an unlabeled (pool) image takes the same geometry
            stacked = image
        else:  # ignore + 1 so padding with 0 then subtracting 1 marks padded pixels ignore
            stacked = tf.concat([image, tf.cast(mask - IGNORE_INDEX - 1, tf.float32)], -1)
        if augment in ("crop_flip", "scale_crop_flip", "scale_crop"):
            hw = tf.shape(stacked)[:2]
            pad = tf.maximum(size - hw, 0)
            stacked = tf.pad(
                stacked,
                [[pad[0] // 2, pad[0] - pad[0] // 2], [pad[1] // 2, pad[1] - pad[1] // 2], [0, 0]],
            )
            depth = channels + (mask is not None)
            stacked = tf.image.stateless_random_crop(stacked, (size, size, depth), seed=s[1])
        if augment.endswith("flip"):
            stacked = tf.image.stateless_random_flip_left_right(stacked, seed=s[2])
        image = stacked[..., :channels]
        if mask is not None:
            mask = tf.cast(tf.round(stacked[..., channels:]), tf.int32) + IGNORE_INDEX + 1
            mask = tf.where(mask > IGNORE_INDEX, IGNORE_INDEX, mask)
        image = tf.ensure_shape(image, (size, size, channels))
    image = tf.clip_by_value(image, 0.0, 255.0)
    return _normalize(image, domain), (None if mask is None else mask[..., 0])


def _colour_jitter(image, seed_apply, seed_jitter, seed_gray):
    """SimCLR-style jitter (strength 0.4, p = 0.8) and grayscale (p = 0.2), on [0, 255]."""
    x = image / 255.0
    k = tf.random.experimental.stateless_split(seed_jitter, 4)
    jittered = tf.image.stateless_random_brightness(x, 0.4, k[0])
    jittered = tf.image.stateless_random_contrast(jittered, 0.6, 1.4, k[1])
    jittered = tf.image.stateless_random_saturation(jittered, 0.6, 1.4, k[2])
    jittered = tf.image.stateless_random_hue(jittered, 0.1, k[3])
    x = tf.where(tf.random.stateless_uniform([], seed_apply) < 0.8, jittered, x)
    gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))
    x = tf.where(tf.random.stateless_uniform([], seed_gray) < 0.2, gray, x)
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def _photometric(image, view: ViewAugment, rgb: bool, seeds):
    """`colour = torchvision` on [0, 255]: jitter, grayscale, solarize, equalize, blur, in the
    order of UNO's transforms (each only where its p > 0, so an unused op costs nothing)."""
    k = [seeds[i] for i in range(6)]

    def draw(seed):
        return tf.random.stateless_uniform([], seed)

    x = image
    if rgb and view.jitter_p > 0:
        x = tf.cond(
            draw(k[0]) < view.jitter_p,
            lambda: _torchvision_jitter(x / 255.0, view.jitter, k[1]) * 255.0,
            lambda: x,
        )
    if rgb and view.grayscale_p > 0:
        gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))
        x = tf.where(draw(k[2]) < view.grayscale_p, gray, x)
    if view.solarize_p > 0:  # PIL's solarize: values >= threshold are inverted
        ks = tf.random.experimental.stateless_split(k[3], 2)
        threshold = tf.random.stateless_uniform([], ks[1]) * 256.0
        solarized = tf.where(x >= threshold, 255.0 - x, x)
        x = tf.where(draw(ks[0]) < view.solarize_p, solarized, x)
    if view.equalize_p > 0:
        x = tf.cond(draw(k[4]) < view.equalize_p, lambda: _equalize(x), lambda: x)
    if view.blur_p > 0:
        kb = tf.random.experimental.stateless_split(k[5], 2)
        lo, hi = view.blur_sigma
        sigma = tf.random.stateless_uniform([], kb[1], lo, hi)
        x = tf.cond(draw(kb[0]) < view.blur_p, lambda: _gaussian_blur(x, sigma, hi), lambda: x)
    return x


def _torchvision_jitter(x, strengths, seed):
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) on RGB in [0, 1]: a
    factor per op (brightness / contrast / saturation ~ U[1 - s, 1 + s], hue ~ U[-h, h]) and
    the four ops in a random order. Brightness scales, contrast and saturation blend with the
    grayscale mean / image (not TF's additive brightness and HSV saturation)."""
    b, c, s, h = strengths
    k = tf.random.experimental.stateless_split(seed, 5)
    fb = tf.random.stateless_uniform([], k[0], max(0.0, 1 - b), 1 + b)
    fc = tf.random.stateless_uniform([], k[1], max(0.0, 1 - c), 1 + c)
    fs = tf.random.stateless_uniform([], k[2], max(0.0, 1 - s), 1 + s)
    fh = tf.random.stateless_uniform([], k[3], -h, h)
    order = tf.argsort(tf.random.stateless_uniform([4], k[4]))

    def blend(y, other, factor):
        return tf.clip_by_value(factor * y + (1 - factor) * other, 0.0, 1.0)

    ops = (
        lambda y: tf.clip_by_value(y * fb, 0.0, 1.0),
        lambda y: blend(y, tf.reduce_mean(tf.image.rgb_to_grayscale(y)), fc),
        lambda y: blend(y, tf.image.rgb_to_grayscale(y), fs),
        lambda y: tf.clip_by_value(tf.image.adjust_hue(y, fh), 0.0, 1.0),
    )
    for i in range(4):
        x = tf.switch_case(order[i], [functools.partial(op, x) for op in ops])
    return x


def _equalize(image):
    """PIL's ImageOps.equalize on [0, 255], per channel of the rounded uint8 values: the LUT
    (step // 2 + pixels below v) // step with step = (pixels - count of the top value) // 255
    (Pillow's current divisor; older Pillow used 256), identity when step is 0."""
    q = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.int32)
    channels = []
    for c in range(image.shape[-1]):
        ch = q[..., c]
        hist = tf.math.bincount(tf.reshape(ch, [-1]), minlength=256, maxlength=256)
        top = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
        step = (tf.reduce_sum(hist) - top) // 255
        lut = tf.minimum((tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1), 255)
        channels.append(tf.where(step > 0, tf.gather(lut, ch), ch))
    return tf.cast(tf.stack(channels, axis=-1), tf.float32)


def _gaussian_blur(image, sigma, max_sigma):
    """Separable Gaussian blur of std `sigma` px (PIL's GaussianBlur radius), edges mirrored;
    the kernel spans 3 · max_sigma so its shape is static."""
    radius = int(math.ceil(3 * max_sigma))
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / tf.reduce_sum(kernel)
    channels = image.shape[-1]
    x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
    column = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    x = tf.nn.depthwise_conv2d(x, column, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, tf.reshape(column, [1, -1, channels, 1]), [1, 1, 1, 1], "VALID")
    return x[0]


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


def train_iterator(
    ds,
    *,
    local_batch: int,
    steps_per_epoch: int,
    domain: Domain,
    augment: str,
    seed: int,
    start_step: int = 0,
    views: int = 1,
    shuffle_buffer: int = 16384,
    cache: bool = False,
    view_augments: dict[str, ViewAugment] | None = None,
) -> Iterator[dict]:
    """Infinite per-host stream of `{"image"[, "image2"], "label", "id"}` numpy batches.

    Epoch e shuffles with seed (seed, e) and augments element k with seed (seed, e, k), so batch
    t is a pure function of (seed, t): on resume we skip whole epochs and, inside the current
    epoch, the first elements *before* decoding/augmenting them. `views=2` adds a strong second
    view (`SIMCLR_VIEW`); `view_augments` (batch key -> `ViewAugment`, e.g. UNO's two large
    views and its small crops) replaces both: the i-th view augments with seed (seed, e, k, i).
    """
    if steps_per_epoch < 1:
        raise ValueError(
            f"this host holds fewer examples than one local batch ({local_batch}); lower "
            f"config.batch_size or use a larger transfer set"
        )
    if domain.task == "segmentation" and (views not in (1, 2) or view_augments):
        raise ValueError("segmentation streams have one or two views (no view_augments)")
    if cache:
        ds = ds.cache()
    if view_augments is None:
        view_augments = {"image": PLAIN_VIEW, **({"image2": SIMCLR_VIEW} if views == 2 else {})}
    epoch = start_step // steps_per_epoch
    skip = (start_step % steps_per_epoch) * local_batch
    while True:
        epoch_ds = ds.shuffle(
            shuffle_buffer, seed=seed * 100003 + epoch, reshuffle_each_iteration=False
        )
        epoch_ds = epoch_ds.take(steps_per_epoch * local_batch).enumerate().skip(skip)

        def prep(k, e, epoch=epoch):
            elem_seed = tf.random.experimental.stateless_fold_in(
                tf.constant([seed, epoch], tf.int64), k
            )
            out = {"label": e["label"], "id": e["id"]}
            if domain.task == "segmentation":
                return _segmentation_train_element(e, domain, augment, elem_seed, views)
            for i, (key, view) in enumerate(view_augments.items()):
                view_seed = (
                    elem_seed if i == 0 else tf.random.experimental.stateless_fold_in(elem_seed, i)
                )
                out[key] = preprocess(e, domain, augment, view_seed, view=view)
            return out

        epoch_ds = epoch_ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        epoch_ds = epoch_ds.batch(local_batch, drop_remainder=True).prefetch(2)
        yield from epoch_ds.as_numpy_iterator()
        epoch, skip = epoch + 1, 0


def _segmentation_train_element(e, domain: Domain, augment: str, seed, views: int) -> dict:
    """One augmented segmentation training element: `image` and `label` (the mask, or the
    pool's -1), plus for an unlabeled (pool) image `valid` [H, W] float (0 where the crop
    padded it: no pixel of the image is there) and, with `views=2`, `image2`, a second
    independent rescale / crop / flip of the same image (ODSD's L_SR views; geometric only)."""
    out = {"label": e["label"], "id": e["id"]}
    if e["label"].shape.rank == 2:
        out["image"], out["label"] = preprocess_segmentation(e, domain, augment, seed)
    else:  # a zero mask through the same geometry marks the padded pixels ignore
        zeros = tf.zeros(tf.shape(e["image"])[:2], tf.int32)
        out["image"], mask = preprocess_segmentation(dict(e, label=zeros), domain, augment, seed)
        out["valid"] = tf.cast(tf.not_equal(mask, IGNORE_INDEX), tf.float32)
    if views == 2:
        seed2 = tf.random.experimental.stateless_fold_in(seed, 1)
        out["image2"], _ = preprocess_segmentation(e, domain, augment, seed2)
    return out


def eval_batches(ds, *, host_count: int, max_host_count: int, local_batch: int, domain: Domain):
    """Per-host padded eval batches with a `mask`; every host yields the same number.
    Segmentation: `label` [B, H, W] masks, padding rows all IGNORE_INDEX."""
    num_batches = max(1, math.ceil(max_host_count / local_batch))
    if domain.task == "segmentation":
        return _segmentation_eval_batches(ds, host_count, num_batches, local_batch, domain)
    real = ds.map(
        lambda e: {
            "image": preprocess(e, domain, "none"),
            "label": e["label"],
            "id": e["id"],
            "mask": tf.constant(1.0),
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    pad = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros((domain.image_size, domain.image_size, domain.channels)),
            "label": tf.constant(-1, tf.int64),
            "id": tf.constant(-1, tf.int64),
            "mask": tf.constant(0.0),
        }
    ).repeat()
    full = real.take(host_count).concatenate(pad).take(num_batches * local_batch)
    return full.batch(local_batch, drop_remainder=True).prefetch(2)


def _segmentation_eval_batches(ds, host_count, num_batches, local_batch, domain):
    def prep(e):
        image, mask = preprocess_segmentation(e, domain, "none")
        return {"image": image, "label": mask, "id": e["id"], "mask": tf.constant(1.0)}

    real = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    shape = real.element_spec["image"].shape
    if not shape.is_fully_defined():
        raise ValueError(
            "segmentation eval images of unknown or varying size: set config.data.eval_size "
            "(images and masks resized to that square) to batch them"
        )
    pad = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros(shape),
            "label": tf.fill(shape[:2], IGNORE_INDEX),
            "id": tf.constant(-1, tf.int64),
            "mask": tf.constant(0.0),
        }
    ).repeat()
    full = real.take(host_count).concatenate(pad).take(num_batches * local_batch)
    return full.batch(local_batch, drop_remainder=True).prefetch(2)
