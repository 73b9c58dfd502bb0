"""Real image datasets and generated sine sequences for meta-training tasks.

This module owns:

* where datasets live: :func:`resolve_root` picks one data root (the ``data_root`` argument, then
  ``$METAOPT_DATA``, then ``~/.cache/metaopt``) and :func:`find_dataset` looks for a dataset's files under it
  (Fashion-MNIST is also found where Debian's ``dataset-fashion-mnist`` package installs it);
* reading them: Fashion-MNIST through a small strict IDX parser (:func:`read_idx`), MNIST and CIFAR-10 through
  torchvision's own loaders and on-disk formats;
* holding them: :class:`ImageDataset` keeps the official train/test splits plus a validation split carved from
  train as uint8 tensors on one device, so :meth:`ImageDataset.batch` samples with one ``randint`` and an index,
  never a Python loop or the disk. Loaded datasets are cached in-process (:func:`clear_cache` empties the cache);
* the generated sine-sequence regression data of HyperAdam (Wang et al., 2019, Sec. 5): :class:`SineSequences`.

Nothing here downloads unless asked (``download=True``); a missing dataset raises :class:`DatasetNotFoundError`
naming every place searched and how to get the data. ``python -m meta_tasks.datasets --check NAME`` reports where
a dataset is found.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import pickle
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageDataset",
    "SineBatch",
    "SineSequences",
    "Split",
    "clear_cache",
    "find_dataset",
    "load_dataset",
    "read_idx",
    "resolve_root",
]

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10")

# Where Debian's `dataset-fashion-mnist` package installs the four gzipped IDX files. A module attribute (read at
# call time, not bound as a default argument) so tests can point it elsewhere with monkeypatch.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

ENV_VAR = "METAOPT_DATA"
DEFAULT_ROOT = Path("~/.cache/metaopt")
SPLITS: tuple[str, ...] = ("train", "val", "test")

_IDX_BASENAMES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_LEGACY_FILES: tuple[str, ...] = ("training.pt", "test.pt")
_CIFAR10_FILES: tuple[str, ...] = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)


@dataclass(frozen=True)
class _Spec:
    title: str
    num_classes: int
    input_shape: tuple[int, int, int]


_SPECS: dict[str, _Spec] = {
    "fashion-mnist": _Spec("Fashion-MNIST", 10, (1, 28, 28)),
    "mnist": _Spec("MNIST", 10, (1, 28, 28)),
    "cifar10": _Spec("CIFAR-10", 10, (3, 32, 32)),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were not found. The message names the dataset, every place searched and how to get it.

    ``name`` is the dataset name and ``searched`` the directories looked in (also available as attributes).
    """

    def __init__(self, message: str, *, name: str = "", searched: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.name = name
        self.searched = tuple(searched)


class DatasetFormatError(ValueError):
    """A dataset file exists but is not what it should be (truncated, wrong magic, wrong shape); names the file."""


# --------------------------------------------------------------------------------------------------------------
# Locating datasets


def _check_name(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return _SPECS[name]


def _resolve_root_with_source(data_root: str | os.PathLike[str] | None) -> tuple[Path, str]:
    if data_root is not None:
        return Path(data_root).expanduser().absolute(), "the data_root argument"
    env = os.environ.get(ENV_VAR)
    if env:  # an empty $METAOPT_DATA counts as unset rather than meaning the current directory
        return Path(env).expanduser().absolute(), f"${ENV_VAR}"
    return DEFAULT_ROOT.expanduser().absolute(), f"the default {DEFAULT_ROOT} (set ${ENV_VAR} or pass data_root)"


def resolve_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """The one data root used for lookups and downloads, as an absolute path.

    Order: the ``data_root`` argument, then ``$METAOPT_DATA`` (if set and non-empty), then ``~/.cache/metaopt``.
    The first that is given wins; later ones are not consulted even if the dataset is missing there.
    """
    return _resolve_root_with_source(data_root)[0]


def _idx_file(directory: Path, basename: str) -> Path | None:
    """``basename`` in ``directory``, uncompressed preferred (faster to read), else ``basename.gz``."""
    for candidate in (directory / basename, directory / f"{basename}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(directory: Path, files: Sequence[str], *, gz_ok: bool = False) -> list[str]:
    """The names among ``files`` absent from ``directory`` (an IDX basename may also be present as ``.gz``)."""
    if gz_ok:
        return [f"{f}[.gz]" for f in files if _idx_file(directory, f) is None]
    return [f for f in files if not (directory / f).is_file()]


def _candidates(name: str, root: Path) -> list[Path]:
    """Directories that may hold ``name``'s files, in the order they are tried."""
    if name == "fashion-mnist":
        # torchvision's FashionMNIST layout first, so a user's own copy (or download=True) beats the system one.
        return [root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]
    if name == "mnist":
        # torchvision's MNIST reads the legacy processed/*.pt files in preference to raw/ when both exist.
        return [root / "MNIST" / "processed", root / "MNIST" / "raw"]
    return [root / "cifar-10-batches-py"]


def _missing_in(name: str, directory: Path) -> list[str]:
    if name == "fashion-mnist":
        return _missing(directory, _IDX_BASENAMES, gz_ok=True)
    if name == "mnist":
        # torchvision's MNIST(download=False) reads only uncompressed raw files.
        files = _MNIST_LEGACY_FILES if directory.name == "processed" else _IDX_BASENAMES
        return _missing(directory, files)
    return _missing(directory, _CIFAR10_FILES)


def find_dataset(name: str, data_root: str | os.PathLike[str] | None = None) -> Path | None:
    """The directory whose files :func:`load_dataset` will read for ``name``, or ``None`` if there is none.

    Looks under :func:`resolve_root` in torchvision's layout (``<root>/FashionMNIST/raw/``, ``<root>/MNIST/raw/``,
    ``<root>/cifar-10-batches-py/``); Fashion-MNIST is also found in :data:`DEBIAN_FASHION_MNIST`. A directory
    counts only when all of the dataset's files are in it. Only existence is checked here; contents are checked
    when loaded.
    """
    _check_name(name)
    root = resolve_root(data_root)
    for directory in _candidates(name, root):
        if directory.is_dir() and not _missing_in(name, directory):
            return directory
    return None


def _not_found(name: str, data_root: str | os.PathLike[str] | None, extra: str = "") -> DatasetNotFoundError:
    spec = _SPECS[name]
    root, source = _resolve_root_with_source(data_root)
    searched = _candidates(name, root)
    lines = [f"{spec.title} ({name!r}) not found. Data root {root} comes from {source}. Looked in:"]
    for directory in searched:
        if not directory.is_dir():
            reason = "no such directory"
        else:
            reason = "missing " + ", ".join(_missing_in(name, directory))
        lines.append(f"  - {directory}: {reason}")
    if name == "fashion-mnist":
        how = (
            f"To get it: `sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; installs into "
            f"{DEBIAN_FASHION_MNIST}/), or put the four IDX files ({', '.join(f + '.gz' for f in _IDX_BASENAMES)}; "
            f"gzipped or not) in {root / 'FashionMNIST' / 'raw'}/ (<root>/FashionMNIST/raw/ for whichever root "
            f"you use: data_root, $METAOPT_DATA or ~/.cache/metaopt), or load with download=True where there is "
            f"a network."
        )
    elif name == "mnist":
        how = (
            f"To get it: load with download=True where there is a network (torchvision downloads into "
            f"{root / 'MNIST' / 'raw'}/), or place torchvision's uncompressed IDX files "
            f"({', '.join(_IDX_BASENAMES)}) there."
        )
    else:
        how = (
            f"To get it: load with download=True where there is a network (torchvision downloads and extracts "
            f"cifar-10-python.tar.gz into {root}/), or extract that archive there yourself so that "
            f"{root / 'cifar-10-batches-py'}/ holds {', '.join(_CIFAR10_FILES)}."
        )
    lines.append(how)
    if extra:
        lines.append(extra)
    return DatasetNotFoundError("\n".join(lines), name=name, searched=searched)


# --------------------------------------------------------------------------------------------------------------
# Reading files


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read one IDX file (LeCun's MNIST format; ``.gz`` or not) of unsigned bytes into a uint8 tensor.

    Strict: the magic number must say uint8 (type 0x08) with 1 to 3 dimensions, and the payload must be exactly
    ``prod(dims)`` bytes. Anything else, including a truncated or corrupt gzip stream, raises
    :class:`DatasetFormatError` naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DatasetFormatError(f"{path}: not a valid gzip file ({e})") from e
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 3:
        raise DatasetFormatError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x000008NN, uint8 with NN in 1..3 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DatasetFormatError(f"{path}: {kind}: {len(raw)} bytes, expected {expected} for dims {dims}")
    # bytearray: torch.frombuffer wants a writable buffer; the tensor shares its memory, so no further copy.
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header, count=expected - header).view(dims)


class _Raw(NamedTuple):
    """A dataset's official splits on the CPU: x uint8 (N, C, H, W), y int64 (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def _read_fashion_mnist(directory: Path) -> _Raw:
    tensors = []
    for basename in _IDX_BASENAMES:
        path = _idx_file(directory, basename)
        if path is None:  # removed between find_dataset and here
            raise DatasetFormatError(f"{directory / basename}[.gz]: no such file")
        tensors.append((path, read_idx(path)))
    out = []
    for (images_path, images), (labels_path, labels) in (tensors[0:2], tensors[2:4]):
        if images.dim() != 3 or images.shape[1:] != (28, 28):
            raise DatasetFormatError(f"{images_path}: images of shape {tuple(images.shape)}, expected (N, 28, 28)")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DatasetFormatError(
                f"{labels_path}: labels of shape {tuple(labels.shape)}, expected ({images.shape[0]},) "
                f"to match {images_path.name}"
            )
        out += [images.unsqueeze(1), labels.long()]
    return _Raw(*out)


def _read_torchvision(name: str, root: Path) -> _Raw:
    # torchvision is imported here, not at module level, so `--check` and Fashion-MNIST never pay for it.
    from torchvision import datasets as tv

    splits = []
    for train in (True, False):
        if name == "mnist":
            mnist = tv.MNIST(str(root), train=train, download=False)
            x, y = mnist.data.unsqueeze(1), mnist.targets
        else:
            cifar = tv.CIFAR10(str(root), train=train, download=False)
            # torchvision holds CIFAR as NHWC numpy; the tensors here are NCHW.
            x = torch.from_numpy(cifar.data).permute(0, 3, 1, 2).contiguous()
            y = torch.tensor(cifar.targets)
        splits += [x.to(torch.uint8), y.long()]
    return _Raw(*splits)


def _download(name: str, root: Path) -> None:
    """Have torchvision download ``name`` into ``root`` in its own layout (a no-op for files already there)."""
    from torchvision import datasets as tv

    # Constructing the train split downloads every file of the dataset (train and test alike); the parsed copy is
    # dropped and the files are read again the ordinary way, so downloaded and pre-placed data take one path.
    loader = {"fashion-mnist": tv.FashionMNIST, "mnist": tv.MNIST, "cifar10": tv.CIFAR10}[name]
    loader(str(root), train=True, download=True)


def _validate_raw(name: str, directory: Path, raw: _Raw) -> None:
    spec = _SPECS[name]
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if tuple(x.shape[1:]) != spec.input_shape or y.shape != (x.shape[0],):
            raise DatasetFormatError(
                f"{directory}: {split} split has images {tuple(x.shape)} and labels {tuple(y.shape)}, "
                f"expected (N, {', '.join(map(str, spec.input_shape))}) and (N,)"
            )
        if x.shape[0] == 0:
            raise DatasetFormatError(f"{directory}: {split} split is empty")
        if int(y.min()) < 0 or int(y.max()) >= spec.num_classes:
            raise DatasetFormatError(
                f"{directory}: {split} labels span [{int(y.min())}, {int(y.max())}], expected [0, {spec.num_classes})"
            )


# --------------------------------------------------------------------------------------------------------------
# Holding datasets


@dataclass(frozen=True, eq=False)
class Split:
    """One split of an image dataset: ``x`` uint8 (N, C, H, W) and ``y`` int64 (N,) on the same device."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"Split.x must be a uint8 (N, C, H, W) tensor, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"Split.y must be an int64 ({self.x.shape[0]},) tensor, got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if self.x.device != self.y.device:
            raise ValueError(f"Split.x is on {self.x.device} but Split.y on {self.y.device}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: str | torch.device) -> Split:
        """This split with both tensors on ``device``."""
        return Split(self.x.to(device), self.y.to(device))


def _batch_shape(batch_size: int | Sequence[int]) -> tuple[int, ...]:
    shape = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
    if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"batch_size must be a positive int or a non-empty tuple of them, got {batch_size!r}")
    return shape


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A whole image-classification dataset held as tensors on one device.

    ``train`` and ``test`` are the official splits, except that ``val`` (a fixed random subset of the official
    train split) has been removed from ``train``. Images are stored as uint8 and returned as float32 in [0, 1]
    (``x / 255``; no mean/std normalisation, which is left to the model). The tensors may be shared with the
    in-process cache of :func:`load_dataset`: treat them as read-only.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    train: Split
    val: Split
    test: Split

    def __post_init__(self) -> None:
        for split in SPLITS:
            x = self.split(split).x
            if tuple(x.shape[1:]) != self.input_shape:
                raise ValueError(f"{split} images have shape {tuple(x.shape[1:])}, expected {self.input_shape}")

    @property
    def device(self) -> torch.device:
        """The device every split is on."""
        return self.train.x.device

    def split(self, split: str) -> Split:
        """The split called ``split``: one of ``"train"``, ``"val"``, ``"test"``."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, split)

    def batch(
        self, split: str, batch_size: int | tuple[int, ...], generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """A batch sampled uniformly with replacement from ``split``.

        Indices are ``torch.randint(N, shape, generator=generator, device=generator.device)`` with ``shape =
        (batch_size,)`` for an int or ``batch_size`` itself for a tuple, then moved to the data's device; the same
        generator state always gives the same batch. Returns ``x`` float32 in [0, 1] of shape ``(*shape, C, H, W)``
        and ``y`` int64 of shape ``shape``. A tuple such as ``(K, B)`` gives K batches of B at once (for vmapped
        meta-training).
        """
        data = self.split(split)
        shape = _batch_shape(batch_size)
        if len(data) == 0:
            raise ValueError(f"Cannot sample from the empty {split!r} split of {self.name} (val_size=0?)")
        index = torch.randint(len(data), shape, generator=generator, device=generator.device).to(self.device)
        return data.x[index].to(torch.float32).div_(255), data.y[index]

    def full(self, split: str) -> tuple[Tensor, Tensor]:
        """The whole of ``split``: ``x`` float32 in [0, 1] (N, C, H, W) and ``y`` int64 (N,)."""
        data = self.split(split)
        return data.x.to(torch.float32).div_(255), data.y

    def to(self, device: str | torch.device) -> ImageDataset:
        """This dataset with every split on ``device`` (``self`` if already there)."""
        if torch.device(device) == self.device:
            return self
        return ImageDataset(
            name=self.name,
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            train=self.train.to(device),
            val=self.val.to(device),
            test=self.test.to(device),
        )


# Two in-process caches: the files' contents on the CPU, keyed by (name, directory), so a new device, val_size or
# val_seed never re-reads the disk; and finished datasets, keyed by (name, directory, device, val_size, val_seed),
# so building many tasks on the same data shares one copy.
_RAW_CACHE: dict[tuple[str, Path], _Raw] = {}
_DATASET_CACHE: dict[tuple[str, Path, str, int, int], ImageDataset] = {}


def clear_cache() -> None:
    """Forget every dataset :func:`load_dataset` has cached in this process."""
    _RAW_CACHE.clear()
    _DATASET_CACHE.clear()


def _canonical_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one cache entry
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_dataset(
    name: str,
    data_root: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    val_size: int = 5000,
    val_seed: int = 0,
    download: bool = False,
) -> ImageDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) onto ``device``.

    Files are looked for as in :func:`find_dataset`. If they are missing and ``download`` is true, torchvision
    downloads them into :func:`resolve_root` (for Fashion-MNIST into ``<root>/FashionMNIST/raw/``); otherwise,
    or if the download fails, :class:`DatasetNotFoundError` is raised. Malformed files raise
    :class:`DatasetFormatError`.

    The validation split is ``val_size`` examples of the official train split chosen by
    ``torch.randperm(N, generator=torch.Generator().manual_seed(val_seed))`` and removed from train; both keep
    the files' order. ``val_size`` must lie in ``[0, N)``. Results are cached in-process.
    """
    spec = _check_name(name)
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise ValueError(f"Invalid val_size: {val_size!r} (must be an int in [0, number of training examples))")
    device = _canonical_device(device)

    directory = find_dataset(name, data_root)
    if directory is None and download:
        try:
            _download(name, resolve_root(data_root))
        except (RuntimeError, OSError) as e:  # torchvision's failed download (URLError is an OSError)
            raise _not_found(name, data_root, f"download=True failed: {e}") from e
        directory = find_dataset(name, data_root)
    if directory is None:
        raise _not_found(name, data_root)
    directory = directory.resolve()

    key = (name, directory, str(device), val_size, val_seed)
    if key in _DATASET_CACHE:
        return _DATASET_CACHE[key]

    raw = _RAW_CACHE.get((name, directory))
    if raw is None:
        if name == "fashion-mnist":
            raw = _read_fashion_mnist(directory)
        else:
            # directory is <root>/MNIST/{raw,processed} or <root>/cifar-10-batches-py; torchvision wants <root>.
            tv_root = directory.parent.parent if name == "mnist" else directory.parent
            try:
                raw = _read_torchvision(name, tv_root)
            except (RuntimeError, ValueError, TypeError, AssertionError, EOFError, pickle.UnpicklingError) as e:
                # torchvision's loaders report corrupt files (failed md5, bad header) without naming the file.
                raise DatasetFormatError(f"{directory}: torchvision could not read {spec.title}: {e!r}") from e
        _validate_raw(name, directory, raw)
        _RAW_CACHE[(name, directory)] = raw

    n_train = raw.train_x.shape[0]
    if val_size >= n_train:
        raise ValueError(f"Invalid val_size: {val_size} (must be in [0, {n_train}) for {name})")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(val_seed))
    # Sorting keeps each split in file order, so a split is defined by (val_size, val_seed) as a set.
    val_index = perm[:val_size].sort().values
    train_index = perm[val_size:].sort().values
    dataset = ImageDataset(
        name=name,
        num_classes=spec.num_classes,
        input_shape=spec.input_shape,
        train=Split(raw.train_x[train_index], raw.train_y[train_index]).to(device),
        val=Split(raw.train_x[val_index], raw.train_y[val_index]).to(device),
        test=Split(raw.test_x, raw.test_y).to(device),
    )
    _DATASET_CACHE[key] = dataset
    return dataset


# --------------------------------------------------------------------------------------------------------------
# Generated data


class SineBatch(NamedTuple):
    """One batch of sine sequences with the parameters that generated it (all leading dims ``shape``)."""

    inputs: Tensor  # (*shape, length, 1): f(0), ..., f(length - 1) plus noise
    targets: Tensor  # (*shape, 1): f(length), noiseless
    amplitude: Tensor  # (*shape,): A
    frequency: Tensor  # (*shape,): w
    phase: Tensor  # (*shape,): phi


class SineSequences:
    """Noisy sine-sequence regression, HyperAdam (Wang et al., 2019) Sec. 5, after Lv, Jiang & Li (2017).

    Each sequence draws ``f(x) = A sin(w x + phi)`` with ``A ~ U(0, 10)``, ``w ~ U(0, pi/2)``,
    ``phi ~ U(0, 2 pi)``; the input is ``f(0), ..., f(length - 1)`` plus ``N(0, noise_std^2)`` noise and the
    target is the noiseless ``f(length)``. The paper writes the noise as N(0, 0.1); we read 0.1 as the standard
    deviation. Generated on demand: no files, no state besides the two settings.
    """

    def __init__(self, noise_std: float = 0.1, length: int = 10) -> None:
        if not noise_std >= 0:
            raise ValueError(f"Invalid noise_std: {noise_std} (must be >= 0)")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"Invalid length: {length!r} (must be an int >= 1)")
        self.noise_std = float(noise_std)
        self.length = length

    def sample(
        self,
        batch_size: int | tuple[int, ...],
        generator: torch.Generator,
        device: str | torch.device | None = None,
    ) -> SineBatch:
        """A batch of float32 sequences and their parameters; all randomness comes from ``generator``.

        Draw order (fixed, so a generator state fixes the batch): A, w, phi, then the noise, which is drawn
        even when ``noise_std == 0`` so the generator advances the same way for every ``noise_std``. The
        tensors are made on ``generator.device`` unless ``device`` is given.
        """
        shape = _batch_shape(batch_size)
        device = generator.device if device is None else torch.device(device)
        amplitude = 10.0 * torch.rand(shape, generator=generator, device=device)
        frequency = (math.pi / 2) * torch.rand(shape, generator=generator, device=device)
        phase = (2 * math.pi) * torch.rand(shape, generator=generator, device=device)
        noise = torch.randn((*shape, self.length), generator=generator, device=device)
        x = torch.arange(self.length + 1, dtype=torch.float32, device=device)
        f = amplitude[..., None] * torch.sin(frequency[..., None] * x + phase[..., None])  # (*shape, length + 1)
        inputs = (f[..., : self.length] + self.noise_std * noise).unsqueeze(-1)
        return SineBatch(inputs, f[..., self.length :], amplitude, frequency, phase)

    def batch(
        self,
        batch_size: int | tuple[int, ...],
        generator: torch.Generator,
        device: str | torch.device | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of shapes ``(*shape, length, 1)`` and ``(*shape, 1)``; see :meth:`sample`."""
        sample = self.sample(batch_size, generator, device)
        return sample.inputs, sample.targets


# --------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meta_tasks.datasets --check NAME [--data-root DIR]``: 0 if found (prints where), else 1."""
    parser = argparse.ArgumentParser(
        prog="python -m meta_tasks.datasets", description="Report where a dataset's files are found."
    )
    parser.add_argument(
        "--check",
        required=True,
        choices=DATASETS,
        metavar="NAME",
        help=f"dataset to look for, one of: {', '.join(DATASETS)} (checks the files exist; does not parse them)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help=f"data root to search (default: ${ENV_VAR}, else {DEFAULT_ROOT})",
    )
    args = parser.parse_args(argv)
    directory = find_dataset(args.check, args.data_root)
    if directory is None:
        print(_not_found(args.check, args.data_root), file=sys.stderr)
        return 1
    print(f"{args.check}: found in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
