"""The settings of a FREE run: the command line built from free.py's Config, and the checks of every
setting before any work (what is wrong whatever the data, what the data cannot satisfy, a foreign or
finished run in --out). free.py calls these through run.py's entry point; each error a user can cause is
one UserError, printed as one `error: ...` line.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
from dataclasses import fields

import torch

import maml
import workers
from data import DATASETS, SIZE_MULTIPLE, UserError, check_writable
from models import ARCHS

METHODS = ("free", "random", "average", "maml")
TRAINED = ("free", "maml")  # methods that meta-train for `rounds`; random and average are evaluated as they start
USES_ZOO = ("free", "average")  # methods that read the teacher zoo
BANK_FILTERS = ("all", "agree")  # --bank-filter choices
# settings that may differ when a run is resumed (where and how it runs, and how long); any other difference
# makes a checkpoint belong to another run
NOT_IDENTITY = ("out", "resume", "device", "workers", "vmap", "data_root", "mirror", "cache", "rounds", "export_zoo")


# ------------------------------------------------------------------------ command line


def parse_args(argv, config_class, presets):
    """argparse built from the Config dataclass (one flag per field, its `# comment` as help); the preset
    fills the counts the user did not set."""
    p = OneLineErrorParser(prog="free.py", description="FREE (CVPR 2024): data-free meta-learning from a zoo of "
                           "pre-trained classifiers. `python free.py adapt --help`: apply a trained meta-learner "
                           "to your own images.")
    choices = dict(dataset=DATASETS, method=METHODS, teacher_arch=ARCHS + ("mix",), preset=tuple(presets),
                   device=("auto", "cpu", "cuda"), shots=(1, 5), theta_tilde_opt=maml.THETA_TILDE_OPTIMIZERS,
                   bank_filter=BANK_FILTERS, vmap=("auto", "on", "off"))
    comments = field_comments(config_class)
    for f in fields(config_class):
        by_preset = "".join(f"; {name}: {over[f.name]}" for name, over in presets.items() if f.name in over)
        help_ = f"{comments[f.name]} (default: {f.default}{by_preset})"
        if f.type is bool:
            p.add_argument(flag(f.name), action="store_true", help=help_)
        else:
            p.add_argument(flag(f.name), type=f.type, default=None, choices=choices.get(f.name), help=help_)
    args = p.parse_args(argv)
    cfg = config_class(**presets[args.preset or "paper"])
    for f in fields(config_class):
        v = getattr(args, f.name)
        if v is not None and v is not False:
            setattr(cfg, f.name, v)
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.dataset}-{cfg.way}w{cfg.shots}s-{run_name(cfg)}")
    return cfg


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line naming the fix (--help), like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists every flag)\n")


def field_comments(config_class):
    """The `# comment` after each Config field, used as the flag's help text."""
    out = {}
    for line in inspect.getsource(config_class).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            out[line.split(":")[0]] = line.split("#", 1)[1].strip()
    return out


def flag(name):
    return "--" + name.replace("_", "-")


def run_name(cfg):
    return "-".join([cfg.method] + ablations(cfg))


def ablations(cfg):
    """The run's departures from the method's defaults, as flag names (the default --out and results.json)."""
    names = ["no_meta_generator", "no_align", "hard_labels", "first_order", "no_kd_augment", "no_kd"]
    out = [n.replace("_", "-") for n in names if getattr(cfg, n)]
    defaults = type(cfg)()
    return out + [f"{n.replace('_', '-')}-{getattr(cfg, n)}" for n in ("theta_tilde_opt", "bank_filter")
                  if getattr(cfg, n) != getattr(defaults, n)]


# ------------------------------------------------------------------------ checks before any work


# the least value of each count (a flag below it ends in one error line before any work)
AT_LEAST = dict(way=2, query=1, image_size=SIZE_MULTIPLE, recover_steps=1, seed=0, workers=1, n_teachers=1, zoo_epochs=1, zoo_batch=2,
                rounds=1, warmup=0, B=1, k=1, n_per_class=1, nf=1, meta_batch=1, replay_patience=1, max_replay=0,
                eval_every=1, val_tasks=1, test_tasks=1, save_every=1, train_inner_steps=1, test_inner_steps=0)
SEED_MAX = 2 ** 63 - 1  # the largest seed every generator of the run accepts (torch, numpy)
POSITIVE = ("gen_lr", "alpha", "tau", "outer_lr", "inner_lr")  # rates: finite and > 0
NON_NEGATIVE = ("lambda_adv",)  # weights: finite and >= 0


def check_config(cfg):
    """Every setting that is wrong whatever the data, found before anything is read, written or trained."""
    for name, least in AT_LEAST.items():
        value = getattr(cfg, name)
        if value is not None and value < least:
            raise UserError(f"{flag(name)} {value}: expected at least {least}")
    for name in POSITIVE + NON_NEGATIVE:
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and name in POSITIVE):
            raise UserError(f"{flag(name)} {value}: expected a finite number {'> 0' if name in POSITIVE else '>= 0'}")
    if cfg.image_size is not None and cfg.image_size % SIZE_MULTIPLE:
        raise UserError(f"--image-size {cfg.image_size}: expected a multiple of {SIZE_MULTIPLE} (the meta-generator "
                        f"starts at s/{SIZE_MULTIPLE}, supplement Table 1)")
    if cfg.zoo is not None and cfg.method not in USES_ZOO:
        raise UserError(f"--zoo with --method {cfg.method}: only {' and '.join(USES_ZOO)} read teachers; drop --zoo")
    if cfg.zoo is not None and cfg.export_zoo is not None:
        raise UserError("--zoo with --export-zoo: --export-zoo writes the zoo that free.py trains; drop one of them")
    if cfg.method in USES_ZOO and cfg.zoo is None and cfg.B > cfg.n_teachers:
        raise UserError(f"--B {cfg.B}: a round samples B of the {cfg.n_teachers} teachers; lower --B or raise "
                        f"--n-teachers")
    if cfg.method in TRAINED and cfg.rounds <= cfg.warmup:
        raise UserError(f"--rounds {cfg.rounds} with --warmup {cfg.warmup}: the meta-learner would never train; "
                        f"expected --rounds > --warmup")
    if cfg.seed > SEED_MAX:
        raise UserError(f"--seed {cfg.seed}: expected at most {SEED_MAX}")
    if cfg.method == "average" and cfg.zoo is None and cfg.teacher_arch not in ("conv4", "mix"):
        raise UserError(f"--method average with --teacher-arch {cfg.teacher_arch}: it averages conv4 teachers' weights; "
                        f"use --teacher-arch conv4 or mix")
    if cfg.method == "maml" and cfg.max_replay < 1:
        raise UserError(f"--max-replay {cfg.max_replay}: expected at least 1 for --method maml (it learns from "
                        f"replay alone)")
    if cfg.mirror is not None and not cfg.mirror.startswith(("http://", "https://")):
        raise UserError(f"--mirror {cfg.mirror}: expected an http:// or https:// base address")
    if cfg.workers > 1 or workers.under_torchrun():
        check_workers(cfg)
    for what, folder in (("--out", cfg.out), ("--data-root", cfg.data_root), ("--export-zoo", cfg.export_zoo)) + \
            ((("--cache", cfg.cache),) if cfg.method in USES_ZOO and cfg.zoo is None else ()):
        if folder is not None:
            check_writable(what, folder)


def check_workers(cfg):
    """--workers N (or torchrun's N processes): at most the machine's cores or GPUs, at most a meta-batch's tasks."""
    if workers.under_torchrun():
        n, what = int(os.environ["WORLD_SIZE"]), "torchrun's --nproc-per-node"
    else:
        n, what = cfg.workers, "--workers"
        device_type = pick_device(cfg.device).type
        have = workers.available(device_type)
        if n > have:
            raise UserError(f"--workers {n}: this machine has {have} "
                            f"{'GPUs' if device_type == 'cuda' else 'CPU cores'}; expected at most {have}")
    if n > cfg.meta_batch:
        raise UserError(f"{what} {n}: a replay meta-batch of {cfg.meta_batch} tasks is shared by the workers; "
                        f"expected at most --meta-batch workers")


def check_settings(cfg, ds):
    """Settings the data cannot satisfy, found before anything is written or trained."""
    needs_train = cfg.method in USES_ZOO or cfg.method == "maml"
    for s in ["val", "test"] + (["train"] if needs_train else []):
        split = ds.splits[s]
        if len(split.classes) < cfg.way:
            raise UserError(f"--way {cfg.way}: the {s} split of {ds.name} has {len(split.classes)} classes; "
                            f"lower --way")
        if s == "train" and cfg.method != "maml":
            continue  # teachers need `way` classes; tasks are sampled from the real train split by maml only
        counts = torch.bincount(split.labels)
        fewest = min(split.classes, key=lambda c: counts[c].item())
        if counts[fewest] < cfg.shots + cfg.query:
            raise UserError(f"--shots {cfg.shots} + --query {cfg.query}: class {ds.class_names[fewest]!r} of the {s} "
                            f"split of {ds.name} has {counts[fewest].item()} images; lower --shots or --query")


def check_out(cfg):
    """--out holds no run, or (with --resume) a run of this configuration. Returns the results of a
    finished run of as many rounds (nothing left to do), else None."""
    last, results = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "results.json")
    has_run = os.path.exists(last) or os.path.exists(results)
    if not cfg.resume:
        if has_run:
            raise UserError(f"{cfg.out} already holds a run; pass --resume to continue it or pick another --out")
        return None
    if not has_run:
        return None  # --resume of a run that has not started yet: start it
    check_resume(cfg, cfg.out)
    if os.path.exists(results):
        with open(results) as f:
            done = json.load(f)
        if done.get("rounds") >= (cfg.rounds if cfg.method in TRAINED else 0):
            return done  # finished at these rounds or more: nothing to do
    return None


def check_resume(cfg, out):
    """Refuse to resume a run of another configuration."""
    path = os.path.join(out, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: cannot read {path} ({e}); it is written at a run's start: start a new run "
                        f"in another --out") from e
    mine = dataclasses.asdict(cfg)
    diff = [k for k in mine if k not in NOT_IDENTITY and saved.get(k) != mine[k]]
    if diff:
        raise UserError(f"--resume: {out} belongs to a different configuration; differing settings: "
                        + ", ".join(f"{k} (saved {saved.get(k)!r}, now {mine[k]!r})" for k in diff)
                        + ". Use another --out or the saved settings.")


def pick_device(name, probe=False):
    """The run's device, chosen once: CUDA when present (auto), or as asked; a worker gets its own GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device auto or cpu")
    kind = "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"
    return torch.device(kind) if probe or not workers.under_torchrun() else workers.local_device(kind)


def set_seed(seed):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def is_validation_round(cfg, round_):
    """Meta-validation after every E-th round and after the last, once the warm-up is over."""
    return round_ > cfg.warmup and (round_ % cfg.eval_every == 0 or round_ == cfg.rounds)
