"""What a FREE run needs around the method: the command line, the checks of every setting, the run's
folder (files, progress lines, checkpoints), workers and Ctrl-C. free.py holds the method and calls
these; nothing here computes an equation of the paper.

A run's folder (--out): config.json (the resolved Config), log.txt (the lines printed), metrics.jsonl
(one JSON object per event: zoo, round, val, test; what experiments/ reads), last.pt (the resumable
state), best.pt (the best theta on meta-validation, with what `free.py adapt` needs to rebuild it),
results.json, recovered.png. Rank 0 alone writes; every file that a later run reads back is written
atomically (data.atomic_write).

Errors a user can cause end as one `error: ...` line and exit status 1 (argparse's own: 2); Ctrl-C ends
as one line and status 130, after what can be kept is saved.
"""
import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

import maml
import workers
from data import DATASETS, SIZE_MULTIPLE, UserError, atomic_write, check_writable, load_dataset
from external import export_zoo, load_zoo_dir
from zoo import build_zoo, load_checkpoint, paper_settings, teacher_path, zoo_dir
from models import ARCHS

METHODS = ("free", "random", "average", "maml")
TRAINED = ("free", "maml")  # methods that meta-train for `rounds`; random and average are evaluated as they start
USES_ZOO = ("free", "average")  # methods that read the teacher zoo
BANK_FILTERS = ("all", "agree")  # --bank-filter choices
# settings that may differ when a run is resumed (where and how it runs, and how long); any other difference
# makes a checkpoint belong to another run
NOT_IDENTITY = ("out", "resume", "device", "workers", "vmap", "data_root", "mirror", "cache", "rounds", "export_zoo")
PROJECTION_ROUNDS = 3  # after this many training rounds of the paper preset on the CPU, print the projected time
GRID_PER_CLASS = 8  # recovered.png: images per class shown (recovered, then real)
GRID_PAD = 2  # recovered.png: pixels between images


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


# ------------------------------------------------------------------------ the teacher zoo


def user_teachers(cfg, ds, device):
    """The teachers of --zoo DIR (external.py), every entry checked and probed, or None without --zoo."""
    if cfg.zoo is None or cfg.method not in USES_ZOO:
        return None
    teachers = load_zoo_dir(cfg.zoo, ds, cfg.way, device)
    if cfg.B > len(teachers):
        raise UserError(f"--B {cfg.B}: a round samples B of the {len(teachers)} teachers of --zoo {cfg.zoo}; lower --B")
    return teachers


def load_teachers(cfg, ds, device, log, given=None):
    """The run's teachers and how many of them were cached before: those `given` (user_teachers: nothing
    trained), or the built-in zoo of these settings, trained once (each worker trains its share; every rank
    counts the cache before any worker trains), then read from the cache."""
    if given is not None:
        log(f"zoo: {len(given)} teachers from --zoo {cfg.zoo}")
        return given, len(given)
    settings = dataclasses.replace(paper_settings(cfg.dataset), batch_size=cfg.zoo_batch)
    if cfg.zoo_epochs is not None:
        settings.epochs = cfg.zoo_epochs
    folder = zoo_dir(cfg.cache, ds.name, cfg.teacher_arch, cfg.n_teachers, cfg.way, cfg.seed, cfg.preset)
    cached = sum(teacher_path(folder, i).is_file() for i in range(cfg.n_teachers))
    workers.barrier()
    if workers.world_size() > 1:
        build_zoo(ds, cfg.teacher_arch, cfg.n_teachers, cfg.way, cfg.seed, cfg.preset, settings, cfg.cache, device,
                  log=log, indices=workers.my_share(cfg.n_teachers))  # rank 0 logs its share's progress
        workers.barrier()  # every teacher is in the cache now
        log = None  # the pass below only reads them back
    teachers = build_zoo(ds, cfg.teacher_arch, cfg.n_teachers, cfg.way, cfg.seed, cfg.preset, settings, cfg.cache,
                         device, log=log)
    for t in teachers:
        t.model.requires_grad_(False)
    return teachers, cached


def export_teachers(cfg):
    """`--export-zoo DIR`: the teacher zoo of these settings (trained, or read from the cache) written as an
    external zoo (zoo.json and a torch.export program per teacher), for `--zoo DIR`. Returns what it wrote."""
    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.mirror, cfg.image_size, cfg.seed)
    check_settings(cfg, ds)
    teachers, _ = load_teachers(cfg, ds, torch.device("cpu"), print)
    export_zoo(teachers, ds, cfg.export_zoo)
    print(f"exported {len(teachers)} teachers of {ds.name} to {cfg.export_zoo} (zoo.json and .pt2 files): "
          f"python free.py --zoo {cfg.export_zoo} ...", flush=True)
    return {"export_zoo": cfg.export_zoo, "teachers": len(teachers)}


# ------------------------------------------------------------------------ the entry point, workers and Ctrl-C


def cli(main, argv):
    """main(argv) with every error a user can cause or fix as one `error:` line (exit 1), and Ctrl-C as one
    line (exit 130) that says what is kept. Returns the exit status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # imports are done: Ctrl-C is KeyboardInterrupt again
    try:
        return 0 if main(argv) is not None else workers.INTERRUPTED
    except (UserError, FloatingPointError) as e:
        if workers.is_main() or workers.world_size() > 1:  # before torchrun's group is joined, rank 0 speaks for all
            where = "" if workers.is_main() else f"[worker {workers.rank()}] "
            print(f"error: {where}{e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if workers.is_main():
            print("\ninterrupted: the cached teachers and the last saved checkpoint (last.pt) are kept; the same "
                  "command with --resume continues", file=sys.stderr, flush=True)
        return workers.INTERRUPTED


def spawn_workers(entry, cfg, argv):
    """`--workers N` on one machine: N processes running entry(argv), as torchrun would start them; rank 0
    writes results.json, which is returned (None when Ctrl-C stopped them)."""
    status = workers.launch(entry, argv, cfg.workers, pick_device(cfg.device).type)
    if status == workers.INTERRUPTED:
        return None
    if status:
        raise SystemExit(status)  # a worker failed; its error is printed above
    with open(os.path.join(cfg.out, "results.json")) as f:
        return json.load(f)


@contextlib.contextmanager
def finish_round_on_ctrl_c():
    """In the rounds, a first Ctrl-C finishes the round (and its validation), saves last.pt and stops;
    a second one aborts at once (KeyboardInterrupt)."""
    stop = {"flag": False}

    def on_sigint(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        if workers.is_main():
            print("\ninterrupt: finishing this round, then saving last.pt (Ctrl-C again to abort now)", flush=True)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, old)


class Timer:
    """Seconds spent in each named phase of a round: `with timer("replay"): ...`; take() returns and resets them."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, phase):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def take(self):
        out, self.seconds = self.seconds, {}
        return out


# ------------------------------------------------------------------------ the run's folder and progress


class Run:
    """A run's folder and its progress lines (see the module docstring). Rank 0 alone writes."""

    def __init__(self, cfg, device, ds):
        self.cfg, self.main = cfg, workers.is_main()
        self.last_path, self.best_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "best.pt")
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        self.rounds_timed = {"warm-up": [0, 0.0], "train": [0, 0.0]}  # phase -> [rounds, seconds] in this process
        self.val_seconds = []
        if self.main:
            os.makedirs(cfg.out, exist_ok=True)
            write_json(dataclasses.asdict(cfg), os.path.join(cfg.out, "config.json"))
            if not os.path.exists(self.last_path):  # a fresh start: records of a run that died before last.pt go
                for name in ("log.txt", "metrics.jsonl"):
                    if os.path.exists(os.path.join(cfg.out, name)):
                        os.remove(os.path.join(cfg.out, name))
        self.log(f"device: {device}  workers {workers.world_size()}  torch {torch.__version__}  "
                 f"threads {torch.get_num_threads()}")
        self.log("config: " + json.dumps(dataclasses.asdict(cfg)))
        self.log(f"data: {ds.name} {ds.image_size}x{ds.image_size}x{ds.channels}, classes train/val/test "
                 f"{len(ds.splits['train'].classes)}/{len(ds.splits['val'].classes)}/{len(ds.splits['test'].classes)}")

    def log(self, msg):
        """One line to stdout and to log.txt."""
        if self.main:
            print(msg, flush=True)
            with open(os.path.join(self.cfg.out, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def record(self, event, **values):
        """One line of metrics.jsonl: what the experiments read (never log.txt)."""
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"event": event, **values}) + "\n")

    def zoo(self, load):
        """The teacher zoo from load() -> (teachers, how many were in the cache before), and its record."""
        t0 = time.perf_counter()
        teachers, cached = load()
        self.record("zoo", teachers=len(teachers), trained=len(teachers) - cached, cached=cached,
                    seconds=time.perf_counter() - t0, held_out_acc=mean_or_none([t.acc for t in teachers]),
                    **({"zoo": self.cfg.zoo} if self.cfg.zoo else {}))
        return teachers

    def resume(self, trainer):
        """Continue from last.pt when the folder holds one: the trainer's state, the same teachers (--zoo), and
        a validation undone that an uninterrupted run of --rounds would not make (at an old last round off the
        E-round schedule: is_validation_round)."""
        if not os.path.exists(self.last_path):
            return
        ckpt = load_checkpoint(self.last_path, UserError, "--resume:", "it is written atomically, so it was changed "
                               "outside free.py: start a new run in another --out")
        if "wall_seconds" not in ckpt:
            raise UserError(f"--resume: {self.last_path} was written by an older free.py (no wall_seconds); start a "
                            f"new run in another --out")
        trainer.load_state_dict(ckpt)
        if ckpt.get("zoo") != trainer.zoo:
            raise UserError(f"--resume: the teachers in --zoo {self.cfg.zoo} changed since the run started (their "
                            f"files are part of its identity); restore them or start a new run in another --out")
        undone = trainer.before_end is not None and trainer.round < self.cfg.rounds
        if undone:
            trainer.best_val, trainer.best_state = trainer.before_end
            trainer.before_end = None
            self.save_best(trainer.model, trainer.best_state)
        self.resumed(trainer, undone)

    def resumed(self, trainer, undone_validation):
        """Drop the records of rounds after the checkpoint (they are done again), and of a validation that the
        longer run does not make (`undone_validation`), so metrics.jsonl is one history."""
        if self.main and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:  # a last line cut short by a kill is dropped
                kept = [line for line in f if line.endswith("\n")
                        and keep_on_resume(json.loads(line), trainer.round, undone_validation)]
            write_text("".join(kept), self.metrics_path)
        self.log(f"resumed from {self.last_path} at round {trainer.round}")

    def start(self, t_start, trainer):
        self.t_start, self.earlier = t_start, trainer.wall_seconds

    def elapsed(self):
        """Wall seconds of the whole run: this process and every earlier one of a resumed run."""
        return self.earlier + time.perf_counter() - self.t_start

    def round_done(self, row, trainer):
        timed = self.rounds_timed[row["phase"]]
        timed[0], timed[1] = timed[0] + 1, timed[1] + row["seconds"]["round"]
        self.record("round", **row, elapsed=self.elapsed())
        self.log(format_row(row, self.cfg.rounds, self.elapsed(), self.eta(trainer)))
        cfg = self.cfg
        if trainer.device.type == "cpu" and cfg.preset == "paper" and self.rounds_timed["train"][0] == PROJECTION_ROUNDS:
            self.log(f"projected time on this CPU for the rest of the run: {self.eta(trainer)} "
                     f"(--preset quick is a CPU-sized run: README 'Quick start')")

    def eta(self, trainer):
        """Time left: remaining rounds at the mean round time of their phase, validations at the mean
        validation time, the meta-test at the validation time per task. Parts not timed yet are named."""
        cfg = self.cfg
        left = {"warm-up": max(0, cfg.warmup - trainer.round), "train": cfg.rounds - max(trainer.round, cfg.warmup)}
        untimed, secs = [], 0.0
        for phase, (n, seconds) in self.rounds_timed.items():
            if left[phase] and not n:
                untimed.append(f"{phase} rounds")
            secs += left[phase] * seconds / max(1, n)
        left_val = sum(is_validation_round(cfg, r) for r in range(trainer.round + 1, cfg.rounds + 1))
        if self.val_seconds:
            per_val = sum(self.val_seconds) / len(self.val_seconds)
            secs += left_val * per_val + per_val * cfg.test_tasks / cfg.val_tasks
        else:
            untimed.append("validations and meta-test")
        text = format_hms(secs)
        return f">= {text} ({', '.join(untimed)} not timed yet)" if untimed else text

    def validated(self, round_, acc, ci, best, seconds):
        self.val_seconds.append(seconds)
        self.record("val", round=round_, acc=acc, ci95=ci, best=best, seconds=seconds)
        self.log(f"round {round_:4d} val {acc:.2f} ± {ci:.2f} (best {best:.2f})  {seconds:.0f}s")

    def save_checkpoint(self, trainer):
        trainer.wall_seconds = self.elapsed()
        if self.main:
            save_torch(trainer.state_dict(), self.last_path)

    def save_best(self, model, state):
        """best.pt: theta, the keyword arguments that rebuild its network (architecture, image size, channels,
        normalisation) and the run's settings; or no best.pt when there is no best theta (yet)."""
        if not self.main:
            return
        if state is None:
            if os.path.exists(self.best_path):
                os.remove(self.best_path)
            return
        save_torch({"model": state, "arch": model.arch, "config": dataclasses.asdict(self.cfg)}, self.best_path)

    def tested(self, trainer, test, seconds, seed):
        acc, ci = test["test_acc"]
        per_domain = {d: {"acc": a, "ci95": c} for d, (a, c) in test.get("per_domain", {}).items()}
        self.record("test", round=trainer.round, acc=acc, ci95=ci, tasks=self.cfg.test_tasks, seconds=seconds,
                    **({"per_domain": per_domain} if per_domain else {}))
        self.log(f"meta-test ({self.cfg.test_tasks} tasks{' per domain' if per_domain else ''}, seed "
                 f"{seed}): {acc:.2f} ± {ci:.2f}  {seconds:.0f}s")
        for d, v in per_domain.items():
            self.log(f"  {d}: {v['acc']:.2f} ± {v['ci95']:.2f}")

    def save_recovered_grid(self, recovered, real):
        """recovered.png: per class, GRID_PER_CLASS recovered images, then as many real ones (when the class is
        one of the data set's)."""
        if not self.main:
            return
        x, y, classes = recovered
        x, y = x.cpu(), y.cpu()
        rows = []
        for local, cls in enumerate(classes):
            real_imgs = real.images[real.labels == cls][:GRID_PER_CLASS].float() / 255
            rows.append(list(x[y == local][:GRID_PER_CLASS]) + list(real_imgs))
        save_grid(os.path.join(self.cfg.out, "recovered.png"), rows)

    def finish(self, trainer, test):
        cfg, (acc, ci) = self.cfg, test["test_acc"]
        results = dict(dataset=cfg.dataset, way=cfg.way, shots=cfg.shots, method=cfg.method, ablations=ablations(cfg),
                       teacher_arch=cfg.teacher_arch, preset=cfg.preset, seed=cfg.seed, device=str(trainer.device),
                       workers=workers.world_size(), torch_version=torch.__version__,
                       torch_threads=torch.get_num_threads(), rounds=trainer.round if cfg.method in TRAINED else 0,
                       test_acc=acc, test_ci95=ci, best_val_acc=trainer.best_val,
                       wall_seconds=self.elapsed(), resumes=trainer.resumes)
        if "per_domain" in test:
            results["per_domain"] = {d: {"test_acc": a, "test_ci95": c} for d, (a, c) in test["per_domain"].items()}
        if self.main:
            write_json(results, os.path.join(cfg.out, "results.json"))
        self.log(f"results: {os.path.join(cfg.out, 'results.json')}  wall {format_hms(results['wall_seconds'])}")
        return results


def keep_on_resume(record, round_, undone_validation=False):
    """A metrics.jsonl record still true after resuming at `round_`: the zoo's, and rounds and validations up to
    it (but the validation at `round_` itself when the longer run does not make it)."""
    if record["event"] == "val" and record["round"] == round_ and undone_validation:
        return False
    return record["event"] == "zoo" or (record["event"] in ("round", "val") and record["round"] <= round_)


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def format_hms(seconds):
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_row(row, rounds, elapsed, eta):
    """One round's line: every column named."""
    parts = [f"round {row['round']:4d}/{rounds} {row['phase']:7s}"]
    for key, fmt in [("rec_acc", "teacher acc on recovered {:.3f}"), ("kd_loss", "kd {:.4f}"),
                     ("replay_batches", "replay {} batches"), ("replay_loss", "loss {:.4f}"),
                     ("replay_acc", "acc {:.3f}"), ("bank", "bank {} images")]:
        if key in row:
            parts.append(fmt.format(row[key]))
    parts.append(f"{row['seconds']['round']:.1f}s")
    parts.append(f"elapsed {format_hms(elapsed)} eta {eta}")
    return " | ".join(parts)


def save_torch(obj, path):
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_text(text, path):
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_json(obj, path):
    write_text(json.dumps(obj, indent=2), path)


def save_grid(path, rows):
    """recovered.png: one row per class, each row a list of [C, H, W] float images in [0, 1]."""
    from PIL import Image
    n = max(len(r) for r in rows)
    C, H, W = rows[0][0].shape
    pad = GRID_PAD
    canvas = torch.ones(3, len(rows) * (H + pad) + pad, n * (W + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (H + pad), pad + j * (W + pad)
            canvas[:, top:top + H, left:left + W] = img.expand(3, H, W)
    arr = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    atomic_write(Path(path), lambda f: Image.fromarray(arr).save(f, format="PNG"))
