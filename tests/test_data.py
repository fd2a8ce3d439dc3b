"""Splits, partitions, and the CIFAR-10 reader on a small fake dataset in the real on-disk format."""

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pmafl import data as data_module
from pmafl.data import (
    FASHION_MNIST_FILES,
    DatasetError,
    evaluation_subset,
    load_dataset,
    local_test_indices,
    partition_indices,
    read_idx,
)


def test_digits_splits_are_disjoint_and_cover_the_data():
    data = load_dataset("digits")
    assert len(data.public) + len(data.pool) + len(data.test) == 1797
    assert data.test.images.shape[1:] == (1, 8, 8) and data.test.images.dtype == torch.uint8
    assert data.num_classes == 10 and data.in_channels == 1
    x, _ = data.public.tensors()
    assert data.mean[0] == pytest.approx(x.mean().item(), rel=1e-5)
    # No image of the public split (teacher data) appears in the client pool.
    public = {bytes(img.numpy()) + bytes([int(y)]) for img, y in zip(data.public.images, data.public.labels)}
    pool = {bytes(img.numpy()) + bytes([int(y)]) for img, y in zip(data.pool.images, data.pool.labels)}
    assert len(public & pool) <= 5  # digits holds a few exact duplicate images


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover_the_pool(partitioner):
    labels = np.repeat(np.arange(10), 30)
    parts = [partition_indices(labels, 10, pid, partitioner, 0.5, 2, seed=1) for pid in range(10)]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(labels)
    if partitioner == "pathological":
        assert all(len(set(labels[p].tolist())) <= 2 for p in parts)


def test_dirichlet_partitions_are_non_iid_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    first = partition_indices(labels, 5, 0, "dirichlet", 0.1, seed=3)
    again = partition_indices(labels, 5, 0, "dirichlet", 0.1, seed=3)
    assert np.array_equal(first, again)
    counts = np.bincount(labels[first], minlength=10)
    assert counts.max() > 3 * max(counts.mean(), 1)  # skewed, not a uniform share


def test_partition_id_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="partition-id 5 is outside"):
        partition_indices(np.zeros(20, dtype=int), 5, 5)


def write_fake_cifar10(root, per_batch=8):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return written


def test_cifar10_reader_on_fake_files_in_the_real_format(tmp_path):
    written = write_fake_cifar10(tmp_path)
    data = load_dataset("cifar10", str(tmp_path), False, 0.25)
    assert len(data.test) == 8 and len(data.public) + len(data.pool) == 40
    assert data.test.images.shape == (8, 3, 32, 32)
    test_data, test_labels = written["test_batch"]
    # Row-major channel planes: the red plane comes first, as in the real archive.
    assert torch.equal(data.test.images[0, 0].flatten(), torch.from_numpy(test_data[0, :1024]))
    assert torch.equal(data.test.images[0, 2].flatten(), torch.from_numpy(test_data[0, 2048:]))
    assert data.test.labels.tolist() == test_labels
    assert data.in_channels == 3 and len(data.mean) == 3


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*download=true"):
        load_dataset("cifar10", str(tmp_path / "empty"), False, 0.3)


def test_local_test_split_follows_the_client_class_proportions():
    test_labels = np.repeat(np.arange(4), 25)  # 25 test images of each of 4 classes
    train_labels = np.array([0] * 6 + [1] * 3 + [3] * 1)  # p = 0.6, 0.3, 0, 0.1
    index = local_test_indices(test_labels, train_labels, 4, size=40, seed=1)
    assert len(np.unique(index)) == 40
    assert np.bincount(test_labels[index], minlength=4).tolist() == [24, 12, 0, 4]
    # 7 images: shares 4.2, 2.1, 0, 0.7 -> floors 4, 2, 0, 0 and the largest remainder (class 3) +1
    small = local_test_indices(test_labels, train_labels, 4, size=7, seed=1)
    assert np.bincount(test_labels[small], minlength=4).tolist() == [4, 2, 0, 1]
    # A class the test split runs out of is made up from the client's other classes.
    scarce = np.array([0] * 5 + [1] * 50 + [3] * 50)
    index = local_test_indices(scarce, train_labels, 4, size=40, seed=1)
    # 40 * (0.6, 0.3, 0.1) = 24, 12, 4 but class 0 has 5; the other 19 go 3:1 -> 14.25, 4.75 -> 14, 5
    assert np.bincount(scarce[index], minlength=4).tolist() == [5, 26, 0, 9]
    assert np.array_equal(index, local_test_indices(scarce, train_labels, 4, size=40, seed=1))


def write_idx(path, array):
    """An IDX file as LeCun's format defines it: 0x0000, type 0x08 (uint8), ndim, sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(folder, train=60, test=20):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images": rng.integers(0, 256, (train, 28, 28)), "train-labels": np.arange(train) % 10,
              "test-images": rng.integers(0, 256, (test, 28, 28)), "test-labels": np.arange(test) % 10}
    for key, array in arrays.items():
        write_idx(folder / FASHION_MNIST_FILES[key], array)
    return arrays


def test_fashion_mnist_reads_the_gzip_idx_files_from_data_dir(tmp_path):
    arrays = write_fake_fashion_mnist(tmp_path / "fm")
    data = load_dataset("fashion-mnist", str(tmp_path / "fm"), False, 0.5)
    assert data.test.images.shape == (20, 1, 28, 28) and data.num_classes == 10
    assert torch.equal(data.test.images[3, 0], torch.from_numpy(arrays["test-images"][3].astype(np.uint8)))
    assert data.test.labels.tolist() == arrays["test-labels"].tolist()  # the official test split
    assert len(data.public) == 30 and len(data.pool) == 30  # both carved from the training images
    # data-dir may also be the folder above a `fashion-mnist` folder.
    write_fake_fashion_mnist(tmp_path / "root" / "fashion-mnist")
    assert len(load_dataset("fashion-mnist", str(tmp_path / "root"), False, 0.5).test) == 20


def test_max_pool_keeps_a_stratified_subset_and_the_same_public_split(tmp_path):
    write_fake_fashion_mnist(tmp_path, train=200)
    full = load_dataset("fashion-mnist", str(tmp_path), False, 0.5)
    small = load_dataset("fashion-mnist", str(tmp_path), False, 0.5, 40)
    assert torch.equal(full.public.images, small.public.images)
    assert np.bincount(small.pool.labels.numpy()).tolist() == [4] * 10
    pool = {bytes(x.numpy()) for x in full.pool.images}
    assert all(bytes(x.numpy()) in pool for x in small.pool.images)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-7], "bytes, expected"),                      # truncated data
    (lambda raw: bytes([0, 0, 8, 1]) + raw[4:], "magic number 00000801"),  # wrong ndim
    (lambda raw: bytes([0, 0, 0x0D, 3]) + raw[4:], "magic number 00000d03"),  # float IDX
])
def test_a_corrupt_idx_file_is_refused_naming_it(tmp_path, damage, message):
    write_fake_fashion_mnist(tmp_path)
    path = tmp_path / FASHION_MNIST_FILES["train-images"]
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(damage(raw))
    with pytest.raises(DatasetError, match=f"{path.name}.*{message}"):
        load_dataset("fashion-mnist", str(tmp_path), False, 0.5)


def test_a_cut_gzip_stream_and_bad_labels_are_refused(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    path = tmp_path / FASHION_MNIST_FILES["test-images"]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz: not a readable gzip file"):
        read_idx(path, 3)
    write_idx(tmp_path / FASHION_MNIST_FILES["test-images"], np.zeros((20, 28, 28)))
    write_idx(tmp_path / FASHION_MNIST_FILES["test-labels"], np.full(20, 12))
    with pytest.raises(DatasetError, match="label 12 outside 0..9"):
        load_dataset("fashion-mnist", str(tmp_path), False, 0.5)
    write_idx(tmp_path / FASHION_MNIST_FILES["test-labels"], np.zeros(19))
    with pytest.raises(DatasetError, match="19 labels for 20 images"):
        load_dataset("fashion-mnist", str(tmp_path), False, 0.5)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FASHION_MNIST_DEBIAN", tmp_path / "not-installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "", False, 0.1)
    # Without data-dir the Debian package's folder is used.
    write_fake_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(data_module, "FASHION_MNIST_DEBIAN", tmp_path / "debian")
    assert len(load_dataset("fashion-mnist", "", False, 0.2).test) == 20


def _decompressed_sha256(folder):
    return {f: hashlib.sha256(gzip.open(folder / f).read()).hexdigest() for f in FASHION_MNIST_FILES.values()}


def test_download_fetches_the_four_files_into_the_cache_and_checks_them(tmp_path, monkeypatch):
    """The download path, against a local mirror (file:// URL) instead of the network."""
    write_fake_fashion_mnist(tmp_path / "mirror")
    monkeypatch.setattr(data_module, "FASHION_MNIST_URL", (tmp_path / "mirror").as_uri() + "/")
    monkeypatch.setattr(data_module, "FASHION_MNIST_DEBIAN", tmp_path / "not-installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "pmafl" / "data" / "fashion-mnist"
    # The pinned sha256 is the real Fashion-MNIST's: the fake files are refused, and not kept.
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: sha256 [0-9a-f]{64} of the "
                                           "decompressed download, expected c59f468a"):
        load_dataset("fashion-mnist", "", True, 0.3)
    assert not any(cache.glob("*")) if cache.exists() else True
    monkeypatch.setattr(data_module, "FASHION_MNIST_SHA256", _decompressed_sha256(tmp_path / "mirror"))
    data = load_dataset("fashion-mnist", "", True, 0.31)
    assert len(data.test) == 20
    assert all((cache / f).is_file() for f in FASHION_MNIST_FILES.values())


def test_downloads_go_over_https_only(tmp_path):
    with pytest.raises(DatasetError, match="refusing to download http://example.org/x.gz: only https"):
        data_module.fetch("http://example.org/x.gz", tmp_path / "x.gz", "0" * 64)
    assert data_module.FASHION_MNIST_URL.startswith("https://")
    assert all(url.startswith("https://") for _, url, *_ in data_module._CIFAR.values())
    with pytest.raises(DatasetError, match="no published sha256"):
        load_dataset("svhn", str(tmp_path), True, 0.3)


def test_a_download_redirected_to_http_is_refused(tmp_path, monkeypatch):
    import io
    import urllib.request

    class Redirected(io.BytesIO):
        def geturl(self):
            return "http://mirror.example.org/x.gz"

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Redirected(b"data"))
    with pytest.raises(DatasetError, match="redirects to http://mirror.example.org/x.gz, not https"):
        data_module.fetch("https://example.org/x.gz", tmp_path / "x.gz", "0" * 64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not data_module.FASHION_MNIST_DEBIAN.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_pinned_sha256_are_those_of_the_real_files():
    assert _decompressed_sha256(data_module.FASHION_MNIST_DEBIAN) == data_module.FASHION_MNIST_SHA256


def test_a_corrupt_gzip_stream_gets_the_error_that_names_the_file(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    path = tmp_path / FASHION_MNIST_FILES["train-labels"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 8] = b"\xff" * 8  # a valid header, a broken deflate stream
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz: not a readable gzip file"):
        read_idx(path, 1)


class _RunsCode:
    """A pickle that calls `Path.touch` on load: what a hostile data file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_cifar_batch_that_would_run_code_is_refused_naming_it(tmp_path):
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "code-ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((8, 3072), np.uint8), b"labels": _RunsCode(marker)}, f)
    with pytest.raises(DatasetError, match="data_batch_3: not a pickled batch of NumPy arrays "
                                           "\\(refusing pathlib.Path.touch"):
        load_dataset("cifar10", str(tmp_path), False, 0.25)
    assert not marker.exists()


def test_the_cifar_download_is_checked_before_it_is_unpacked(tmp_path, monkeypatch):
    import tarfile

    write_fake_cifar10(tmp_path / "src")
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    folder, _, _, *rest = data_module._CIFAR["cifar10"]
    monkeypatch.setitem(data_module._CIFAR, "cifar10", (folder, archive.as_uri(), "0" * 64, *rest))
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz: sha256 .* expected 0000"):
        load_dataset("cifar10", str(tmp_path / "data"), True, 0.25)
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data_module._CIFAR, "cifar10", (folder, archive.as_uri(), sha256, *rest))
    assert len(load_dataset("cifar10", str(tmp_path / "data"), True, 0.3).test) == 8


@pytest.mark.skipif(not data_module.FASHION_MNIST_DEBIAN.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_fashion_mnist_files():
    data = load_dataset("fashion-mnist", "", False, 0.1)
    assert len(data.test) == 10_000 and len(data.public) + len(data.pool) == 60_000
    assert np.bincount(data.test.labels.numpy()).tolist() == [1000] * 10
    assert len(data.public) == 6000 and data.test.images.shape[1:] == (1, 28, 28)
    subset = evaluation_subset(data.test, 1000)
    assert np.bincount(subset.labels.numpy()).tolist() == [100] * 10
