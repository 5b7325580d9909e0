"""Linear CKA between teachers' penultimate features, and supplement Figure 1 (three heatmaps).

Paper: Wei et al., "FREE: Faster and Better Data-Free Meta-Learning", CVPR 2024, supplement Fig. 1
(supplement Figure 1): how similar the representations of the zoo's teachers are, for (a) teachers of
different tasks on one data set, (b) teachers of different data sets, (c) teachers of different
architectures. Similarity is linear CKA (Kornblith et al., ICML 2019) on a fixed probe set.

Probe: PRESETS[preset]["probe"] real meta-train images of --dataset, drawn once with --seed, the
same for every panel. A teacher whose input format differs (panel (b): CIFAR-FS 32x32x3 etc.) sees
the same images resized bilinearly, grey channels repeated (or colour averaged).
Panels: (a) conv4 teachers 0..n-1 of --dataset; (b) conv4 teachers of --dataset, of data.py's
`synthetic` set rendered at --dataset's size and channels (28x28x1 for Omniglot), and of CIFAR-FS /
miniImageNet / CUB when their files are in --data-root; (c) conv4, ResNet-10 and ResNet-18
teachers of --dataset. zoo.py seeds teacher i's classes by (seed, i), so teacher i of every
architecture in (c) solves the same task, and panels share teachers through the zoo cache.

Ours, not the authors': heatmaps are drawn with Pillow (no matplotlib), the numbers go to CSV, and
a shaded text version is printed; presets and the probe size are our choices.

Command: every flag is checked before anything is loaded, written or trained; a bad value ends as
one `error: ...` line (status 2 from argparse, 1 from the checks). Ctrl-C ends as one line, status
130; teachers already trained stay in the zoo cache, so the same command continues.
"""
import argparse
import csv
import io
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

INTERRUPTED = "interrupted; cached teachers are kept, rerun the same command to continue"


def exit_on_interrupt(signum, frame):
    """SIGINT handler of the command: one line on stderr and exit status 130 (128 + SIGINT), no
    traceback. SystemExit still runs `finally` blocks (data.atomic_write, which zoo.py and this
    command write through, drops its temp file); a second Ctrl-C while they (or the interpreter's
    shutdown) run ends it at once."""
    signal.signal(signal.SIGINT, exit_now)
    os.write(sys.stderr.fileno(), f"{INTERRUPTED}\n".encode())  # unbuffered: safe inside a print
    raise SystemExit(130)


def exit_now(signum, frame):
    """The second Ctrl-C: exit status 130 without cleanup, and without a second line."""
    os._exit(130)


# installed before the imports below (torch takes about a second), so Ctrl-C in them ends alike;
# left alone where SIGINT is ignored (a background job of a shell script)
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, exit_on_interrupt)

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
from data import UserError
from external import ZOO_JSON, fit_input, load_zoo_dir
from settings import pick_device, set_seed
from zoo import ZooSettings, build_zoo

FEATURE_BATCH = 256  # images per forward pass when extracting probe features (memory only)
SHADES = " .:-=+*#%@"  # text heatmap: value v in [0, 1] -> SHADES[min(int(v * 10), 9)]
CELL_PX, MARGIN_PX, LABEL_PX, BAR_PX, BAR_LABEL_PX = 28, 8, 72, 16, 40  # PNG layout, pixels
TITLE_PX = 20  # height of the title line above the grid
COLOURS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # viridis
OTHER_DATASETS = ("cifarfs", "miniimagenet", "cub")  # panel (b) extras, used when present
ARCHS_C = ("conv4", "resnet10", "resnet18")  # panel (c) architectures (paper §4 multi-architecture setting)
WAY = 5  # N-way teachers (paper §4: 5-way)
# per preset (ours): teachers per panel, probe images, zoo epochs (None: ZooSettings default, 60)
# (quick: batch 16 gives the ResNet teachers of panel (c) enough SGD steps on Omniglot's 80 images)
PRESETS = {"paper": dict(teachers=12, probe=500, epochs=None, batch=None),
           "quick": dict(teachers=6, probe=200, epochs=40, batch=16),
           "smoke": dict(teachers=3, probe=64, epochs=2, batch=32)}


def center_columns(X):
    """Centring of linear CKA (Kornblith et al. 2019): X_c = H X with H = I - 11^T / n: subtract each
    column's mean over the n inputs."""
    return X - X.mean(dim=0, keepdim=True)


def as_float64(A):
    """A torch tensor or numpy array as a float64 CPU tensor."""
    A = A.detach().cpu() if torch.is_tensor(A) else torch.as_tensor(np.asarray(A))
    return A.to(torch.float64)


def linear_cka(X, Y):
    """Linear CKA (Kornblith et al. 2019, §3 "dot-product-based similarity"),
    columns centred first:

        CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

    X [n, p], Y [n, q] (torch tensors or numpy arrays) hold features of the same n inputs.
    Computed in float64; returns a Python float in [0, 1]."""
    X, Y = (as_float64(A) for A in (X, Y))
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"linear_cka expects X [n, p] and Y [n, q] with the same n; got "
                         f"{tuple(X.shape)} and {tuple(Y.shape)}")
    X, Y = center_columns(X), center_columns(Y)
    denom = torch.linalg.norm(X.T @ X) * torch.linalg.norm(Y.T @ Y)
    if denom == 0:
        raise ValueError("linear_cka is undefined: a feature matrix is constant over the n inputs "
                         "(e.g. a dead teacher); use another probe set or check the model")
    return float(torch.linalg.norm(Y.T @ X) ** 2 / denom)


def fit_to_model(x, model):
    """Resize/convert images x [n, C, H, W] to the model's input (`model.arch` in_channels,
    image_size) with external.fit_input, so models of different data sets see the same probe; no-op when they
    match."""
    arch = getattr(model, "arch", {})
    return fit_input(x, arch.get("image_size", x.shape[-1]), arch.get("in_channels", x.shape[1]))


@torch.no_grad()
def model_features(model, probe, batch_size=FEATURE_BATCH, device="cpu"):
    """Penultimate features `model.features(x)` of probe [n, C, H, W] in [0, 1], in eval mode,
    batched; returns float64 [n, d] on the CPU. The model's train/eval mode is restored. A teacher of
    another source (--zoo: external.ExternalTeacher) shows no penultimate layer: its logits stand in."""
    was_training = model.training
    features = getattr(model, "features", model)
    model.eval()
    try:
        feats = [features(fit_to_model(xb.to(device), model)).flatten(1).double().cpu()
                 for xb in torch.as_tensor(probe).split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(feats)  # [n, d]


def cka_matrix(models, probe, batch_size=FEATURE_BATCH, device="cpu"):
    """Supplement Figure 1: numpy [m, m]: entry (i, j) = linear_cka(features_i(probe), features_j(probe)), features
    from `model.features` in eval mode without gradients (see model_features)."""
    feats = [model_features(m, probe, batch_size, device) for m in models]
    m = len(feats)
    out = np.eye(m)
    for i in range(m):
        for j in range(i, m):
            out[i, j] = out[j, i] = linear_cka(feats[i], feats[j])
    return out


def colour_of(v):
    """Linear interpolation of COLOURS at v in [0, 1]."""
    t = min(max(float(v), 0.0), 1.0) * (len(COLOURS) - 1)
    i = min(int(t), len(COLOURS) - 2)
    a, b = COLOURS[i], COLOURS[i + 1]
    return tuple(round(a[k] + (t - i) * (b[k] - a[k])) for k in range(3))


def heatmap_size(m, title=""):
    """(width, height) in pixels of the PNG heatmap for an m x m matrix (wide enough for title)."""
    grid = m * CELL_PX
    title_px = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title) + 2 * MARGIN_PX
    return (max(LABEL_PX + grid + 2 * MARGIN_PX + BAR_PX + BAR_LABEL_PX, int(title_px) + 1),
            TITLE_PX + LABEL_PX + grid + MARGIN_PX)


def write_heatmap_png(matrix, labels, path, title=""):
    """Supplement Figure 1 as PNG: draw matrix [m, m] (values in [0, 1]) as a heatmap PNG with row/column labels and a
    colour scale from 0 to 1; returns the image size."""
    m = len(labels)
    if np.shape(matrix) != (m, m):
        raise ValueError(f"matrix shape {np.shape(matrix)} does not match {m} labels")
    img = Image.new("RGB", heatmap_size(m, title), "white")
    draw = ImageDraw.Draw(img)
    x0, y0 = LABEL_PX, TITLE_PX + LABEL_PX  # top-left corner of the grid
    draw.text((MARGIN_PX, 4), title, fill="black")
    for i, label in enumerate(labels):
        yc = y0 + i * CELL_PX
        draw.text((2, yc + CELL_PX // 3), label[:11], fill="black")  # row label
        tag = Image.new("RGB", (LABEL_PX, CELL_PX), "white")  # column label, rotated 90 degrees
        ImageDraw.Draw(tag).text((2, CELL_PX // 3), label[:11], fill="black")
        img.paste(tag.rotate(90, expand=True), (x0 + i * CELL_PX, TITLE_PX))
        for j in range(m):
            xc = x0 + j * CELL_PX
            draw.rectangle([xc, yc, xc + CELL_PX - 1, yc + CELL_PX - 1],
                           fill=colour_of(matrix[i][j]))
    bx, grid = x0 + m * CELL_PX + MARGIN_PX, m * CELL_PX  # colour bar, 1 at the top
    for k in range(grid):
        draw.line([bx, y0 + k, bx + BAR_PX - 1, y0 + k], fill=colour_of(1 - k / max(grid - 1, 1)))
    draw.text((bx + BAR_PX + 3, y0), "1.0", fill="black")
    draw.text((bx + BAR_PX + 3, y0 + grid - 10), "0.0", fill="black")
    data.atomic_write(Path(path), lambda f: img.save(f, format="PNG"))
    return img.size


def text_heatmap(matrix, labels):
    """Supplement Figure 1 in the terminal. Shaded text rendering: one row per label, two characters
    per cell from SHADES."""
    width = max(len(s) for s in labels)
    lines = [" " * width + " |" + "".join(f"{j % 100:>2d}" for j in range(len(labels)))]
    for i, label in enumerate(labels):
        cells = "".join(2 * SHADES[min(int(v * len(SHADES)), len(SHADES) - 1)] for v in matrix[i])
        lines.append(f"{label:>{width}} |{cells}| {i}")
    lines.append(f"scale 0 -> 1: '{SHADES}'")
    return "\n".join(lines)


def write_csv(matrix, labels, path):
    """CSV with a header row of labels, then one row per label of CKA values (written atomically)."""
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow([""] + list(labels))
    for label, row in zip(labels, matrix):
        w.writerow([label] + [f"{v:.4f}" for v in row])
    data.atomic_write(Path(path), lambda f: f.write(text.getvalue().encode()))


# ----------------------------------------------------------------------------- command (Fig. 1)
# --seed: torch.Generator.manual_seed takes at most 2^64 - 1, zoo.py's numpy default_rng no seed < 0
SEED_MAX = 2 ** 64 - 1


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line on stderr (exit status 2), like every
    other error of the command; --help is unchanged."""

    def error(self, message):
        self.exit(2, f"error: {message}; see python {self.prog} --help\n")


def make_parser():
    p = Parser(description="Supplement Figure 1: linear CKA between teachers")
    p.add_argument("--dataset", default="omniglot", choices=data.DATASETS,
                   help="data set of the probe, panels (a), (c) (default: omniglot)")
    p.add_argument("--data-root", required=True,
                   help="folder with the data set's files (Omniglot, CIFAR-FS and CUB are "
                        "downloaded into it when absent)")
    p.add_argument("--out", default="cka_out",
                   help="output folder for cka_{a,b,c}.png/.csv (default: cka_out)")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="teachers per panel, probe images, zoo epochs: " + "; ".join(
                       f"{k} {v['teachers']}, {v['probe']}, {v['epochs'] or ZooSettings.epochs}"
                       for k, v in PRESETS.items()) + " (default: quick)")
    p.add_argument("--teachers", type=int, default=None,
                   help="teachers per panel, at least 1, split evenly over its groups "
                        "(default: preset)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"zoo seed and probe draw, 0 to {SEED_MAX} (default: 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if available, else cpu (default: auto)")
    p.add_argument("--cache", default="cache",
                   help="zoo cache root; zoo.py adds zoo/<name>/ (default: cache)")
    p.add_argument("--zoo", metavar="DIR", help="your own teachers (zoo.json and programs, as free.py --zoo): "
                   "one heatmap cka_zoo.png/.csv of them on --dataset's probe (their logits where no penultimate "
                   "layer shows) instead of panels (a)-(c)")
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def check_args(args):
    """Every value the parser cannot check, before anything is loaded, written or trained."""
    if args.teachers is not None and args.teachers < 1:
        raise UserError(f"--teachers {args.teachers}: expected at least 1 teacher per panel; pass a "
                        f"positive count, or leave it unset for the preset's "
                        f"{PRESETS[args.preset]['teachers']}")
    if not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed {args.seed}: expected an integer from 0 to {SEED_MAX}; pass a seed "
                        f"in that range")
    data.check_writable("--data-root", args.data_root, write=False)  # read-only data is fine when present
    data.check_writable("--out", args.out, write=True)
    data.check_writable("--cache", args.cache, write=True)
    if args.zoo is not None and not Path(args.zoo, ZOO_JSON).is_file():
        raise UserError(f"--zoo {args.zoo}: expected a folder holding {ZOO_JSON} and the teachers' programs (README "
                        f"'Your own models and data'); found no {ZOO_JSON} there")


def make_probe(dataset, n, seed):
    """n real meta-train images of `dataset`, drawn with `seed`: float [n, C, H, W] in [0, 1]."""
    images = dataset.splits["train"].images  # uint8 [N, C, H, W]
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx].float() / 255.0


def files_present(name, root):
    """Whether `name`'s files are already in `root` (load_dataset would try to download them)."""
    root = Path(root)
    if name == "cifarfs":
        return (root / data.CIFAR_FILE).is_file()
    if name == "miniimagenet":
        return all((root / data.MINI_DIR / f).is_file() for f in data.MINI_FILES.values())
    if name == "cub":
        return any((root / f).is_file() for f in (data.CUB_FILE, f"cub_{data.IMAGE_SIZE_84}.npz"))
    raise ValueError(f"no file check for data set {name!r}; expected one of {OTHER_DATASETS}")


def synthetic_like(ds, seed):
    """data.py's `synthetic` set at ds's image size and channels (colour averaged to grey when
    ds is grey, e.g. 28x28x1 for Omniglot); named by its format so its zoo has its own cache."""
    syn = data.load_dataset("synthetic", None, image_size=ds.image_size, seed=seed)
    if (ds.image_size, ds.channels) == (data.SYNTHETIC_SIZE, data.SYNTHETIC_CHANNELS):
        return syn
    if ds.channels not in (1, syn.channels):
        raise ValueError(f"synthetic is {syn.channels}-channel; cannot match {ds.channels}")
    grey = ds.channels == 1 and syn.channels != 1
    splits = {k: data.make_split(v.images.float().mean(1, keepdim=True).round().to(torch.uint8)
                                 if grey else v.images, v.labels)
              for k, v in syn.splits.items()}  # [N, C, S, S]
    name = f"synthetic{ds.image_size}c{ds.channels}"
    return data.assemble(name, splits, [f"{name}_{c}" for c in range(len(syn.class_names))])


def teachers(dataset, arch, n, args, settings, device):
    """Teachers 0..n-1 of `arch` on `dataset` from the zoo (trained once, then read from --cache).
    Teacher i gets the same classes whatever its architecture (zoo.py seeds by (seed, i))."""
    preset = args.preset if args.preset == "paper" else f"cka-{args.preset}"  # own cache name
    return build_zoo(dataset, arch, n, way=WAY, seed=args.seed, preset=preset, settings=settings,
                     cache_root=args.cache, device=device, log=print)


def panel_a(ds, n, args, settings, device):
    zoo = teachers(ds, "conv4", n, args, settings, device)
    return zoo, [f"task{t.index}" for t in zoo], f"(a) conv4, different tasks, {ds.name}"


def panel_b(ds, n, args, settings, device):
    sets = [ds, synthetic_like(ds, args.seed)]
    for name in OTHER_DATASETS:
        if files_present(name, args.data_root):
            sets.append(data.load_dataset(name, args.data_root, seed=args.seed))
        else:
            print(f"note: panel (b) skips {name}: its files are not in {args.data_root}")
    k = max(1, n // len(sets))
    zoo, labels = [], []
    for d in sets:  # the first k of an n-teacher zoo: shares panel (a)'s teachers via the cache
        part = teachers(d, "conv4", n, args, settings, device)[:k]
        zoo, labels = zoo + part, labels + [f"{d.name[:5]}-{t.index}" for t in part]
    return zoo, labels, "(b) conv4, different data sets"


def panel_c(ds, n, args, settings, device):
    k = max(1, n // len(ARCHS_C))
    zoo, labels = [], []
    for arch in ARCHS_C:
        part = teachers(ds, arch, n if arch == "conv4" else k, args, settings, device)[:k]
        zoo, labels = zoo + part, labels + [f"{arch.replace('resnet', 'rn')}-{t.index}"
                                            for t in part]
    return zoo, labels, f"(c) different architectures, {ds.name}"


def draw_panel(key, zoo, labels, title, probe, args, device):
    """Compute the CKA matrix of one panel; write cka_<key>.png/.csv; print the text heatmap."""
    K = cka_matrix([t.model for t in zoo], probe, device=device)
    png, csv_path = (os.path.join(args.out, f"cka_{key}.{ext}") for ext in ("png", "csv"))
    write_heatmap_png(K, labels, png, title=title)
    write_csv(K, labels, csv_path)
    off = K[~np.eye(len(K), dtype=bool)] if len(K) > 1 else K.ravel()
    print(f"\n{title}\n{text_heatmap(K, labels)}")
    print(f"off-diagonal CKA: mean {off.mean():.3f}, min {off.min():.3f}, max {off.max():.3f}"
          f" -> {png}, {csv_path}")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = str(pick_device(args.device))  # UserError for --device cuda without CUDA
    preset = PRESETS[args.preset]
    n = args.teachers or preset["teachers"]
    settings = ZooSettings() if preset["epochs"] is None else ZooSettings(epochs=preset["epochs"],
                                                                          batch_size=preset["batch"])
    config = dict(vars(args), teachers_per_panel=n, probe=preset["probe"], zoo=asdict(settings))
    print(f"device {device}\nconfig {json.dumps(config)}")
    set_seed(args.seed)
    ds = data.load_dataset(args.dataset, args.data_root, seed=args.seed)  # before any file is written
    own = load_zoo_dir(args.zoo, ds, WAY, device) if args.zoo else None  # every teacher checked first
    os.makedirs(args.out, exist_ok=True)
    data.atomic_write(Path(args.out, "config.json"), lambda f: f.write(json.dumps(config, indent=1).encode()))
    probe = make_probe(ds, preset["probe"], args.seed)  # [n_probe, C, H, W]
    print(f"probe: {len(probe)} meta-train images of {ds.name} ({ds.channels}x{ds.image_size}"
          f"x{ds.image_size}), drawn with seed {args.seed}")
    if own is not None:
        draw_panel("zoo", own, [t.file for t in own], f"teachers of {args.zoo}", probe, args, device)
        return
    for key, panel in (("a", panel_a), ("b", panel_b), ("c", panel_c)):
        zoo, labels, title = panel(ds, n, args, settings, device)
        draw_panel(key, zoo, labels, title, probe, args, device)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # errors a user can cause or fix: one line, exit status 1
        sys.exit(f"error: {e}")
