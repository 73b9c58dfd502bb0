"""Tests for meta_tasks.datasets: real Fashion-MNIST when installed, torchvision's MNIST and CIFAR-10 formats on tiny
files written here, root resolution, error messages and the generated sine sequences. No network is used."""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from meta_tasks import datasets as ds
from meta_tasks.datasets import (
    DATASETS,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    SineSequences,
    find_dataset,
    load_dataset,
    read_idx,
    resolve_root,
)

IDX_NAMES = ds._IDX_BASENAMES  # train images, train labels, test images, test labels


# --------------------------------------------------------------------------------------------------------------
# Helpers writing datasets in their on-disk formats


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write a uint8 array as an IDX file (magic 0x000008<ndim>, big-endian int32 dims, then the bytes)."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def tiny_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_mnist_like(
    directory: Path,
    *,
    n_train: int = 12,
    n_test: int = 5,
    label: int | None = None,
    gz: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Four 28x28 IDX files in ``directory``; every label is ``label`` if given (to tell copies apart)."""
    rng = np.random.default_rng(seed)

    def labels(n: int) -> np.ndarray:
        return rng.integers(0, 10, n, dtype=np.uint8) if label is None else np.full(n, label, np.uint8)

    arrays = {
        IDX_NAMES[0]: tiny_images(n_train, (28, 28), seed),
        IDX_NAMES[1]: labels(n_train),
        IDX_NAMES[2]: tiny_images(n_test, (28, 28), seed + 1),
        IDX_NAMES[3]: labels(n_test),
    }
    for basename, array in arrays.items():
        write_idx(directory / basename, array, gz=gz)
    return arrays


def row_hashes(x: torch.Tensor) -> list[bytes]:
    flat = x.reshape(x.shape[0], -1).cpu().numpy()
    return [hashlib.sha1(row.tobytes()).digest() for row in flat]


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $METAOPT_DATA, an empty HOME and an empty Debian directory, so only what a test writes is found."""
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", tmp_path / "debian" / "fashion-mnist")
    return tmp_path


# --------------------------------------------------------------------------------------------------------------
# Real Fashion-MNIST


@pytest.fixture(scope="module")
def fashion() -> ImageDataset:
    if find_dataset("fashion-mnist") is None:
        pytest.skip("real Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist, or see .ci/setup)")
    return load_dataset("fashion-mnist", val_size=5000, val_seed=0)


def test_real_fashion_mnist_shapes_and_values(fashion: ImageDataset) -> None:
    assert fashion.name == "fashion-mnist"
    assert fashion.num_classes == 10
    assert fashion.input_shape == (1, 28, 28)
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (55000, 5000, 10000)
    for split in ("train", "val", "test"):
        x, y = fashion.full(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28) and y.shape == (x.shape[0],)
        assert 0.0 <= x.min().item() and x.max().item() <= 1.0
        assert set(y.unique().tolist()) == set(range(10))
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    assert torch.bincount(fashion.test.y, minlength=10).tolist() == [1000] * 10
    train_val = torch.cat([fashion.train.y, fashion.val.y])
    assert torch.bincount(train_val, minlength=10).tolist() == [6000] * 10


def test_real_fashion_mnist_val_is_carved_from_train(fashion: ImageDataset) -> None:
    train, val = set(row_hashes(fashion.train.x)), set(row_hashes(fashion.val.x))
    assert not train & val
    # Together they are exactly the official training images (which hold no duplicate rows).
    directory = find_dataset("fashion-mnist")
    assert directory is not None
    official = read_idx(ds._idx_file(directory, IDX_NAMES[0]))
    assert train | val == set(row_hashes(official))
    # The split is fixed by val_seed: the same seed gives the same split (and the cached object), another differs.
    assert load_dataset("fashion-mnist", val_size=5000, val_seed=0) is fashion
    other = load_dataset("fashion-mnist", val_size=5000, val_seed=1)
    assert not torch.equal(other.val.x, fashion.val.x)
    assert torch.equal(other.test.x, fashion.test.x)


def test_real_fashion_mnist_batches(fashion: ImageDataset) -> None:
    x1, y1 = fashion.batch("train", 32, torch.Generator().manual_seed(1))
    x2, y2 = fashion.batch("train", 32, torch.Generator().manual_seed(1))
    x3, _ = fashion.batch("train", 32, torch.Generator().manual_seed(2))
    assert x1.shape == (32, 1, 28, 28) and y1.shape == (32,)
    assert x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)

    # A (K, B) batch is K batches at once, indexed exactly by randint(N, (K, B)) from the same generator state.
    xk, yk = fashion.batch("val", (3, 8), torch.Generator().manual_seed(5))
    assert xk.shape == (3, 8, 1, 28, 28) and yk.shape == (3, 8)
    index = torch.randint(len(fashion.val), (3, 8), generator=torch.Generator().manual_seed(5))
    full_x, full_y = fashion.full("val")
    torch.testing.assert_close(xk, full_x[index], rtol=0, atol=0)
    assert torch.equal(yk, full_y[index])
    assert torch.equal(full_x[index], fashion.val.x[index].float() / 255)


# --------------------------------------------------------------------------------------------------------------
# Where datasets are found


def test_resolution_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arg_root, env_root, home = isolated / "arg", isolated / "env", isolated / "home"
    debian = ds.DEBIAN_FASHION_MNIST
    # Each place holds a Fashion-MNIST whose labels are all one marker, so loading shows which was read.
    write_mnist_like(arg_root / "FashionMNIST" / "raw", label=1)
    write_mnist_like(env_root / "FashionMNIST" / "raw", label=2, gz=True)
    write_mnist_like(home / ".cache" / "metaopt" / "FashionMNIST" / "raw", label=3)
    write_mnist_like(debian, label=4, gz=True)
    monkeypatch.setenv(ds.ENV_VAR, str(env_root))

    def read_from(data_root: Path | None) -> int:
        return int(load_dataset("fashion-mnist", data_root, val_size=2).test.y[0])

    assert resolve_root(arg_root) == arg_root
    assert find_dataset("fashion-mnist", arg_root) == arg_root / "FashionMNIST" / "raw"
    assert read_from(arg_root) == 1
    assert resolve_root() == env_root
    assert find_dataset("fashion-mnist") == env_root / "FashionMNIST" / "raw"
    assert read_from(None) == 2
    monkeypatch.delenv(ds.ENV_VAR)
    assert resolve_root() == home / ".cache" / "metaopt"
    assert read_from(None) == 3
    # Only Fashion-MNIST falls back to the Debian package's directory, after the resolved root.
    monkeypatch.setenv(ds.ENV_VAR, str(isolated / "empty"))
    assert find_dataset("fashion-mnist") == debian
    assert read_from(None) == 4
    assert find_dataset("mnist") is None


def test_resolve_root_expands_user_and_ignores_empty_env(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ds.ENV_VAR, "")
    assert resolve_root() == isolated / "home" / ".cache" / "metaopt"
    assert resolve_root("~/data") == isolated / "home" / "data"


def test_incomplete_directory_is_not_found(isolated: Path) -> None:
    raw = isolated / "root" / "FashionMNIST" / "raw"
    write_mnist_like(raw)
    (raw / IDX_NAMES[3]).unlink()
    assert find_dataset("fashion-mnist", isolated / "root") is None
    with pytest.raises(DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("fashion-mnist", isolated / "root")


def test_cli_check(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = isolated / "root"
    assert ds.main(["--check", "fashion-mnist", "--data-root", str(root)]) == 1
    err = capsys.readouterr().err
    assert str(root / "FashionMNIST" / "raw") in err and "dataset-fashion-mnist" in err

    write_mnist_like(root / "FashionMNIST" / "raw", gz=True)
    assert ds.main(["--check", "fashion-mnist", "--data-root", str(root)]) == 0
    assert str(root / "FashionMNIST" / "raw") in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# MNIST and CIFAR-10 through torchvision's loaders


def test_mnist_torchvision_format(isolated: Path) -> None:
    root = isolated / "root"
    arrays = write_mnist_like(root / "MNIST" / "raw", n_train=12, n_test=5, seed=3)
    assert find_dataset("mnist", root) == root / "MNIST" / "raw"
    data = load_dataset("mnist", root, val_size=4, val_seed=7)
    assert (data.name, data.num_classes, data.input_shape) == ("mnist", 10, (1, 28, 28))
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 5)
    assert torch.equal(data.test.x, torch.from_numpy(arrays[IDX_NAMES[2]]).unsqueeze(1))
    assert torch.equal(data.test.y, torch.from_numpy(arrays[IDX_NAMES[3]]).long())
    # Validation: the val_size examples first in randperm(N) from a generator seeded with val_seed, in file order.
    val_index = torch.randperm(12, generator=torch.Generator().manual_seed(7))[:4].sort().values
    train_index = torch.tensor(sorted(set(range(12)) - set(val_index.tolist())))
    official_x = torch.from_numpy(arrays[IDX_NAMES[0]]).unsqueeze(1)
    official_y = torch.from_numpy(arrays[IDX_NAMES[1]]).long()
    assert torch.equal(data.val.x, official_x[val_index]) and torch.equal(data.val.y, official_y[val_index])
    assert torch.equal(data.train.x, official_x[train_index]) and torch.equal(data.train.y, official_y[train_index])


def write_cifar10(directory: Path, per_batch: int = 3, n_test: int = 4) -> dict[str, dict]:
    """A tiny cifar-10-batches-py: pickled dicts with "data" (N, 3072) uint8 rows (R, G, B planes) and "labels"."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        batches[name] = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "filenames": [f"{name}_{j}.png" for j in range(n)],
        }
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    for name, content in [*batches.items(), ("batches.meta", meta)]:
        (directory / name).write_bytes(pickle.dumps(content, protocol=2))
    return batches


def test_cifar10_torchvision_format(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    root = isolated / "root"
    batches = write_cifar10(root / "cifar-10-batches-py")

    # torchvision's CIFAR10 checks each file against the md5 of the real download; point its tables at the tiny
    # files' checksums so its own loader (not a re-implementation) reads them.
    def md5(name: str) -> str:
        return hashlib.md5((root / "cifar-10-batches-py" / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{k}", md5(f"data_batch_{k}")] for k in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})

    assert find_dataset("cifar10", root) == root / "cifar-10-batches-py"
    data = load_dataset("cifar10", root, val_size=5)
    assert (data.name, data.num_classes, data.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert (len(data.train), len(data.val), len(data.test)) == (10, 5, 4)
    # Rows are channel planes, so NCHW is a plain reshape of the pickled rows.
    test = batches["test_batch"]
    assert torch.equal(data.test.x, torch.from_numpy(test["data"]).reshape(-1, 3, 32, 32))
    assert data.test.y.tolist() == test["labels"]
    train_rows = np.concatenate([batches[f"data_batch_{k}"]["data"] for k in range(1, 6)])
    expected = set(row_hashes(torch.from_numpy(train_rows).reshape(-1, 3, 32, 32)))
    assert set(row_hashes(data.train.x)) | set(row_hashes(data.val.x)) == expected
    x, y = data.batch("train", (2, 3), torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 3, 32, 32) and y.shape == (2, 3)


def test_cifar10_wrong_checksum_is_a_format_error(isolated: Path) -> None:
    # Tiny files fail torchvision's md5 check against the real data: reported as a bad file, not a missing one.
    root = isolated / "root"
    write_cifar10(root / "cifar-10-batches-py")
    with pytest.raises(DatasetFormatError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root, val_size=5)


# --------------------------------------------------------------------------------------------------------------
# Errors and validation


@pytest.mark.parametrize("name", DATASETS)
def test_missing_dataset_names_places_searched(isolated: Path, name: str) -> None:
    root = isolated / "root"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.name == name and info.value.searched
    for place in info.value.searched:
        assert str(place) in message
    assert str(root) in message and "the data_root argument" in message
    if name == "fashion-mnist":
        assert str(ds.DEBIAN_FASHION_MNIST) in message
        assert "apt-get install -y dataset-fashion-mnist" in message
        assert "FashionMNIST/raw" in message
    else:
        assert "download=True" in message


def test_truncated_idx_names_the_file(isolated: Path) -> None:
    raw = isolated / "root" / "FashionMNIST" / "raw"
    write_mnist_like(raw)
    images = raw / IDX_NAMES[0]
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DatasetFormatError, match=rf"{images}: truncated"):
        load_dataset("fashion-mnist", isolated / "root", val_size=2)


def test_corrupt_gzip_names_the_file(isolated: Path) -> None:
    raw = isolated / "root" / "FashionMNIST" / "raw"
    write_mnist_like(raw, gz=True)
    labels = raw / f"{IDX_NAMES[3]}.gz"
    labels.write_bytes(labels.read_bytes()[:-10])
    with pytest.raises(DatasetFormatError, match=str(labels)):
        load_dataset("fashion-mnist", isolated / "root", val_size=2)


def test_idx_parser_is_strict(tmp_path: Path) -> None:
    array = tiny_images(3, (4, 5), seed=0)
    assert torch.equal(read_idx(write_idx(tmp_path / "ok", array)), torch.from_numpy(array))
    assert torch.equal(read_idx(write_idx(tmp_path / "ok", array, gz=True)), torch.from_numpy(array))
    good = (tmp_path / "ok").read_bytes()
    cases = {
        "magic": b"\x00\x00\x0d\x03" + good[4:],  # float32, not uint8
        "header": good[:10],
        "trailing": good + b"\x00",
        "short": b"\x00\x00",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DatasetFormatError, match=str(tmp_path / name)):
            read_idx(tmp_path / name)


def test_wrong_image_size_and_label_count(isolated: Path) -> None:
    raw = isolated / "root" / "FashionMNIST" / "raw"
    write_mnist_like(raw)
    write_idx(raw / IDX_NAMES[2], tiny_images(5, (32, 32), seed=0))
    with pytest.raises(DatasetFormatError, match=IDX_NAMES[2]):
        load_dataset("fashion-mnist", isolated / "root", val_size=2)
    write_idx(raw / IDX_NAMES[2], tiny_images(5, (28, 28), seed=0))
    write_idx(raw / IDX_NAMES[3], np.zeros(4, np.uint8))
    with pytest.raises(DatasetFormatError, match=IDX_NAMES[3]):
        load_dataset("fashion-mnist", isolated / "root", val_size=2, val_seed=1)


def test_unknown_name_lists_datasets(isolated: Path) -> None:
    for call in (lambda: load_dataset("imagenet"), lambda: find_dataset("imagenet")):
        with pytest.raises(ValueError, match="imagenet") as info:
            call()
        assert all(name in str(info.value) for name in DATASETS)


def test_argument_validation(isolated: Path) -> None:
    root = isolated / "root"
    write_mnist_like(root / "FashionMNIST" / "raw", n_train=12)
    for val_size in (-1, 12, 13, 2.5):
        with pytest.raises(ValueError, match="val_size"):
            load_dataset("fashion-mnist", root, val_size=val_size)  # type: ignore[arg-type]
    data = load_dataset("fashion-mnist", root, val_size=0)
    assert len(data.train) == 12 and len(data.val) == 0
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="empty"):
        data.batch("val", 4, generator)
    with pytest.raises(ValueError, match="split"):
        data.batch("validation", 4, generator)
    for batch_size in (0, (), (2, 0)):
        with pytest.raises(ValueError, match="batch_size"):
            data.batch("train", batch_size, generator)
    assert data.to("cpu") is data


# --------------------------------------------------------------------------------------------------------------
# Sine sequences (HyperAdam Sec. 5)


def test_sine_shapes_and_reproducibility() -> None:
    sine = SineSequences()
    x, y = sine.batch(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 10, 1) and y.shape == (16, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    xk, yk = SineSequences(length=7).batch((3, 4), torch.Generator().manual_seed(0))
    assert xk.shape == (3, 4, 7, 1) and yk.shape == (3, 4, 1)
    x2, y2 = sine.batch(16, torch.Generator().manual_seed(0))
    x3, _ = sine.batch(16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3)


def test_sine_noiseless_follows_the_sine() -> None:
    length = 10
    sample = SineSequences(noise_std=0.0, length=length).sample(4096, torch.Generator().manual_seed(0))
    a, w, phi = (t.double() for t in (sample.amplitude, sample.frequency, sample.phase))
    expected = a * torch.sin(w * length + phi)
    torch.testing.assert_close(sample.targets.double().squeeze(-1), expected, rtol=0, atol=1e-4)
    # f(x + 1) = 2 cos(w) f(x) - f(x - 1) along the inputs and into the target.
    f = torch.cat([sample.inputs.squeeze(-1), sample.targets], dim=-1).double()
    recurrence = 2 * torch.cos(w)[:, None] * f[:, 1:-1] - f[:, :-2]
    torch.testing.assert_close(f[:, 2:], recurrence, rtol=0, atol=1e-4)
    # batch() is the (inputs, targets) of sample() from the same generator state.
    x, y = SineSequences(noise_std=0.0, length=length).batch(4096, torch.Generator().manual_seed(0))
    assert torch.equal(x, sample.inputs) and torch.equal(y, sample.targets)


def test_sine_parameter_and_noise_distributions() -> None:
    n = 20000
    sample = SineSequences(noise_std=0.1).sample(n, torch.Generator().manual_seed(3))
    for values, high in ((sample.amplitude, 10.0), (sample.frequency, math.pi / 2), (sample.phase, 2 * math.pi)):
        assert 0 <= values.min().item() and values.max().item() < high
        # U(0, high): mean high/2 with standard error high / sqrt(12 n) < high / 490.
        assert abs(values.mean().item() - high / 2) < high / 100
    x = torch.arange(10, dtype=torch.float32)
    clean = sample.amplitude[:, None] * torch.sin(sample.frequency[:, None] * x + sample.phase[:, None])
    noise = sample.inputs.squeeze(-1) - clean
    assert abs(noise.mean().item()) < 0.002 and abs(noise.std().item() - 0.1) < 0.002
    # The parameters do not depend on noise_std: the same generator state draws the same sines.
    noiseless = SineSequences(noise_std=0.0).sample(n, torch.Generator().manual_seed(3))
    assert torch.equal(noiseless.amplitude, sample.amplitude) and torch.equal(noiseless.targets, sample.targets)


def test_sine_validation() -> None:
    with pytest.raises(ValueError, match="noise_std"):
        SineSequences(noise_std=-0.1)
    with pytest.raises(ValueError, match="length"):
        SineSequences(length=0)
