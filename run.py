"""What a FREE run needs around the method: the entry point, the run's folder (files, progress lines,
checkpoints), its teacher zoo, workers and Ctrl-C. free.py holds the method and calls these, and
settings.py the command line and the checks; nothing here computes an equation of the paper.

A run's folder (--out): config.json (the resolved Config), log.txt (the lines printed), metrics.jsonl
(one JSON object per event: zoo, round, val, test; what experiments/ reads), last.pt (the resumable
state), best.pt (the best theta on meta-validation, with what `free.py adapt` needs to rebuild it),
results.json, recovered.png. Rank 0 alone writes; every file that a later run reads back is written
atomically (data.atomic_write).

Errors a user can cause end as one `error: ...` line and exit status 1 (argparse's own: 2); Ctrl-C ends
as one line and status 130, after what can be kept is saved.
"""
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

import workers
from data import UserError, atomic_write, load_dataset
from external import export_zoo, load_zoo_dir
from settings import TRAINED, USES_ZOO, ablations, check_settings, is_validation_round, pick_device
from zoo import build_zoo, load_checkpoint, paper_settings, teacher_path, zoo_dir

PROJECTION_ROUNDS = 3  # after this many training rounds of the paper preset on the CPU, print the projected time
GRID_PER_CLASS = 8  # recovered.png: images per class shown (recovered, then real)
GRID_PAD = 2  # recovered.png: pixels between images


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
