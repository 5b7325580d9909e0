"""Use a meta-learned theta on new images: `python free.py adapt --checkpoint runs/RUN/best.pt --support S --query Q`.

The meta-test of the paper (Wei et al., CVPR 2024, §4) applied to a user's own task: starting from the
checkpoint's theta, adapt on the support set S/<class>/<images> with the MAML inner loop exactly as the
meta-test does (maml.inner_adapt, first-order, `test_inner_steps` SGD steps of lr `inner_lr` from the run's
Config), then predict the query images Q/<images> (or Q/<class>/<images>, which adds the accuracy) with the
adapted weights. Predictions go to a CSV: per query image the predicted class, its probability and the
softmax over the N support classes.

The head (`--head`): with as many support classes N as the checkpoint's way, `auto` uses the meta-learned
head, so the accuracy on a task is the meta-test's (maml.meta_test). With another N the meta-learned head
does not fit; `auto` then starts from a prototype head (Proto-MAML: Triantafillou et al., "Meta-Dataset:
A Dataset of Datasets for Learning to Learn from Few Examples", ICLR 2020) and adapts it with the rest.

Ours: neither the paper nor the authors' code has this step; it changes nothing of the method.
BatchNorm uses batch statistics, as in MAML's meta-test: each query image's prediction depends on the other
query images of the run (the whole query folder is one batch), and a query of one or two images at a small
image size gives little to normalise with.
"""
import csv
import inspect
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

import data
import maml
from data import UserError
from models import Conv4
from settings import OneLineErrorParser, pick_device
from zoo import load_checkpoint

HEADS = ("auto", "learned", "prototype")  # --head choices
STARTS = ("learned", "prototype", "zero")  # heads adapt_task starts from ("zero": the yardstick of bench.py adapt)
DEFAULT_OUT = "predictions.csv"  # --out default, in the current folder
DECIMALS = 4  # probabilities in the CSV
CONV4_ARGS = tuple(inspect.signature(Conv4).parameters)  # the keys of a checkpoint's "arch"
CONFIG_KEYS = ("test_inner_steps", "inner_lr")  # what adapt reads from the run's Config
CHECKPOINT_HINT = "expected a run's best.pt, written by free.py"


@dataclass
class Adaptation:
    classes: list  # the N support class names, sorted; label c is classes[c]
    files: list  # query files, relative to the query folder
    probabilities: torch.Tensor  # float [Q, N], softmax of the adapted logits
    truth: list  # class index of each query file (query/<class>/ layout), or None
    accuracy: float  # fraction of query files predicted right, or None without truth
    head: str  # the head adapted from: "learned" or "prototype"
    steps: int  # inner SGD steps taken on the support set
    n_support: int  # support images

    @property
    def predicted(self):
        """Predicted class index per query file, [Q]."""
        return self.probabilities.argmax(dim=1)


# ---------------------------------------------------------------------------------- the method


def prototype_head(features, y, n_classes):
    """Proto-MAML's head (Triantafillou et al. 2020): the prototypical network's classifier
    -||f(x) - mu_c||^2 = 2 mu_c . f(x) - ||mu_c||^2 - ||f(x)||^2 written as a linear layer (the last
    term is the same for every class):

        W_c = 2 mu_c,   b_c = -||mu_c||^2,   mu_c = mean of f(x) over the support images x of class c.

    features: float [n, D] (penultimate features); y: int64 [n] in 0..n_classes-1. Returns (W [N, D], b [N])."""
    one_hot = F.one_hot(y, n_classes).to(features.dtype)  # [n, N]
    mu = one_hot.T @ features / one_hot.sum(dim=0, keepdim=True).T  # [N, D], class means
    return 2 * mu, -(mu * mu).sum(dim=1)


def starting_params(model, x_s, y_s, n_classes, head):
    """theta to adapt from: the checkpoint's weights (loaded into `model`), with the meta-learned head, or
    for head == "prototype" prototype_head over the support features f_theta(x_s) (batch statistics), or for
    head == "zero" a zero head (every class scores 0 before the first step)."""
    params = maml.detached_params(model)
    if head == "prototype":
        with torch.no_grad():
            params["head.weight"], params["head.bias"] = prototype_head(model.features(x_s), y_s, n_classes)
    elif head == "zero":
        params["head.weight"], params["head.bias"] = (torch.zeros_like(params[k]) for k in ("head.weight", "head.bias"))
    return params


def adapt_task(model, x_s, y_s, x_q, n_classes, head, steps, lr):
    """One task as the meta-test adapts (paper §4): theta with `head`'s start (starting_params), `steps` SGD
    steps of lr `lr` on the support set (maml.inner_adapt, first-order as maml.meta_test), then the softmax of
    the query logits. x_s [n, C, s, s], y_s [n], x_q [Q, C, s, s] -> probabilities [Q, n_classes]."""
    params = starting_params(model, x_s, y_s, n_classes, head)
    with torch.no_grad():  # as maml.meta_test: torch.func.grad still differentiates inside
        adapted = maml.inner_adapt(model, params, x_s, y_s, steps, lr, first_order=True)
        return F.softmax(functional_call(model, adapted, (x_q,)), dim=1)  # [Q, N]


def adapt(checkpoint_path, support_dir, query_dir, steps=None, head="auto", device="cpu"):
    """Adapt a meta-learner checkpoint (a run's best.pt) to the support folder and predict the query folder.

    support_dir/<class>/<images>: N >= 2 classes, label c = the c-th class name in sorted order.
    query_dir/<images>, or query_dir/<class>/<images> with classes among the support's (then `accuracy`).
    `steps` defaults to the run's test_inner_steps; lr is its inner_lr; `head` is one of HEADS.
    Images are read by data.read_image at the checkpoint's size and channels, in [0, 1].
    The support set is one batch, the query set another (batch-statistics BatchNorm, as maml.meta_test).
    Returns an Adaptation; user errors raise UserError (data.DataError for images)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    device = torch.device(device)
    arch, state, config = load_meta_learner(checkpoint_path)
    steps = config["test_inner_steps"] if steps is None else steps
    if steps < 0:
        raise UserError(f"--steps {steps}: expected at least 0 inner steps")
    size, channels = arch["image_size"], arch["in_channels"]
    classes, x_s, y_s = support_set(support_dir, size, channels)
    files, x_q, truth = query_set(query_dir, classes, size, channels)
    head = pick_head(head, len(classes), arch["num_classes"])
    model = meta_learner(arch, state, len(classes), head, checkpoint_path).to(device)
    x_s, y_s, x_q = x_s.to(device), y_s.to(device), x_q.to(device)
    probabilities = adapt_task(model, x_s, y_s, x_q, len(classes), head, steps, config["inner_lr"]).cpu()  # [Q, N]
    accuracy = None
    if truth is not None:
        accuracy = maml.accuracy(probabilities, torch.tensor(truth)).item()
    return Adaptation(classes, files, probabilities, truth, accuracy, head, steps, len(y_s))


def pick_head(head, n_classes, way):
    """`auto`: the meta-learned head when the support has the checkpoint's way classes, else a prototype head."""
    if head == "auto":
        return "learned" if n_classes == way else "prototype"
    if head == "learned" and n_classes != way:
        raise UserError(f"--head learned: the checkpoint's head has {way} classes, the support set {n_classes}; "
                        f"use --head auto or prototype, or a support set of {way} classes")
    return head


# ---------------------------------------------------------------------------------- checkpoint and images


def load_meta_learner(path):
    """(arch, state_dict, config) of a best.pt ({"model", "arch", "config"}, free.py's Run.save_best)."""
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path}: no such file; {CHECKPOINT_HINT} (runs/<run>/best.pt)")
    ckpt = load_checkpoint(path, UserError, "--checkpoint", CHECKPOINT_HINT)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"--checkpoint {path} holds no model weights; {CHECKPOINT_HINT}")
    if "arch" not in ckpt or "config" not in ckpt:
        what = ("is a training state (last.pt), which does not record the model's shape" if "round" in ckpt
                else "was written by an older free.py (no 'arch' or 'config')")
        raise UserError(f"--checkpoint {path} {what}; pass the run's best.pt")
    arch, config = ckpt["arch"], ckpt["config"]
    if not isinstance(arch, dict) or set(arch) != set(CONV4_ARGS) or arch["track_running_stats"]:
        raise UserError(f"--checkpoint {path}: its 'arch' {arch!r} is not a Conv4 meta-learner's (batch-statistics "
                        f"BatchNorm); {CHECKPOINT_HINT}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise UserError(f"--checkpoint {path}: its config lacks {missing}; {CHECKPOINT_HINT}")
    return arch, ckpt["model"], config


def meta_learner(arch, state, n_classes, head, path):
    """Conv4 of the checkpoint's arch with an n_classes head; every weight from the checkpoint, the head's
    too when head == "learned" (a prototype head is set by starting_params)."""
    model = Conv4(**{**arch, "num_classes": n_classes})
    body = state if head == "learned" else {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = model.load_state_dict(body, strict=False)
    except RuntimeError as e:  # a shape differs from the arch's
        raise UserError(f"--checkpoint {path}: its weights do not fit its 'arch' ({str(e).splitlines()[-1].strip()}); "
                        f"{CHECKPOINT_HINT}") from e
    expected_missing = [] if head == "learned" else ["head.weight", "head.bias"]
    if sorted(missing) != sorted(expected_missing) or unexpected:
        raise UserError(f"--checkpoint {path}: its weights do not fit its 'arch' (missing "
                        f"{sorted(set(missing) - set(expected_missing))}, unexpected {unexpected}); {CHECKPOINT_HINT}")
    return model


def read_images(paths, size, channels):
    """Image files -> float [n, channels, size, size] in [0, 1] (data.read_image, / 255)."""
    return torch.stack([data.read_image(p, size, channels) for p in paths]).float().div_(255)


def support_set(folder, size, channels):
    """(sorted class names, x_s float [n, C, s, s], y_s int64 [n]) of folder/<class>/<images>."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--support {root}: no such folder; expected <class>/ folders of PNG or JPEG images")
    found = data.class_folders(root, "--support")
    if len(found) < 2:
        raise UserError(f"--support {root} holds {len(found)} class folder ({found[0][0]}); expected at least 2 "
                        f"classes, each a folder of images")
    paths = [p for _, files in found for p in files]
    y = torch.tensor([c for c, (_, files) in enumerate(found) for _ in files])
    return [name for name, _ in found], read_images(paths, size, channels), y


def query_set(folder, classes, size, channels):
    """(files relative to folder, x_q float [Q, C, s, s], class index per file or None) of folder/<images>,
    or of folder/<class>/<images> whose class names are among `classes`."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--query {root}: no such folder; expected PNG or JPEG images, or <class>/ folders of them")
    loose = data.image_files(root)
    sub = [p for p in root.iterdir() if p.is_dir() and not data.is_hidden(p)]
    if loose and sub:
        raise UserError(f"--query {root} holds both images and folders ({sub[0].name}/); expected either the "
                        f"images alone or <class>/ folders of them")
    if not loose and not sub:
        raise UserError(f"--query {root} holds no images; expected PNG or JPEG files "
                        f"({', '.join(data.IMAGE_SUFFIXES)}), or <class>/ folders of them")
    if loose:
        return [p.name for p in loose], read_images(loose, size, channels), None
    found = data.class_folders(root, "--query")
    unknown = [name for name, _ in found if name not in classes]
    if unknown:
        raise UserError(f"--query {root}: class folders {unknown} are not support classes; expected query "
                        f"classes among {classes}")
    paths = [p for _, files in found for p in files]
    truth = [classes.index(name) for name, files in found for _ in files]
    return [p.relative_to(root).as_posix() for p in paths], read_images(paths, size, channels), truth


# ---------------------------------------------------------------------------------- output and command line


def predictions_csv(result):
    """`file,predicted,probability,<class 1>,...,<class N>`: a row per query file, probabilities to DECIMALS."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "predicted", "probability", *result.classes])
    for file, p, k in zip(result.files, result.probabilities.tolist(), result.predicted.tolist()):
        writer.writerow([file, result.classes[k], f"{p[k]:.{DECIMALS}f}", *(f"{v:.{DECIMALS}f}" for v in p)])
    return out.getvalue()


def summary(result, out, device):
    """The command's one line: what was adapted, how, the accuracy when known, and where the CSV went."""
    n_query = len(result.files)
    line = (f"adapt: {len(result.classes)} classes, {result.n_support} support images, {n_query} query images, "
            f"{result.steps} steps, {result.head} head, {device}")
    if result.accuracy is not None:
        right = round(result.accuracy * n_query)
        line += f": accuracy {100 * result.accuracy:.2f}% ({right}/{n_query})"
    return line + f"; predictions in {out}"


def check_out(path):
    """--out must name a file in an existing, writable folder (checked before any work)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; expected a file name such as {path / DEFAULT_OUT}")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: {path.parent} is not a folder; pick another --out")
    data.check_writable("--out", path.parent)
    return path


def parse_args(argv):
    p = OneLineErrorParser(prog="free.py adapt", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run's best.pt (runs/<run>/best.pt)")
    p.add_argument("--support", required=True,
                   help="folder of <class>/ folders of PNG or JPEG images (2 or more classes)")
    p.add_argument("--query", required=True, help="folder of images, or of <class>/ folders of them (then the "
                                                  "accuracy is reported)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the predictions CSV (default: {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=None, help="inner SGD steps (default: the run's test_inner_steps)")
    p.add_argument("--head", choices=HEADS, default="auto",
                   help="learned: the meta-learned head (needs the run's way classes); prototype: Proto-MAML's; "
                        "auto: learned when the class count fits, else prototype (default: auto)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default: auto (CUDA when present)")
    return p.parse_args(argv)


def cli(argv=None):
    """`python free.py adapt ...` (argv without the word adapt): adapt, write the CSV, print one line.
    Returns the exit status: 0, 1 for an error the user can fix (one `error:` line), 2 for a bad flag."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2), its line already printed
        return e.code
    try:
        out = check_out(args.out)
        device = pick_device(args.device, probe=True)
        result = adapt(args.checkpoint, args.support, args.query, args.steps, args.head, device)
        text = predictions_csv(result)
        data.atomic_write(out, lambda f: f.write(text.encode()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: no predictions written", file=sys.stderr, flush=True)
        return 130
    print(summary(result, out, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
