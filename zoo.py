"""The teacher zoo of FREE (paper §4 setup): pre-trained N-way classifiers, the only
thing data-free meta-learning gets to see.

Paper: Wei et al., "FREE: Faster and Better Data-Free Meta-Learning", CVPR 2024, §4 setup and
supplement. Teacher i gets `way` classes drawn at random (seeded by (seed, i)) from the meta-train
split; 80% of each class's images train it, 20% measure it. Conv4: Adam lr 0.01, batch 128;
ResNet-10/18: SGD lr 0.01, momentum 0.9, weight decay 5e-4. Multi-domain zoo: teacher i draws
its classes from one domain (round-robin); multi-architecture zoo ("mix"): conv4 / resnet10 /
resnet18 by i % 3.

Cache: <cache_root>/zoo/<dataset>-<arch>-n<n>-way<way>-seed<seed>-<preset>/teacher_XXX.pt plus
manifest.json; every write is atomic, so an interrupted build resumes from the teachers saved, and a
cached teacher file that cannot be read is trained again (it is a cache).

Teachers from elsewhere (zoo.json and a torch.export or TorchScript program per teacher): external.py.

Differences from the authors' code:
- we keep the weights of the best held-out epoch as a real copy; theirs saves the last epoch;
- the multi-architecture zoo builds one module object per teacher (theirs loads four into one).
"""
import copy
import json
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import DataError, UserError, atomic_write
from models import ARCHS, build_model
from recover import AUG_PAD, augment

ZOO_ARCHS = ARCHS + ("mix",)  # "mix": heterogeneous zoo, conv4/resnet10/resnet18 by i % 3
MIX_DOMAINS = ("cifarfs", "miniimagenet", "cub")  # multi-domain zoo: domain of teacher i is i % 3
FLIP_DATASETS = ("cifarfs", "miniimagenet", "cub", "mix")  # natural images: mirror-invariant, flipped too


def mirror_invariant(dataset):
    """Whether A(.) flips images of `dataset`: natural images yes, handwriting (Omniglot) and synthetic no."""
    return dataset.name in FLIP_DATASETS
EVAL_BATCH = 512  # held-out evaluation batch (memory only, no effect on results)
MANIFEST = "manifest.json"


@dataclass
class Teacher:
    model: torch.nn.Module  # in eval mode, on the requested device; takes the run's images in [0, 1]
    classes: list  # global class ids; index = the teacher's local label (its logit column)
    arch: str  # conv4 / resnet10 / resnet18; EXTERNAL_ARCH for a teacher of an external zoo
    acc: float  # held-out accuracy in [0, 1]; None for an external teacher (no held-out data)
    index: int
    class_names: list = None  # the names of `classes` (dataset.class_names, or an external zoo's names)
    file: str = None  # an external teacher's program file


@dataclass
class ZooSettings:
    """Teacher training settings (supplement, implementation details; authors' code)."""
    epochs: int = 60  # supplement: 60 (CIFAR-FS, miniImageNet), 100 (CUB)
    batch_size: int = 128  # authors' code
    conv4_lr: float = 0.01  # authors' code: Adam for Conv4 teachers
    resnet_lr: float = 0.01  # authors' code: SGD for ResNet-10/18 teachers
    momentum: float = 0.9  # authors' code: SGD momentum (ResNets)
    weight_decay: float = 5e-4  # authors' code: SGD weight decay (ResNets)
    train_fraction: float = 0.8  # ours: 80% of each class trains, 20% measures
    # ours: teachers train with the random crop that A(.) of Eq. (1) applies (the authors' train without), so
    # recovery does not ask for shifts a teacher never learned; + flips on natural images. 0 = no crop
    crop_pad: int = AUG_PAD


PAPER_EPOCHS = {"cub": 100}  # supplement: Conv4 teachers train 100 epochs on CUB, 60 elsewhere
# CPU quick preset (free.py's `quick`), tuned on Omniglot (build_zoo(load_dataset("omniglot", <folder of
# images_background_small1.zip>), "conv4", n=40, way=5, seed=0, ...) with
# torch.set_num_threads(1)): 98.0% mean held-out accuracy,
# ~1.0-1.3 s per teacher; the paper's 60 epochs x batch 128 give 97.0% in ~3.6 s (n=10)
QUICK_SETTINGS = ZooSettings(epochs=20, batch_size=32)


def paper_settings(dataset_name):
    """The paper's teacher settings for `dataset_name` (supplement)."""
    return ZooSettings(epochs=PAPER_EPOCHS.get(dataset_name, ZooSettings.epochs))


# ----------------------------------------------------------------------------------------------
# Task and data of one teacher
# ----------------------------------------------------------------------------------------------
def teacher_rng(seed, index):
    """Independent, reproducible random stream for teacher `index` of zoo `seed`."""
    return np.random.default_rng([seed, index])


def teacher_arch(arch, index):
    return ("conv4", "resnet10", "resnet18")[index % 3] if arch == "mix" else arch


def draw_classes(dataset, way, rng, index):
    """`way` global class ids from the meta-train split; one domain per teacher for "mix"."""
    pool = dataset.splits["train"].classes
    if dataset.name == "mix":
        domain = MIX_DOMAINS[index % len(MIX_DOMAINS)]
        pool = [c for c in pool if dataset.domain_of_class[c] == domain]
    if len(pool) < way:
        raise UserError(f"a {way}-way teacher needs {way} meta-train classes; found {len(pool)} "
                         f"in {dataset.name}; lower `way`")
    return sorted(int(c) for c in rng.choice(pool, size=way, replace=False))


def teacher_data(split, classes, train_fraction, rng):
    """Per class, `train_fraction` of the images train the teacher and the rest measure it.
    -> (x_train uint8, y_train local labels, x_held, y_held)."""
    tr, he = [], []
    for local, c in enumerate(classes):
        idx = split.indices_of(c).numpy()
        idx = idx[rng.permutation(len(idx))]
        k = int(round(train_fraction * len(idx)))
        tr.append((idx[:k], local))
        he.append((idx[k:], local))

    def gather(parts):
        idx = torch.from_numpy(np.concatenate([i for i, _ in parts]))
        y = torch.cat([torch.full((len(i),), local, dtype=torch.int64) for i, local in parts])
        return split.images[idx], y

    return (*gather(tr), *gather(he))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def make_optimizer(model, arch, settings):
    if arch == "conv4":
        return torch.optim.Adam(model.parameters(), lr=settings.conv4_lr)
    return torch.optim.SGD(model.parameters(), lr=settings.resnet_lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


@torch.no_grad()
def evaluate(model, x, y, device):
    """Accuracy of `model` on uint8 images x with labels y (eval mode)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), EVAL_BATCH):
        xb = x[i:i + EVAL_BATCH].to(device).float().div_(255)
        correct += (model(xb).argmax(1) == y[i:i + EVAL_BATCH].to(device)).sum().item()
    return correct / max(len(x), 1)


def snapshot(model):
    """A real copy of the weights (copy.deepcopy of the state_dict, not a view of live tensors)."""
    return copy.deepcopy(model.state_dict())


def train_teacher(model, arch, data, settings, flip, g, device):
    """Train `model` on data = (x_train, y_train, x_held, y_held); return the state dict of the
    best held-out epoch (a real copy), its held-out accuracy and the epoch (1-based)."""
    x_tr, y_tr, x_he, y_he = (t.to(device) for t in data)  # uint8 images: small, moved once
    opt = make_optimizer(model, arch, settings)
    best_state, best_acc, best_epoch = snapshot(model), -1.0, 0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(order), settings.batch_size):
            idx = order[i:i + settings.batch_size].to(device)
            if len(idx) < 2:
                continue  # BatchNorm cannot train on a batch of one
            xb = x_tr[idx].float().div_(255)  # [B, C, H, W] in [0, 1]
            if settings.crop_pad or flip:
                xb = augment(xb, settings.crop_pad, flip=flip, generator=g)  # the crop (and flip) of A(.)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = evaluate(model, x_he, y_he, device)
        if acc > best_acc:
            # the authors' code saves the last epoch by accident; we keep the best, copied
            best_state, best_acc, best_epoch = snapshot(model), acc, epoch
    return best_state, best_acc, best_epoch


def new_teacher_model(dataset, arch, way):
    return build_model(arch, num_classes=way, in_channels=dataset.channels,
                       image_size=dataset.image_size, mean=dataset.mean, std=dataset.std)


def fit_teacher(dataset, arch, way, seed, index, settings, device):
    """Draw teacher `index`'s classes, train it; return its checkpoint dict."""
    rng = teacher_rng(seed, index)
    arch_i = teacher_arch(arch, index)
    classes = draw_classes(dataset, way, rng, index)
    data = teacher_data(dataset.splits["train"], classes, settings.train_fraction, rng)
    torch_seed = int(rng.integers(2 ** 62))
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.default_generator.manual_seed(torch_seed)
        model = new_teacher_model(dataset, arch_i, way).to(device)
    g = torch.Generator().manual_seed(torch_seed + 1)
    flip = mirror_invariant(dataset)
    state, acc, epoch = train_teacher(model, arch_i, data, settings, flip, g, device)
    state = {k: v.cpu() for k, v in state.items()}
    return {"state_dict": state, "arch": arch_i, "arch_kwargs": model.arch, "classes": classes,
            "acc": acc, "best_epoch": epoch}


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------
def zoo_dir(cache_root, dataset_name, arch, n, way, seed, preset):
    return Path(cache_root) / "zoo" / f"{dataset_name}-{arch}-n{n}-way{way}-seed{seed}-{preset}"


def teacher_path(folder, index):
    return folder / f"teacher_{index:03d}.pt"


def load_checkpoint(path, error, what, advice):
    """A torch checkpoint, on the CPU (callers move it to their device); a damaged file raises `error`, naming
    `what` the file is and what to do (`advice`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise error(f"{what} {path} is unreadable ({type(e).__name__}); {advice}") from e


def check_manifest(folder, settings):
    """Refuse a cache built with other training settings under the same preset name."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    saved = json.loads(path.read_text()).get("settings")
    if saved is not None and saved != asdict(settings):
        raise UserError(f"zoo cache {folder} was built with settings {saved}, expected "
                         f"{asdict(settings)}; use another preset name or delete that folder")


def write_manifest(folder, settings, entries):
    body = {"settings": asdict(settings), "teachers": sorted(entries, key=lambda e: e["index"])}
    atomic_write(folder / MANIFEST, lambda f: f.write(json.dumps(body, indent=1).encode()))


def check_classes(ckpt, dataset, way, seed, index, path):
    """A cached teacher must hold the classes this zoo would draw for it."""
    expected = draw_classes(dataset, way, teacher_rng(seed, index), index)
    if list(ckpt["classes"]) != expected:
        raise UserError(f"cached teacher {path} has classes {list(ckpt['classes'])}, expected "
                         f"{expected} for this data set and seed; delete {path.parent} to rebuild")


def teacher_from_checkpoint(ckpt, index, device):
    model = build_model(ckpt["arch"], **ckpt["arch_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return Teacher(model.to(device).eval(), list(ckpt["classes"]), ckpt["arch"],
                   float(ckpt["acc"]), index)


def read_cached_teacher(path, log):
    """The checkpoint cached at `path`, or None when the file cannot be read: the cache is ours, so a
    damaged file is trained again (one log line says so) instead of ending the run."""
    try:
        return load_checkpoint(path, DataError, "teacher file", "retraining it")
    except DataError as e:
        log(str(e))
        return None


def build_zoo(dataset, arch, n, way, seed, preset, settings, cache_root, device, log=None, indices=None):
    """Build (or load from cache) `n` `way`-way teachers of `arch` on `dataset`'s meta-train split.
    `indices` (default: all n) limits this call to some of them (a worker's share). `log` (a callable taking
    one string) receives one line per teacher, with the time left to train the rest, and a summary. A cached
    teacher file that cannot be read is trained again."""
    if arch not in ZOO_ARCHS:
        raise ValueError(f"unknown zoo architecture {arch!r}; expected one of {ZOO_ARCHS}")
    log = log or (lambda line: None)
    device = torch.device(device)
    folder = zoo_dir(cache_root, dataset.name, arch, n, way, seed, preset)
    folder.mkdir(parents=True, exist_ok=True)
    check_manifest(folder, settings)
    indices = range(n) if indices is None else indices
    cached = {i: read_cached_teacher(teacher_path(folder, i), log) for i in indices
              if teacher_path(folder, i).is_file()}
    todo = [i for i in indices if cached.get(i) is None]  # to train (absent or unreadable); the rest is cached
    teachers, entries, trained_seconds, start = [], [], 0.0, time.time()
    for i in indices:
        t0, path = time.time(), teacher_path(folder, i)
        if i not in todo:
            ckpt = cached[i]
            check_classes(ckpt, dataset, way, seed, i, path)
            how = "cached"
        else:
            ckpt = fit_teacher(dataset, arch, way, seed, i, settings, device)
            atomic_write(path, lambda f: torch.save(ckpt, f))
            trained_seconds += time.time() - t0
            done = todo.index(i) + 1
            left = trained_seconds / done * (len(todo) - done)  # the teachers still to train, at the mean time so far
            how = f"trained in {time.time() - t0:.1f}s, {done}/{len(todo)} to train, {format_minutes(left)} left"
        teacher = teacher_from_checkpoint(ckpt, i, device)
        teacher.class_names = [dataset.class_names[c] for c in teacher.classes]
        teachers.append(teacher)
        entries.append({"index": i, "file": path.name, "arch": ckpt["arch"],
                        "classes": list(ckpt["classes"]), "acc": float(ckpt["acc"])})
        if len(indices) == n:  # a worker's share leaves the manifest to the full pass that follows
            write_manifest(folder, settings, entries)
        log(f"teacher {i + 1:3d}/{n} {ckpt['arch']:8s} classes {list(ckpt['classes'])} held-out acc "
            f"{ckpt['acc']:.3f} {how}")
    mean_acc = sum(t.acc for t in teachers) / max(len(teachers), 1)
    log(f"zoo {folder.name}: {len(teachers)} teachers ({len(todo)} trained, {len(teachers) - len(todo)} cached), "
        f"mean held-out acc {mean_acc:.3f}, {time.time() - start:.1f}s")
    return teachers


def format_minutes(seconds):
    return f"{seconds:.0f}s" if seconds < 60 else f"{seconds / 60:.1f} min"
