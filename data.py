"""Few-shot data sets of FREE and N-way K-shot task sampling (paper §4 and supplement; README, section Data).

Paper: Wei et al., "FREE: Faster and Better Data-Free Meta-Learning", CVPR 2024. The data only
ever reaches the method through the teacher zoo (zoo.py) and the meta-val / meta-test tasks.

Data sets: CIFAR-FS (Bertinetto et al. 2019, 64/16/20 CIFAR-100 classes), miniImageNet (Ravi &
Larochelle split, user-placed pickle caches), CUB-200-2011 (the authors' index split), the
multi-domain mix of those three at 84x84, Omniglot (split by alphabet), a procedurally generated
`synthetic` set for fast tests, and `folder`: the user's own images in DIR/{train,val,test}/<class>/
(ours, not in the paper; `read_image` also reads the images that adapt.py adapts to). Every split
holds its images once, as uint8 [N, C, H, W]; `sample_tasks` turns them into float tasks in [0, 1]
(models normalise their own inputs).

`mean` / `std` of a data set are per-channel statistics of its meta-train split (in [0, 1] units;
a folder set without train/ uses its meta-val split), computed in chunks; the teachers' input normalisation uses them.

Differences from the authors' code: no hard-coded paths; downloads are checked (size and MD5) and
written atomically; data set and split choices are named constants below.

Trust: the CIFAR-100 and miniImageNet files are Python pickles, which can run code when loaded.
CIFAR-100 is checked against its published MD5 first; miniImageNet caches are placed by the user.
"""
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DATASETS = ("cifarfs", "miniimagenet", "cub", "mix", "omniglot", "synthetic", "folder")
README_DATA = "see README, section Data"

# --- CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 from the CIFAR authors' site ----------------
CIFAR_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR_FILE = "cifar-100-python.tar.gz"
CIFAR_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # the archive's published MD5
CIFAR_MEMBERS = {"train": "cifar-100-python/train", "test": "cifar-100-python/test",
                 "meta": "cifar-100-python/meta"}
CIFAR_SIZE = 32
CIFARFS_TEST = ("baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck",
                "plain", "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone",
                "wardrobe", "whale", "woman", "worm")  # CIFAR-FS test (20), Bertinetto et al. 2019
CIFARFS_VAL = ("beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
               "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television",
               "tractor")  # CIFAR-FS val (16); train = the other 64

# --- miniImageNet (Ravi & Larochelle 2017 split): pickle caches placed by the user --------------
MINI_DIR = "miniimagenet"
MINI_FILES = {s: f"mini-imagenet-cache-{s}.pkl" for s in ("train", "val", "test")}

# --- CUB-200-2011 (Wah et al. 2011; split by class index as the authors' code) -------------------
CUB_BASE_URL = "https://data.caltech.edu/records/65de6-vp158/files/"
CUB_FILE = "CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"  # the archive's published MD5
CUB_IMAGE_DIR = "CUB_200_2011/images/"

IMAGE_SIZE_84 = 84  # miniImageNet / CUB / multi-domain size (paper §4)
MIX_DOMAINS = ("cifarfs", "miniimagenet", "cub")  # multi-domain scenario (paper §4)

# --- Omniglot (Lake et al. 2015): split by alphabet ---------------------------------------------
OMNIGLOT_SIZE = 28
OMNIGLOT_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"  # the Omniglot repository (MIT)
OMNIGLOT_FILES = {"images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",  # published MD5s, the ones
                  "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811"}  # common loaders check
OMNIGLOT_DIR = "omniglot"  # <data-root>/omniglot/: downloads and the decoded cache
# meta-val: whole background alphabets held out (ours: 5 of 30 when an evaluation set is present, 158 characters)
OMNIGLOT_VAL_ALPHABETS = ("Latin", "Greek", "Korean", "Bengali", "Hebrew")
OMNIGLOT_VAL_ALPHABET = "Latin"  # meta-val alphabet with a background set alone (ours)
OMNIGLOT_TEST_ALPHABET = "Korean"  # meta-test alphabet with a background set alone (ours)

# --- synthetic: procedurally generated classes (no files), for tests and quick runs ------------
SYNTHETIC_CLASSES = {"train": 40, "val": 10, "test": 10}
SYNTHETIC_PER_CLASS = 60
SYNTHETIC_SIZE = 32
SYNTHETIC_CHANNELS = 3
SYNTHETIC_SHAPES = 3  # shapes per class pattern
SYNTHETIC_DISTRACTORS = 2  # shapes per image at random places, colours (not class evidence)
SYNTHETIC_SHIFT = 0.1  # max random shift per image, fraction of the image side
SYNTHETIC_NOISE = 0.2  # std of per-pixel Gaussian noise
SYNTHETIC_COLOUR_JITTER = 0.2  # std of per-image shape colour jitter
SYNTHETIC_STRIPE_FREQ = 40.0  # stripes: sin(40 x) > 0, a period of ~1/6 of the image side

# --- folder: the user's own images, DIR/{train,val,test}/<class>/*.png|jpg (ours, not in the paper) ----------
FOLDER_SPLITS = ("train", "val", "test")
SIZE_MULTIPLE = 4  # a run's image side is a multiple of 4: the meta-generator starts at s/4 (supplement Table 1)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # PNG or JPEG, in any letter case
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # Pillow modes of grey images
CHANNEL_MODES = {1: "L", 3: "RGB"}  # channels -> the Pillow mode images are converted to
FOLDER_CACHE = ".free_cache_{size}_{channels}.npz"  # in DIR: the decoded images and the layout's digest
FOLDER_NAME_DIGITS = 10  # hex digits of the layout digest in a folder set's name ("folder-1a2b3c4d5e")
FOLDER_LAYOUT = "expected DIR/train/, DIR/val/ and DIR/test/, each holding <class>/ folders of PNG or JPEG images"

DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_CHUNK = 1 << 20
STATS_CHUNK = 4096  # images per chunk when computing mean/std or resizing


@dataclass
class Split:
    """One of meta-train / meta-val / meta-test."""
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N], global class ids
    classes: list  # sorted global class ids present in this split
    _by_class: dict = field(default=None, init=False, repr=False, compare=False)

    def indices_of(self, c):
        """Indices (int64 tensor) of the images of global class `c`."""
        if self._by_class is None:
            order = torch.argsort(self.labels, stable=True)
            counts = torch.bincount(self.labels[order]).tolist()
            self._by_class = dict(zip(range(len(counts)), torch.split(order, counts)))
        if c not in self._by_class or len(self._by_class[c]) == 0:
            raise ValueError(f"class {c} is not in this split; expected one of "
                             f"{self.classes[:10]}...; pass classes of this split")
        return self._by_class[c]


@dataclass
class FewShotDataset:
    name: str
    image_size: int
    channels: int
    mean: list  # per channel, [0, 1] units, of the meta-train split
    std: list
    class_names: list  # indexed by global class id
    domain_of_class: list  # domain name per global class id
    splits: dict  # {"train": Split, "val": Split, "test": Split}, disjoint classes


class UserError(Exception):
    """An error the user causes and can fix (missing or bad data, impossible settings, a foreign run):
    free.py, cka.py and bench.py print it as one `error: ...` line and exit non-zero; library code
    raises it, the entry points translate it. Programming errors keep their traceback."""


class DataError(UserError):
    """A data file is missing, corrupt, truncated, has the wrong checksum or the wrong layout."""


# ----------------------------------------------------------------------------------------------
# Downloads
# ----------------------------------------------------------------------------------------------
def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(DOWNLOAD_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(what, folder, write=True):
    """The one check of a folder the project writes to (free.py's --out, --cache, --export-zoo, cka.py's, bench.py's
    and the data root): `folder`, or its nearest existing ancestor, is a folder of no kernel file system and, if
    `write`, a file can be made in it (a probe file is made and removed at once; `folder` itself is not created).
    Raises UserError naming the flag (`what`), what was found and what to do."""
    if not folder:
        raise UserError(f"{what}: expected a folder, found an empty string; pass a folder name")
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if os.path.realpath(path).startswith(("/proc", "/sys")):
        raise UserError(f"{what} {folder}: {path} is a kernel file system, not a folder that can be written; "
                        f"pick another {what}")
    if not os.path.isdir(path):
        raise UserError(f"{what} {folder}: expected a folder, found a file at {path}; pick another {what}")
    if write:
        try:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        except OSError as e:
            raise UserError(f"{what} {folder}: expected a folder that can be written; no file can be made in {path} "
                            f"({e.strerror}); pick another {what} or fix its permissions") from None
        os.close(fd)
        os.unlink(probe)


def ensure_writable(data_root):
    """Create `data_root` if needed, once check_writable found that downloads and caches can be written there."""
    try:
        check_writable("--data-root", data_root)
    except UserError as e:
        raise DataError(f"cannot write to the data root: {e}") from None
    root = Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    return root


def stream_to(response, out, url):
    """Copy an HTTP response body into the open file `out`; return the number of bytes."""
    n = 0
    while True:
        try:
            chunk = response.read(DOWNLOAD_CHUNK)
        except (http.client.IncompleteRead, OSError) as e:  # connection dropped or timed out
            raise DataError(f"download of {url} broke off after {n} bytes ({e!r}); run again "
                            f"to retry, or pass a mirror") from e
        if not chunk:
            return n
        out.write(chunk)
        n += len(chunk)


def download(url, dest, md5):
    """Download `url` to `dest` through a temp file in the same folder; check the size against
    Content-Length and the MD5; rename atomically. On any failure the partial file is removed
    and an existing `dest` is left untouched."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)
            except OSError as e:
                raise DataError(f"could not download {url}: {e!r}; check the address, or place "
                                f"{dest.name} (MD5 {md5}) in {dest.parent} by hand") from e
            with response:
                expected = response.headers.get("Content-Length")
                n = stream_to(response, out, url)
        if expected is not None and n < int(expected):
            raise DataError(f"download of {url} truncated: expected {expected} bytes, got {n}; "
                            f"run again to retry, or pass a mirror")
        got = md5_of(tmp)
        if got != md5:
            raise DataError(f"{dest.name} from {url} has MD5 {got}, expected {md5}; the file is "
                            f"corrupt or not the right one: retry, or pass another mirror")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(data_root, file_name, base_url, md5, mirror=None):
    """Path to `file_name` in `data_root` with the right MD5, downloading it if needed."""
    dest = Path(data_root) / file_name
    if dest.is_file() and md5_of(dest) == md5:
        return dest
    ensure_writable(data_root)
    base = mirror if mirror is not None else base_url
    download(base.rstrip("/") + "/" + file_name, dest, md5)
    return dest


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def resize_images(images, size):
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size], bilinear, in chunks."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], STATS_CHUNK):
        x = images[i:i + STATS_CHUNK].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < images.shape[-1])
        out[i:i + STATS_CHUNK] = y.round().clamp(0, 255).to(torch.uint8)
    return out


def channel_stats(images):
    """Per-channel mean and std in [0, 1] units of uint8 [N, C, H, W], in chunks (float64)."""
    c = images.shape[1]
    s, s2, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for i in range(0, images.shape[0], STATS_CHUNK):
        x = images[i:i + STATS_CHUNK].to(torch.float64) / 255.0
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def make_split(images, labels):
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return Split(images, labels, sorted(set(labels.tolist())))


def assemble(name, splits, class_names, domain_of_class=None, stats_split="train"):
    """Build a FewShotDataset; mean/std come from the meta-train split (or `stats_split`: a folder set
    without train/ takes them from val)."""
    train = splits["train"]
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        overlap = set(splits[a].classes) & set(splits[b].classes)
        if overlap:
            raise DataError(f"{name}: classes {sorted(overlap)[:5]} are in both {a} and {b}; "
                            f"expected disjoint splits")
    mean, std = channel_stats(splits[stats_split].images)
    return FewShotDataset(name=name, image_size=train.images.shape[-1],
                          channels=train.images.shape[1], mean=mean, std=std,
                          class_names=list(class_names),
                          domain_of_class=domain_of_class or [name] * len(class_names),
                          splits=splits)


def split_by_class(images, labels, split_of_class):
    """Group images into splits by `split_of_class[label]` ("train" / "val" / "test")."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    which = np.array([split_of_class[c] for c in labels.tolist()])
    splits = {}
    for s in ("train", "val", "test"):
        idx = torch.from_numpy(np.flatnonzero(which == s))
        splits[s] = make_split(images[idx], labels[idx])
    return splits


# ----------------------------------------------------------------------------------------------
# CIFAR-FS
# ----------------------------------------------------------------------------------------------
def unpickle(f, where):
    try:
        d = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{where} is not a readable pickle ({e!r}); delete it and run again") from e
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def read_cifar100(path):
    """{'train', 'test', 'meta'} dicts read straight from the tar.gz (no extraction)."""
    parts = {}
    wanted = {v: k for k, v in CIFAR_MEMBERS.items()}
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                if member.name in wanted:
                    parts[wanted[member.name]] = unpickle(tar.extractfile(member),
                                                          f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path} is not a readable tar.gz ({e!r}); delete it and run again") from e
    missing = set(CIFAR_MEMBERS) - set(parts)
    if missing:
        raise DataError(f"{path} lacks {[CIFAR_MEMBERS[m] for m in sorted(missing)]}; expected "
                        f"the CIFAR-100 python archive; delete it and run again")
    return parts


def cifarfs_split_of(names):
    """Split of each CIFAR-100 fine class (CIFAR-FS, Bertinetto et al. 2019)."""
    unknown = (set(CIFARFS_TEST) | set(CIFARFS_VAL)) - set(names)
    if len(names) != 100 or unknown:
        raise DataError(f"CIFAR-100 meta lists {len(names)} fine classes and lacks "
                        f"{sorted(unknown)}; expected the 100 CIFAR-100 names; check the archive")
    return ["test" if n in CIFARFS_TEST else "val" if n in CIFARFS_VAL else "train" for n in names]


def load_cifarfs(data_root, mirror, image_size):
    path = fetch(data_root, CIFAR_FILE, CIFAR_BASE_URL, CIFAR_MD5, mirror)
    parts = read_cifar100(path)
    names = list(parts["meta"]["fine_label_names"])
    data = np.concatenate([parts["train"]["data"], parts["test"]["data"]])
    labels = parts["train"]["fine_labels"] + parts["test"]["fine_labels"]
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).view(
        -1, 3, CIFAR_SIZE, CIFAR_SIZE)  # rows are 1024 R, 1024 G, 1024 B
    images = resize_images(images, image_size or CIFAR_SIZE)
    return assemble("cifarfs", split_by_class(images, labels, cifarfs_split_of(names)), names)


# ----------------------------------------------------------------------------------------------
# miniImageNet
# ----------------------------------------------------------------------------------------------
def load_miniimagenet(data_root, image_size):
    folder = Path(data_root) / MINI_DIR
    missing = [f for f in MINI_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise DataError(f"miniImageNet: expected {', '.join(MINI_FILES.values())} in "
                                f"{folder}; missing {', '.join(missing)}. There is no official "
                                f"download: place the pickle caches there ({README_DATA})")
    splits, names = {}, []
    for s, f in MINI_FILES.items():
        with open(folder / f, "rb") as fh:
            d = unpickle(fh, folder / f)
        if "image_data" not in d or "class_dict" not in d:
            raise DataError(f"{folder / f} has keys {sorted(d)}; expected image_data and "
                            f"class_dict ({README_DATA})")
        data, labels = d["image_data"], np.full(len(d["image_data"]), -1, dtype=np.int64)
        for name in sorted(d["class_dict"]):
            labels[np.asarray(d["class_dict"][name], dtype=np.int64)] = len(names)
            names.append(name)
        if (labels < 0).any():
            raise DataError(f"{folder / f}: {(labels < 0).sum()} of {len(labels)} images are in "
                            f"no class of class_dict; expected every image in one class; "
                            f"replace the file ({README_DATA})")
        images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).permute(0, 3, 1, 2)
        splits[s] = make_split(resize_images(images.contiguous(), image_size or IMAGE_SIZE_84),
                               labels)
    return assemble("miniimagenet", splits, names)


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------
def cub_split_of(i):
    """The authors' split of sorted class folder i: i%2==0 train, i%4==1 val, i%4==3 test."""
    return "train" if i % 2 == 0 else "val" if i % 4 == 1 else "test"


def decode_jpeg(data, size):
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))  # let the JPEG decoder downscale first (much faster)
    img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_cub(path, size):
    """Decode every CUB_200_2011/images/<class>/*.jpg of the .tgz at `path`:
    -> (uint8 [N, size, size, 3], int64 [N] class index, sorted class folder names)."""
    found = {}
    try:
        with tarfile.open(path, "r|gz") as tar:
            for m in tar:
                parts = m.name.split("/")[2:]  # CUB_200_2011/images/<class>/<file>
                if m.isfile() and m.name.startswith(CUB_IMAGE_DIR) and len(parts) == 2 \
                        and parts[1].lower().endswith(".jpg"):
                    found[(parts[0], parts[1])] = decode_jpeg(tar.extractfile(m).read(), size)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path} is not a readable tar.gz ({e!r}); delete it and run again") from e
    if not found:
        raise DataError(f"{path} holds no {CUB_IMAGE_DIR}<class>/*.jpg; expected the "
                        f"CUB_200_2011.tgz archive; delete it and run again")
    classes = sorted({c for c, _ in found})
    keys = sorted(found)
    labels = np.array([classes.index(c) for c, _ in keys], dtype=np.int64)
    return np.stack([found[k] for k in keys]), labels, classes


def atomic_write(dest, write):
    """Call write(file object) on a temp file beside `dest` (a Path), then rename it to `dest`: a reader, or a
    run killed halfway, never sees half a file (the caches, checkpoints and results that later runs read back)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npz_atomic(dest, **arrays):
    atomic_write(dest, lambda f: np.savez(f, **arrays))


def load_cub(data_root, mirror, image_size):
    size = image_size or IMAGE_SIZE_84
    cache = Path(data_root) / f"cub_{size}.npz"
    if not cache.is_file():
        path = fetch(data_root, CUB_FILE, CUB_BASE_URL, CUB_MD5, mirror)
        images, labels, classes = decode_cub(path, size)
        save_npz_atomic(cache, images=images, labels=labels, classes=np.array(classes))
    with np.load(cache) as z:
        images, labels, classes = z["images"], z["labels"], z["classes"].tolist()
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    split_of = [cub_split_of(i) for i in range(len(classes))]
    return assemble("cub", split_by_class(images, labels, split_of), classes)


# ----------------------------------------------------------------------------------------------
# Multi-domain mix
# ----------------------------------------------------------------------------------------------
def load_mix(data_root, mirror):
    """CIFAR-FS + miniImageNet + CUB, all at 84x84; global ids offset per domain; class names
    are prefixed with their domain ("cub:001.Black_footed_Albatross")."""
    parts = [load_cifarfs(data_root, mirror, IMAGE_SIZE_84), load_miniimagenet(data_root, None),
             load_cub(data_root, mirror, IMAGE_SIZE_84)]
    names, domains, offsets = [], [], []
    for d in parts:
        offsets.append(len(names))
        names += [f"{d.name}:{n}" for n in d.class_names]
        domains += [d.name] * len(d.class_names)
    splits = {}
    for s in ("train", "val", "test"):
        images = torch.cat([d.splits[s].images for d in parts])
        labels = torch.cat([d.splits[s].labels + off for d, off in zip(parts, offsets)])
        splits[s] = make_split(images, labels)
    return assemble("mix", splits, names, domains)


# ----------------------------------------------------------------------------------------------
# Omniglot
# ----------------------------------------------------------------------------------------------
def omniglot_sources(data_root, prefix):
    """The folder or .zip named `prefix`* in data_root (or data_root/omniglot); None if absent."""
    for root in (Path(data_root), Path(data_root) / "omniglot"):
        if not root.is_dir():
            continue
        found = {}
        for p in sorted(root.glob(prefix + "*")):
            key = p.stem if p.suffix == ".zip" else p.name
            if p.is_dir() or (p.suffix == ".zip" and key not in found):
                found[key] = p  # a folder wins over a zip of the same name
        if len(found) > 1:
            raise DataError(f"{root} holds several Omniglot sets {sorted(found)}; expected one "
                            f"{prefix}* (folder or .zip); move the others away")
        if found:
            return next(iter(found.values()))
    return None


def omniglot_files(source):
    """{(alphabet, character): [png bytes, ...]} from a folder or a zip (read in place)."""
    files = {}
    if source.is_dir():
        for p in sorted(source.rglob("*.png")):
            files.setdefault((p.parent.parent.name, p.parent.name), []).append(p.read_bytes())
        return files
    try:
        with zipfile.ZipFile(source) as z:
            for name in sorted(n for n in z.namelist() if n.lower().endswith(".png")):
                parts = name.split("/")
                if len(parts) >= 3:
                    files.setdefault((parts[-3], parts[-2]), []).append(z.read(name))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{source} is not a readable zip ({e!r}); expected a zip of "
                        f"<alphabet>/<character>/*.png; download it again") from e
    return files


def decode_omniglot(png, size):
    """1-bit PNG, black strokes on white -> uint8 [size, size], strokes bright (inverted)."""
    img = Image.open(io.BytesIO(png)).convert("L").resize((size, size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(img, dtype=np.uint8)


def omniglot_split_of(alphabet, evaluation_set, has_evaluation):
    """meta-train / val / test of one alphabet. With an evaluation set (the standard split): its
    alphabets are meta-test, OMNIGLOT_VAL_ALPHABETS of the background are meta-val, the rest
    meta-train. With a background set alone: Korean meta-test, Latin meta-val, the rest meta-train."""
    if evaluation_set:
        return "test"
    if has_evaluation:
        return "val" if alphabet in OMNIGLOT_VAL_ALPHABETS else "train"
    return {OMNIGLOT_VAL_ALPHABET: "val", OMNIGLOT_TEST_ALPHABET: "test"}.get(alphabet, "train")


def decode_omniglot_sets(background, evaluation, size):
    """Decode every PNG of the background (and evaluation) set -> (uint8 [N, size, size], labels,
    class names "alphabet/character", split of each class)."""
    sets = [(background, False)] + ([(evaluation, True)] if evaluation is not None else [])
    images, labels, names, split_of = [], [], [], []
    for source, is_evaluation in sets:
        files = omniglot_files(source)
        if not files:
            raise DataError(f"{source} holds no <alphabet>/<character>/*.png; expected the "
                            f"Omniglot layout ({README_DATA})")
        for (alphabet, character), pngs in sorted(files.items()):
            split_of.append(omniglot_split_of(alphabet, is_evaluation, evaluation is not None))
            images += [decode_omniglot(p, size) for p in pngs]
            labels += [len(names)] * len(pngs)
            names.append(f"{alphabet}/{character}")
    return np.stack(images), np.array(labels, dtype=np.int64), names, split_of


def load_omniglot(data_root, mirror, image_size):
    """Omniglot from images_background* (and images_evaluation*), folders or zips, in data_root or
    data_root/omniglot; with neither, the two official zips are downloaded (MD5-checked) into
    data_root/omniglot. The official pair is decoded once and cached beside it (npz)."""
    size = image_size or OMNIGLOT_SIZE
    background = omniglot_sources(data_root, "images_background")
    evaluation = omniglot_sources(data_root, "images_evaluation")
    if background is None:
        if evaluation is not None:
            raise DataError(f"Omniglot: found {evaluation} but no images_background (folder or .zip) "
                            f"beside it; add it, or remove both to download the official pair")
        root = Path(data_root) / OMNIGLOT_DIR
        background, evaluation = (fetch(root, name, OMNIGLOT_BASE_URL, md5, mirror)
                                  for name, md5 in OMNIGLOT_FILES.items())
    official = [background.name, evaluation and evaluation.name] == list(OMNIGLOT_FILES)
    # the official zips (32,460 PNGs) are decoded once; other sets (folders may change, small zips are quick) each time
    cache = background.parent / f"omniglot_{size}.npz" if official else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            images, labels, names, split_of = z["images"], z["labels"], z["names"].tolist(), z["split_of"].tolist()
    else:
        images, labels, names, split_of = decode_omniglot_sets(background, evaluation, size)
        if cache is not None:
            save_npz_atomic(cache, images=images, labels=labels, names=np.array(names), split_of=np.array(split_of))
    if not {"val", "test"} <= set(split_of):
        raise DataError(f"Omniglot in {data_root}: found no meta-val or meta-test alphabet; expected "
                        f"{OMNIGLOT_VAL_ALPHABET} and {OMNIGLOT_TEST_ALPHABET} in the background set, or an "
                        f"images_evaluation set ({README_DATA})")
    images = torch.from_numpy(images).unsqueeze(1)  # [N, 1, size, size]
    return assemble("omniglot", split_by_class(images, labels.tolist(), split_of), names)


# ----------------------------------------------------------------------------------------------
# Synthetic
# ----------------------------------------------------------------------------------------------
def class_pattern(g, n_shapes=SYNTHETIC_SHAPES):
    """A random class: n_shapes shapes, each (kind, centre (y, x), radius, colour)."""
    kinds = torch.randint(0, 3, (n_shapes,), generator=g).tolist()  # disk, square, stripes
    centres = 0.2 + 0.6 * torch.rand(n_shapes, 2, generator=g)
    radii = 0.08 + 0.1 * torch.rand(n_shapes, generator=g)
    colours = torch.rand(n_shapes, SYNTHETIC_CHANNELS, generator=g)
    return kinds, centres, radii, colours


def shape_mask(kind, dy, dx, r):
    """Boolean mask of a disk (0), square (1) or striped square (2) of radius r at offset dy, dx."""
    if kind == 0:
        return dy ** 2 + dx ** 2 < r ** 2
    square = (dy.abs() < r) & (dx.abs() < r)
    return square if kind == 1 else square & (torch.sin(dx * SYNTHETIC_STRIPE_FREQ) > 0)


def render_class(pattern, n, size, g):
    """n images of one class pattern, each shifted, with per-image colour jitter, distractor
    shapes at random places and pixel noise -> uint8 [n, C, size, size]."""
    kinds, centres, radii, colours = pattern
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = axis.view(1, -1, 1), axis.view(1, 1, -1)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * SYNTHETIC_SHIFT  # per image
    x = 0.1 * torch.rand(n, SYNTHETIC_CHANNELS, 1, 1, generator=g).expand(
        n, SYNTHETIC_CHANNELS, size, size).clone()  # random dark background
    d_kinds, _, d_radii, _ = class_pattern(g, SYNTHETIC_DISTRACTORS)
    for k, r in zip(d_kinds, d_radii):  # one kind and size for all n, place and colour per image
        cy, cx = torch.rand(2, n, 1, 1, generator=g)
        mask = shape_mask(k, yy - cy, xx - cx, r)
        c = torch.rand(n, SYNTHETIC_CHANNELS, generator=g)
        x = torch.where(mask.unsqueeze(1), c.view(n, -1, 1, 1), x)
    for k, (cy, cx), r, colour in zip(kinds, centres, radii, colours):
        mask = shape_mask(k, yy - (cy + shift[:, 0]).view(-1, 1, 1),
                          xx - (cx + shift[:, 1]).view(-1, 1, 1), r)  # [n, size, size]
        c = colour + SYNTHETIC_COLOUR_JITTER * torch.randn(n, SYNTHETIC_CHANNELS, generator=g)
        x = torch.where(mask.unsqueeze(1), c.view(n, -1, 1, 1), x)  # [n, C, size, size]
    x = x + SYNTHETIC_NOISE * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def load_synthetic(image_size, seed):
    size = image_size or SYNTHETIC_SIZE
    g = torch.Generator().manual_seed(seed)
    splits, names = {}, []
    for s, n_classes in SYNTHETIC_CLASSES.items():
        images, labels = [], []
        for _ in range(n_classes):
            images.append(render_class(class_pattern(g), SYNTHETIC_PER_CLASS, size, g))
            labels += [len(names)] * SYNTHETIC_PER_CLASS
            names.append(f"synthetic_{len(names):03d}")
        splits[s] = make_split(torch.cat(images), labels)
    return assemble("synthetic", splits, names)


# ----------------------------------------------------------------------------------------------
# folder: the user's own images in class folders (not in the paper)
# ----------------------------------------------------------------------------------------------
def is_hidden(path):
    return path.name.startswith(".")


def image_files(folder):
    """The PNG / JPEG files directly in `folder` (not hidden), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not is_hidden(p) and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(folder, what):
    """[(class name, [image paths])] of `folder`/<class>/*.png|jpg, sorted by class name (the folder name).
    `what` names the folder in errors ("the train split", "--support"). Raises DataError for a folder with
    no class folders, images beside the class folders, or a class folder with no images."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p))
    loose = image_files(folder)
    if not classes:
        found = f"; found {len(loose)} images directly in it: move each into its class folder" if loose else ""
        raise DataError(f"{what} {folder} holds no class folders; expected {folder}/<class>/ folders of "
                        f"PNG or JPEG images{found}")
    if loose:
        raise DataError(f"{what} {folder} holds {len(loose)} images beside its class folders (e.g. "
                        f"{loose[0].name}); expected every image inside a class folder: move them into one")
    out = []
    for c in classes:
        files = image_files(c)
        if not files:
            raise DataError(f"class folder {c} of {what} holds no images; expected PNG or JPEG files "
                            f"({', '.join(IMAGE_SUFFIXES)}) in it; add some or remove the folder")
        out.append((c.name, files))
    return out


def unreadable(path, e):
    """The DataError of an image file Pillow cannot read (its reason, without repeating the path)."""
    reason = type(e).__name__ if str(path) in str(e) else f"{type(e).__name__}: {e}"
    return DataError(f"cannot read image {path} ({reason}); expected a PNG or JPEG file; replace or remove it")


def read_image(path, size, channels):
    """One image file -> uint8 [channels, size, size]: decoded by Pillow, converted to grey ("L") or
    colour ("RGB"), resized to a square with bilinear filtering as CUB's images are (decode_jpeg: JPEG
    draft scaling, then Pillow's bilinear resize; the aspect ratio is not kept). 16-bit grey images
    keep their top 8 bits. An unreadable file raises DataError naming it."""
    mode = CHANNEL_MODES[channels]
    try:
        with Image.open(path) as img:
            img.draft(mode, (size, size))  # a JPEG decoder downscales first (no-op for PNG)
            if img.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert("L") would clip at 255
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise unreadable(path, e) from e
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # [size, size] or [size, size, 3]
    return x.view(size, size, channels).permute(2, 0, 1).contiguous()  # [channels, size, size]


def image_header(path):
    """(width, height, Pillow mode) of an image file, read from its header (no decode)."""
    try:
        with Image.open(path) as img:
            return img.size[0], img.size[1], img.mode
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise unreadable(path, e) from e


def median_side(sizes):
    """The folder set's image size when none is given: the median over images of the mean side, rounded half up
    to a multiple of SIZE_MULTIPLE (the meta-generator's output side, supplement Table 1),

        s = SIZE_MULTIPLE * round( median_i( (w_i + h_i) / 2 ) / SIZE_MULTIPLE ),

    so a set of mostly 84x84 images with a few odd ones stays 84, and a 60x100 image counts as 80."""
    return SIZE_MULTIPLE * int(np.floor(np.median([(w + h) / 2 for w, h in sizes]) / SIZE_MULTIPLE + 0.5))


def channels_of(modes):
    """1 when every image is grey (Pillow modes GREY_MODES), else 3: one colour image makes the set colour.
    Palette images ("P") count as colour."""
    return 1 if all(m in GREY_MODES for m in modes) else 3


def folder_layout(root, need_train):
    """{split: [(class name, [image paths])]} of DIR/{train,val,test}/<class>/*; train may be absent
    (then []) when not `need_train`. A class name in two splits is a DataError naming both."""
    layout, split_of_name = {}, {}
    for s in FOLDER_SPLITS:
        folder = root / s
        if not folder.is_dir():
            if s == "train" and not need_train:
                layout[s] = []
                continue
            raise DataError(f"folder data set {root}: no {s}/ folder; {FOLDER_LAYOUT}")
        layout[s] = class_folders(folder, f"the {s} split")
        for name, _ in layout[s]:
            if name in split_of_name:
                raise DataError(f"folder data set {root}: class {name!r} is in both {split_of_name[name]}/ and "
                                f"{s}/; expected each class in one split (meta-train, meta-val and meta-test "
                                f"classes are disjoint); rename or remove one")
            split_of_name[name] = s
    return layout


def layout_entries(root, files):
    """(relative path, byte size, modification time in ns) of each file, sorted: the layout's fingerprint."""
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def digest(rows):
    """SHA-256 (hex) over `rows`, one tab-separated line each."""
    h = hashlib.sha256()
    for row in rows:
        h.update(("\t".join(map(str, row)) + "\n").encode())
    return h.hexdigest()


def decode_folder(layout, size, channels):
    """Decode every image of the layout -> (uint8 [N, channels, size, size], int64 [N] global class ids,
    class names, split of each class). Global ids: train classes sorted, then val's, then test's."""
    images, labels, names, split_of = [], [], [], []
    for s in FOLDER_SPLITS:
        for name, files in layout[s]:
            images += [read_image(p, size, channels).numpy() for p in files]
            labels += [len(names)] * len(files)
            names.append(name)
            split_of.append(s)
    return np.stack(images), np.array(labels, dtype=np.int64), names, split_of


def load_folder(root, image_size, need_train=True):
    """The user's own few-shot set: DIR/train/<class>/*, DIR/val/<class>/*, DIR/test/<class>/* (PNG or JPEG,
    any size, grey or colour); the class folders' names are the class names, each split's classes its own.

    Size: `image_size`, else median_side over the images' headers. Channels: channels_of their modes.
    mean/std come from the train split as for every data set; without train/ (need_train=False, its split
    then empty) from the val split. The decoded images are cached in DIR/FOLDER_CACHE, keyed by a digest of
    the layout (relative paths, byte sizes, modification times): adding, removing or changing an image
    rebuilds it; a folder that is not writable is decoded on every load. The data set's name is
    "folder-" + a digest of the paths, byte sizes, size and channels, so that the teacher zoo cache
    (zoo.zoo_dir, keyed by the name) never mixes two folder sets."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder data set {root}: no such folder; {FOLDER_LAYOUT}; pass that folder DIR itself "
                        f"as --data-root")
    layout = folder_layout(root, need_train)
    files = [p for s in FOLDER_SPLITS for _, fs in layout[s] for p in fs]
    headers = [image_header(p) for p in files]
    size = image_size or median_side([(w, h) for w, h, _ in headers])
    channels = channels_of([m for _, _, m in headers])
    entries = layout_entries(root, files)
    fingerprint = digest(entries)
    cache = root / FOLDER_CACHE.format(size=size, channels=channels)
    arrays = None
    if cache.is_file():
        try:
            with np.load(cache) as z:
                if str(z["fingerprint"]) == fingerprint:
                    arrays = z["images"], z["labels"], z["names"].tolist(), z["split_of"].tolist()
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"the image cache {cache} is unreadable ({type(e).__name__}); delete it and run "
                            f"again") from e
    if arrays is None:
        arrays = decode_folder(layout, size, channels)
        if os.access(root, os.W_OK):
            images, labels, names, split_of = arrays
            save_npz_atomic(cache, images=images, labels=labels, names=np.array(names),
                            split_of=np.array(split_of), fingerprint=np.array(fingerprint))
    images, labels, names, split_of = arrays
    splits = split_by_class(torch.from_numpy(images), labels, split_of)  # no train/: train holds [0, C, s, s]
    name = "folder-" + digest([e[:2] for e in entries] + [(size, channels)])[:FOLDER_NAME_DIGITS]
    return assemble(name, splits, names, stats_split="train" if layout["train"] else "val")


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def load_dataset(name, data_root, mirror=None, image_size=None, seed=0, need_train=True):
    """Load data set `name` (one of DATASETS) from `data_root`, downloading CIFAR-100 / CUB /
    Omniglot if needed (from `mirror` instead of the official base address when given). `image_size`
    overrides the native size; `seed` only matters for `synthetic`. For `folder`, `data_root` is the
    folder DIR itself (load_folder), and `need_train=False` accepts a DIR without train/."""
    if name == "cifarfs":
        return load_cifarfs(data_root, mirror, image_size)
    if name == "miniimagenet":
        return load_miniimagenet(data_root, image_size)
    if name == "cub":
        return load_cub(data_root, mirror, image_size)
    if name == "mix":
        if image_size not in (None, IMAGE_SIZE_84):
            raise UserError(f"mix is 84x84 (paper §4, multi-domain setting); got image_size={image_size}; "
                             f"leave it unset")
        return load_mix(data_root, mirror)
    if name == "omniglot":
        return load_omniglot(data_root, mirror, image_size)
    if name == "synthetic":
        return load_synthetic(image_size, seed)
    if name == "folder":
        return load_folder(data_root, image_size, need_train)
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")


def sample_tasks(split, n_tasks, way, shot, query, generator, classes=None):
    """Sample `n_tasks` N-way K-shot tasks from `split` (classes from `classes` if given).

    Returns x_s float [T, way*shot, C, H, W] in [0, 1], y_s int64 [T, way*shot] with relative
    labels 0..way-1 (class-major order), and x_q, y_q likewise with `query` images per class.
    All randomness comes from `generator` (a CPU torch.Generator)."""
    pool = list(split.classes if classes is None else classes)
    if len(pool) < way:
        raise UserError(f"a {way}-way task needs {way} classes; the pool has {len(pool)}; lower --way")
    need = shot + query
    s_idx, q_idx = [], []
    for _ in range(n_tasks):
        chosen = torch.randperm(len(pool), generator=generator)[:way].tolist()
        for j in chosen:
            idx = split.indices_of(pool[j])
            if len(idx) < need:
                raise UserError(f"class {pool[j]} has {len(idx)} images; a task with {shot} "
                                f"shot + {query} query needs {need}; lower --shots or --query")
            pick = idx[torch.randperm(len(idx), generator=generator)[:need]]
            s_idx.append(pick[:shot])
            q_idx.append(pick[shot:])
    shape = split.images.shape[1:]
    x_s = split.images[torch.cat(s_idx)].float().div_(255).view(n_tasks, way * shot, *shape)
    x_q = split.images[torch.cat(q_idx)].float().div_(255).view(n_tasks, way * query, *shape)
    y_s = torch.arange(way).repeat_interleave(shot).expand(n_tasks, -1).contiguous()
    y_q = torch.arange(way).repeat_interleave(query).expand(n_tasks, -1).contiguous()
    return x_s, y_s, x_q, y_q
