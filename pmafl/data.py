"""Datasets and federated partitions.

Every dataset is split three ways, the same on every machine: a held-out `test` split (the
dataset's own test set; 20% of the data for digits), a `public` split carved from the training
data on which the teacher is pre-trained, and the `pool` that is partitioned among the clients with
a flwr-datasets partitioner. Images are kept as uint8 NCHW tensors and turned into float [0, 1]
only for the part a process works on.

`digits` (scikit-learn's 8x8 handwritten digits) ships with scikit-learn, so the default run needs
no network. Fashion-MNIST is read from its four original gzip IDX files: from `data-dir`, else from
Debian's `dataset-fashion-mnist` package, else from the cache folder. CIFAR-10/100 are read from
the python-pickle archives' on-disk format, with an unpickler that builds nothing but NumPy arrays
and plain containers; SVHN through torchvision. None downloads unless `download` is true, and
then only over https, each file checked against its pinned sha256 before it is used.

`max_pool` caps the client pool (a class-stratified subset, the same on every machine): the knob
that makes a federation on 60,000 images affordable on a CPU.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from pmafl.files import cache_root, write_atomic

DATASETS = ("digits", "cifar10", "cifar100", "fashion-mnist", "svhn")
# The public/pool split is fixed across runs: a cached teacher must never have seen client data,
# whatever seed the federation uses.
SPLIT_SEED = 2024
# (folder, archive URL, the archive's sha256, training files, test file, label key)
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7", ["train"],
                 "test", b"fine_labels"),
}


class DatasetError(FileNotFoundError):
    """A dataset file is missing, truncated or not in the format it claims."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | torch.Tensor) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index], self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(float images in [0, 1], labels)."""
        return self.images.float() / 255.0, self.labels


@dataclass(frozen=True)
class FederatedData:
    public: Split
    pool: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return self.test.images.shape[1]


def default_data_dir() -> Path:
    return cache_root() / "data"


def fetch(url: str, target: Path, sha256: str, digest_of: str = "file") -> None:
    """Fetch `url` into `target`, only over https (or from a local `file:` mirror), and only if
    its sha256 is `sha256`: of the file's bytes, or with `digest_of="gzip"` of its decompressed
    contents (the identity of data that mirrors recompress). A file that does not match is
    refused and never written to `target`."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("https", "file"):
        raise DatasetError(f"refusing to download {url}: only https (or a local file: mirror) is "
                           "allowed")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                landed = urllib.parse.urlparse(response.geturl()).scheme
                if landed != scheme:  # urllib follows redirects, from https to http too
                    raise DatasetError(f"refusing to download {url}: it redirects to "
                                       f"{response.geturl()}, not {scheme}")
                shutil.copyfileobj(response, tmp)
            tmp.close()
            found = _sha256(Path(tmp.name), digest_of)
            if found != sha256:
                what = "decompressed download" if digest_of == "gzip" else "download"
                raise DatasetError(f"{url}: sha256 {found} of the {what}, expected {sha256}; it is "
                                   "not the file pmafl knows, and was not kept")
            with open(tmp.name, "rb") as verified:
                write_atomic(target, lambda f: shutil.copyfileobj(verified, f))
        finally:
            Path(tmp.name).unlink(missing_ok=True)


def _sha256(path: Path, digest_of: str) -> str:
    digest = hashlib.sha256()
    try:
        with (gzip.open(path, "rb") if digest_of == "gzip" else path.open("rb")) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: not a readable gzip file ({e})") from e
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "", download: bool = False,
                 public_fraction: float = 0.3, max_pool: int = 0) -> FederatedData:
    """The dataset's public / pool / test splits (cached per process). `max_pool` > 0 keeps a
    class-stratified subset of that many pool images; the public split is carved first, so it does
    not depend on `max_pool`."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if name == "digits":
        train, test, num_classes = _digits()
    elif name in _CIFAR:
        train, test, num_classes = _cifar(name, root, download)
    elif name == "fashion-mnist":
        train, test, num_classes = _fashion_mnist(Path(data_dir).expanduser() if data_dir else None,
                                                  download)
    elif name == "svhn":
        train, test, num_classes = _svhn(root, download)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    public_idx, pool_idx = _stratified_split(train.labels.numpy(), public_fraction, SPLIT_SEED)
    public, pool = train.subset(public_idx), train.subset(pool_idx)
    if 0 < max_pool < len(pool):
        pool = pool.subset(np.sort(stratified_subset(pool.labels.numpy(), max_pool, SPLIT_SEED)))
    x, _ = public.tensors()
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return FederatedData(public, pool, test, num_classes, mean, std)


def evaluation_subset(test: Split, size: int) -> Split:
    """`size` images of the test split in its class proportions, the same on every machine (the
    whole split when `size` is 0 or not smaller)."""
    if not 0 < size < len(test):
        return test
    return test.subset(np.sort(stratified_subset(test.labels.numpy(), size, SPLIT_SEED)))


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices into `labels` (without replacement) with the classes in the proportions of
    `labels`, largest remainder first; deterministic for a seed."""
    counts = np.bincount(labels)
    want = np.minimum(apportion(size, counts.astype(np.float64)), counts)
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:want[c]]
                           for c in range(len(counts))])


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, rest) with `fraction` of every class in `first`."""
    rng = np.random.default_rng(seed)
    first = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        first.append(idx[: int(round(fraction * len(idx)))])
    first_idx = np.sort(np.concatenate(first))
    return first_idx, np.setdiff1d(np.arange(len(labels)), first_idx)


def _digits() -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images / 16.0 * 255.0).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    test_idx, train_idx = _stratified_split(labels, 0.2, SPLIT_SEED)
    full = Split(torch.from_numpy(images), torch.from_numpy(labels))
    return full.subset(train_idx), full.subset(test_idx), 10


class _ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays and plain containers, and refuses every other global: a data file
    can describe data, never run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only NumPy arrays may be unpickled")
        return super().find_class(module, name)


def load_arrays_pickle(path: Path) -> object:
    """A pickled data file (CIFAR's batches) through `_ArraysOnly`; a file that holds anything
    else, or is cut short, is refused with an error naming it."""
    try:
        with path.open("rb") as f:
            return _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path}: not a pickled batch of NumPy arrays ({e})") from e


def _cifar(name: str, root: Path, download_missing: bool) -> tuple[Split, Split, int]:
    folder, url, sha256, train_files, test_file, label_key = _CIFAR[name]
    base = root / folder
    if not base.is_dir() and download_missing:
        archive = root / url.rsplit("/", 1)[1]
        if not archive.is_file():
            fetch(url, archive, sha256)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")  # no links out, no absolute paths
    if not base.is_dir():
        raise DatasetError(f"dataset {name!r}: no folder {base}; put the python version of "
                                f"{name} there, or set download=true")

    def read(files: list[str]) -> Split:
        images, labels = [], []
        for file in files:
            path = base / file
            if not path.is_file():
                raise DatasetError(f"dataset {name!r}: missing file {path}")
            batch = load_arrays_pickle(path)
            try:
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[label_key], dtype=np.int64))
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{path}: not a {name} batch (its data or {label_key.decode()!r} "
                                   f"is missing or malformed: {e})") from e
        return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))

    return read(train_files), read([test_file]), 10 if name == "cifar10" else 100


def _torchvision_split(cls: type, root: Path, name: str, **kwargs) -> Split:
    try:
        ds = cls(str(root), download=False, **kwargs)
    except RuntimeError as e:
        raise DatasetError(f"dataset {name!r} not found under {root} ({e})") from e
    labels = getattr(ds, "targets", None)
    labels = ds.labels if labels is None else labels
    images = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8)
    if images.ndim == 3:
        images = images[:, None]
    return Split(images, torch.as_tensor(np.asarray(labels), dtype=torch.long))


FASHION_MNIST_FILES = {
    "train-images": "train-images-idx3-ubyte.gz", "train-labels": "train-labels-idx1-ubyte.gz",
    "test-images": "t10k-images-idx3-ubyte.gz", "test-labels": "t10k-labels-idx1-ubyte.gz"}
# Where Debian's package `dataset-fashion-mnist` installs the original files.
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
# sha256 of each file's decompressed contents: the same for the official archives (whose MD5s
# Zalando publishes) and for Debian's package, which recompresses them.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """One gzip-compressed IDX file (LeCun's MNIST format): magic 0x0000 TT DD (TT the element type,
    DD the number of dimensions), DD big-endian uint32 sizes, then the data. Refuses a file whose
    magic, dimensions or length do not match, naming it."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, cut short, or a corrupt stream
        raise DatasetError(f"{path}: not a readable gzip file ({e}); the file is truncated or "
                           "corrupt: fetch it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] != ndim:
        raise DatasetError(f"{path}: magic number {raw[:4].hex()} is not that of an IDX file of "
                           f"unsigned bytes with {ndim} dimensions (expected 000008{ndim:02x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: header cut short ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DatasetError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}; the "
                           "file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_folder(data_dir: Path | None, download_missing: bool) -> Path:
    """The folder holding the four Fashion-MNIST files: `data_dir` (or its `fashion-mnist`
    subfolder) when given, else Debian's package folder, else the cache folder."""
    if data_dir is not None:
        candidates = [data_dir, data_dir / "fashion-mnist"]
    else:
        candidates = [FASHION_MNIST_DEBIAN, default_data_dir() / "fashion-mnist"]
    for folder in candidates:
        if all((folder / file).is_file() for file in FASHION_MNIST_FILES.values()):
            return folder
    target = candidates[-1]
    if download_missing:
        for file in FASHION_MNIST_FILES.values():
            if not (target / file).is_file():
                fetch(FASHION_MNIST_URL + file, target / file, FASHION_MNIST_SHA256[file], "gzip")
        return target
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetError(
        f"dataset 'fashion-mnist': the four files {', '.join(FASHION_MNIST_FILES.values())} are not "
        f"all in any of {looked}. Install them with `apt-get install dataset-fashion-mnist` "
        f"(Debian/Ubuntu, as root: {FASHION_MNIST_DEBIAN}), put them in one of those folders, or "
        "set download=true")


def _fashion_mnist(data_dir: Path | None, download_missing: bool) -> tuple[Split, Split, int]:
    folder = fashion_mnist_folder(data_dir, download_missing)

    def read(part: str) -> Split:
        images_path = folder / FASHION_MNIST_FILES[f"{part}-images"]
        labels_path = folder / FASHION_MNIST_FILES[f"{part}-labels"]
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if images.shape[1:] != (28, 28):
            raise DatasetError(f"{images_path}: images of {images.shape[1:]} pixels, expected 28x28")
        if len(images) != len(labels):
            raise DatasetError(f"{labels_path}: {len(labels)} labels for {len(images)} images in "
                               f"{images_path.name}")
        if len(labels) and labels.max() > 9:
            raise DatasetError(f"{labels_path}: label {labels.max()} outside 0..9")
        return Split(torch.from_numpy(images.copy())[:, None],
                     torch.from_numpy(labels.astype(np.int64)))

    return read("train"), read("test"), 10


def _svhn(root: Path, download_missing: bool) -> tuple[Split, Split, int]:
    from torchvision.datasets import SVHN

    if download_missing:
        raise DatasetError(f"dataset 'svhn': its files are served over plain http with no published "
                           f"sha256, so pmafl does not download them; put train_32x32.mat and "
                           f"test_32x32.mat in {root / 'svhn'} and set download=false")
    train = _torchvision_split(SVHN, root / "svhn", "svhn", split="train")
    test = _torchvision_split(SVHN, root / "svhn", "svhn", split="test")
    return train, test, 10


def partition_indices(labels: np.ndarray, num_partitions: int, partition_id: int,
                      partitioner: str = "dirichlet", dirichlet_alpha: float = 0.5,
                      classes_per_partition: int = 2, seed: int = 0) -> np.ndarray:
    """Indices into `labels` of one client's partition, drawn by a flwr-datasets partitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    if partitioner == "iid":
        part = IidPartitioner(num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(num_partitions, "label", dirichlet_alpha,
                                    min_partition_size=min(10, len(labels) // num_partitions),
                                    seed=seed)
    elif partitioner == "pathological":
        # first-deterministic: every class is used whenever there are at least as many clients.
        part = PathologicalPartitioner(num_partitions, "label", classes_per_partition,
                                       class_assignment_mode="first-deterministic", seed=seed)
    else:
        raise ValueError(f"unknown partitioner {partitioner!r}")
    part.dataset = Dataset.from_dict({"label": labels.tolist(), "index": list(range(len(labels)))})
    return np.asarray(part.load_partition(partition_id)["index"], dtype=np.int64)


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """`total` split into integers proportional to `weights` (largest remainder)."""
    share = total * weights / weights.sum()
    counts = np.floor(share).astype(np.int64)
    for c in np.argsort(-(share - counts), kind="stable")[: total - counts.sum()]:
        counts[c] += 1
    return counts


def local_test_indices(test_labels: np.ndarray, train_labels: np.ndarray, num_classes: int,
                       size: int, seed: int) -> np.ndarray:
    """Indices into the test split of one client's local test split: `size` test images (without
    replacement) whose class proportions follow the client's training partition, so that each
    client is judged on the distribution it trained on. A class with too few test images is made
    up for by the client's other classes, in proportion. Clients may share test images."""
    counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    available = np.bincount(test_labels, minlength=num_classes)
    want = np.zeros(num_classes, dtype=np.int64)
    while True:
        room = available - want
        eligible = (counts > 0) & (room > 0)
        left = size - want.sum()
        if left <= 0 or not eligible.any():
            break
        want += np.minimum(apportion(left, counts * eligible), room)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(test_labels == c), want[c], replace=False)
              for c in range(num_classes) if want[c] > 0]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def make_loader(*tensors: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle,
                      generator=generator)
