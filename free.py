"""FREE end to end: `python free.py --dataset cifarfs --shots 1`.

Paper: Wei et al., "FREE: Faster and Better Data-Free Meta-Learning", CVPR 2024, §3 (method) and §4
(setup); the counts are the authors' code defaults.
The loop, as in the paper's algorithm:
    warm-up: train only the meta-generator (no L_adv, nothing stored);
    each round: sample B teachers -> FIVE: recover each task in k steps, meta-update theta_G
                -> memory bank <- all recovered tasks -> BELL: KD with Eq. (3) alignment
                -> MAML replay from the bank;
    every E rounds: meta-validation (val split), keep the best theta;
    at the end: one meta-test on a fixed set of test tasks.
Baselines: `random` (random-init Conv4), `average` (mean of same-architecture teachers' weights, new
head), `maml` (data-based MAML on the real meta-train images: the upper bound, the only one that sees
data). Ablations: --no-meta-generator, --no-align, --hard-labels.

Differences from the authors' code (one-line comments mark them where they happen):
model selection on the meta-validation split, not the test split; every recovered task enters the
memory bank; the generator's Adam persists; paths and counts come from one Config.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields

import torch

import maml
import recover
from data import DATASETS, UserError, load_dataset, sample_tasks
from models import ARCHS, Conv4, Generator
from zoo import QUICK_SETTINGS, build_zoo, load_checkpoint, mirror_invariant, paper_settings

METHODS = ("free", "random", "average", "maml")
TRAINED = ("free", "maml")  # methods that meta-train for `rounds`; random and average are evaluated as they start
USES_ZOO = ("free", "average")  # methods that read the teacher zoo
BANK_FILTERS = ("all", "agree")  # --bank-filter choices
TEST_TASK_SEED = 2024  # the meta-test task seed: fixed, so every method and seed sees the same tasks
VAL_TASK_SEED = 1234  # the meta-validation task seed (same val tasks at every evaluation)
PROJECTION_ROUNDS = 3  # after this many post-warm-up rounds on the CPU, print the projected time
GRID_PER_CLASS = 8  # recovered.png: images per class shown (recovered, then real)
GRID_PAD = 2  # recovered.png: pixels between images
EVAL_CHUNK = 50  # meta-test tasks evaluated at once (memory only; no effect on the results)


@dataclass
class Config:
    # ---- what to run
    dataset: str = "cifarfs"  # data set (paper §4; see README "Data")
    way: int = 5  # N, classes per task (paper: 5)
    shots: int = 1  # K, support images per class (paper: 1 or 5)
    query: int = 15  # Q, query images per class (paper: 15)
    method: str = "free"  # free / random / average / maml
    no_meta_generator: bool = False  # ablation: recover from a fresh generator (BiDf-MKD style)
    recover_steps: int = recover.SCRATCH_STEPS  # steps from scratch with --no-meta-generator (BiDf-MKD: 200)
    no_align: bool = False  # ablation: independent KD steps instead of Eq. (3)'s sequential ones
    hard_labels: bool = False  # ablation: CE on recovered labels instead of KD (supplement Table 2)
    theta_tilde_opt: str = "adam"  # optimizer of theta_tilde in Eq. (3): adam (supplement, authors) / sgd (Lemma 1)
    no_kd_augment: bool = False  # KD on the recovered images as they are, not through A(.) (authors augment them)
    no_kd: bool = False  # ablation: no KD + Eq. (3) step; the meta-learner learns from cross-task replay alone
    bank_filter: str = "all"  # memory bank keeps: all recovered images / those the teacher labels as Y ("agree", ours)
    first_order: bool = False  # FOMAML replay instead of second-order MAML (authors' code: --approx)
    teacher_arch: str = "conv4"  # zoo architecture: conv4 / resnet10 / resnet18 / mix
    preset: str = "paper"  # paper / quick / smoke: counts only, never the algorithm
    # ---- where
    data_root: str = "data"
    mirror: str = None  # base URL replacing every download's
    out: str = None  # output folder (default runs/<dataset>-<way>w<shots>s-<method>)
    cache: str = "cache"  # teacher-zoo cache folder
    seed: int = 0
    device: str = "auto"  # auto / cpu / cuda
    vmap: str = "auto"  # map a meta-batch's / meta-test chunk's tasks with torch.func.vmap: auto (on CUDA) / on / off
    resume: bool = False
    # ---- counts (the preset sets these; a flag overrides)
    n_teachers: int = 100  # size of the teacher zoo (paper §4: 100)
    zoo_epochs: int = None  # teacher training epochs (authors' code: 60, CUB 100; None = the paper's for the data set)
    zoo_batch: int = 128  # teacher training batch size (authors' code: 128)
    rounds: int = 1000  # meta-training rounds (authors' default)
    warmup: int = 20  # warm-up rounds, generator only (authors' code: 20)
    B: int = 4  # B, teachers per round (authors' code: 4)
    k: int = recover.K  # k, generator adaptation steps: evaluations of Eq. (1) per teacher (paper §3.2: 5)
    n_per_class: int = recover.IMAGES_PER_CLASS  # rows of Z per class (authors' code: 20)
    nf: int = 64  # nf, generator width (supplement Table 1: 64)
    meta_batch: int = 10  # tasks per replay meta-batch (authors' code: 10)
    replay_patience: int = 10  # stop replay when train acc has not improved for this many meta-batches (authors)
    max_replay: int = 50  # at most this many replay meta-batches a round (ours: bounds a round's time; 0: none)
    eval_every: int = 20  # E, rounds between meta-validations (authors: 20)
    val_tasks: int = 600  # meta-validation tasks
    test_tasks: int = 600  # meta-test tasks (per domain for mix)
    save_every: int = 20  # rounds between last.pt checkpoints (also at each validation and at the end)
    # ---- rates and constants
    gen_lr: float = recover.GEN_LR  # Adam lr of theta_G' and Z, and of the meta-generator (supplement: 1e-3)
    lambda_adv: float = recover.LAMBDA_ADV  # lambda_adv of Eq. (1) (authors' code: 1)
    alpha: float = maml.ALPHA  # alpha, inner lr of Eq. (3) (supplement: 0.001)
    tau: float = maml.TAU  # tau, KD temperature (authors' code: 1, plain softmax)
    outer_lr: float = 1e-3  # outer Adam lr of the meta-learner (authors' code: 1e-3)
    inner_lr: float = maml.INNER_LR  # MAML inner SGD lr, train and test (authors' code: 0.01)
    train_inner_steps: int = maml.TRAIN_INNER_STEPS  # MAML inner steps in replay (authors' code: 5)
    test_inner_steps: int = maml.TEST_INNER_STEPS  # adaptation steps at meta-test (authors' code: 10)


PRESETS = {
    "paper": {},  # the Config defaults are the paper's
    # a CPU run on Omniglot (README "Presets": how the counts were chosen, and its measured time); rounds: the
    # fewest at which FREE's meta-validation beat average's by 3 points on every seed (`bench.py rounds`)
    "quick": dict(n_teachers=40, zoo_epochs=QUICK_SETTINGS.epochs, zoo_batch=QUICK_SETTINGS.batch_size, rounds=140,
                  warmup=10, nf=16, replay_patience=2, max_replay=4, eval_every=20, val_tasks=200, save_every=10,
                  recover_steps=20),
    # seconds, for CI and tests
    "smoke": dict(n_teachers=3, zoo_epochs=2, zoo_batch=32, rounds=3, warmup=1, B=2, nf=8, meta_batch=2,
                  max_replay=1, eval_every=2, val_tasks=6, test_tasks=10, save_every=1,
                  recover_steps=3, train_inner_steps=1, test_inner_steps=2),
}
# settings whose change makes a checkpoint belong to another run (everything but where/how to run)
NOT_IDENTITY = ("out", "resume", "device", "vmap", "data_root", "mirror", "cache", "rounds")
# settings added after runs were saved, with the value that reproduces a run whose config.json lacks them
ADDED_SETTINGS = {"no_kd": False}


# ------------------------------------------------------------------------ command line


def parse_args(argv=None):
    """Build argparse from Config; the preset fills counts the user did not set."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    choices = dict(dataset=DATASETS, method=METHODS, teacher_arch=ARCHS + ("mix",),
                   preset=tuple(PRESETS), device=("auto", "cpu", "cuda"), shots=(1, 5),
                   theta_tilde_opt=maml.THETA_TILDE_OPTIMIZERS, bank_filter=BANK_FILTERS, vmap=("auto", "on", "off"))
    comments = field_comments()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        by_preset = "".join(f"; {name}: {over[f.name]}" for name, over in PRESETS.items() if f.name in over)
        help_ = f"{comments.get(f.name, '')} (default: {f.default}{by_preset})"
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=help_)
            continue
        p.add_argument(flag, type=f.type, default=None, choices=choices.get(f.name), help=help_)
    args = p.parse_args(argv)
    cfg = Config(**PRESETS[args.preset or "paper"])
    for f in fields(Config):
        v = getattr(args, f.name)
        if v is not None and v is not False:
            setattr(cfg, f.name, v)
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.dataset}-{cfg.way}w{cfg.shots}s-{run_name(cfg)}")
    return cfg


def field_comments():
    """The `# comment` after each Config field, used as the flag's help text."""
    import inspect
    out = {}
    for line in inspect.getsource(Config).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            out[line.split(":")[0]] = line.split("#", 1)[1].strip()
    return out


def run_name(cfg):
    return "-".join([cfg.method] + ablations(cfg))


def ablations(cfg):
    names = ["no_meta_generator", "no_align", "hard_labels", "first_order", "no_kd_augment", "no_kd"]
    out = [n.replace("_", "-") for n in names if getattr(cfg, n)]
    defaults = Config()
    return out + [f"{n.replace('_', '-')}-{getattr(cfg, n)}" for n in ("theta_tilde_opt", "bank_filter")
                  if getattr(cfg, n) != getattr(defaults, n)]


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device auto or cpu")
    return torch.device(name)


def set_seed(seed):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ------------------------------------------------------------------------ files


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class Log:
    """One line per event to stdout and to out/log.txt."""

    def __init__(self, path):
        self.path = path

    def __call__(self, msg):
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


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
    Image.fromarray(arr).save(path)


# ------------------------------------------------------------------------ evaluation


def use_vmap(cfg, device):
    """Map tasks with torch.func.vmap: --vmap on / off, or auto = on CUDA only (on the CPU the per-task
    loop is faster, README "Speed notes"). Both paths compute the same losses (test_run checks a whole run)."""
    return cfg.vmap == "on" or (cfg.vmap == "auto" and device.type == "cuda")


def evaluate(cfg, model, params, split, n_tasks, seed, device, classes=None, chunk=EVAL_CHUNK):
    """Mean accuracy and 95% CI over n_tasks tasks of `split` sampled with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    vectorize = use_vmap(cfg, device)
    accs = []
    for start in range(0, n_tasks, chunk):
        t = min(chunk, n_tasks - start)
        x_s, y_s, x_q, y_q = (v.to(device) for v in sample_tasks(split, t, cfg.way, cfg.shots, cfg.query, g, classes))
        accs.append(maml.meta_test(model, params, x_s, y_s, x_q, y_q, cfg.test_inner_steps, cfg.inner_lr,
                                   vectorize).cpu())
    return maml.mean_ci95(torch.cat(accs))


def meta_test(cfg, ds, model, params, device):
    """The single meta-test: test_tasks tasks from TEST_TASK_SEED, or that many per domain when the
    test classes span several domains (`mix`: 3 x 600); then the mean over domains is reported."""
    split = ds.splits["test"]
    domains = sorted({ds.domain_of_class[c] for c in split.classes})
    if len(domains) == 1:
        return {"test_acc": evaluate(cfg, model, params, split, cfg.test_tasks, TEST_TASK_SEED, device)}
    out = {}
    for d in domains:
        classes = [c for c in split.classes if ds.domain_of_class[c] == d]
        out[d] = evaluate(cfg, model, params, split, cfg.test_tasks, TEST_TASK_SEED, device, classes)
    mean = sum(v[0] for v in out.values()) / len(out)
    ci = math.sqrt(sum(v[1] ** 2 for v in out.values())) / len(out)  # CI of a mean of independent means
    return {"test_acc": (mean, ci), "per_domain": out}


# ------------------------------------------------------------------------ methods


def load_teachers(cfg, ds, device, log):
    """The teacher zoo of this configuration: trained once, then read from the cache."""
    settings = dataclasses.replace(paper_settings(cfg.dataset), batch_size=cfg.zoo_batch)
    if cfg.zoo_epochs is not None:
        settings.epochs = cfg.zoo_epochs
    teachers = build_zoo(ds, cfg.teacher_arch, cfg.n_teachers, cfg.way, cfg.seed, cfg.preset, settings,
                         cfg.cache, device, log=log)
    for t in teachers:
        t.model.requires_grad_(False)
    return teachers


def new_meta_learner(ds, cfg, device):
    return Conv4(cfg.way, ds.channels, ds.image_size, ds.mean, ds.std, track_running_stats=False).to(device)


def average_teachers(model, teachers):
    """`average` baseline: theta = mean of the conv4 teachers' weights; a freshly initialised head."""
    same = [t for t in teachers if t.arch == "conv4"]
    if not same:
        raise UserError("--method average needs conv4 teachers; this zoo has none (use --teacher-arch conv4 or mix)")
    state = model.state_dict()
    for name in state:
        if not name.startswith("head.") and not name.startswith("normalize."):
            state[name] = torch.stack([dict(t.model.named_parameters())[name].detach() for t in same]).mean(0)
    model.load_state_dict(state)


class Trainer:
    """The FREE meta-training loop and its resumable state."""

    def __init__(self, cfg, ds, teachers, device, log):
        self.cfg, self.ds, self.teachers, self.device, self.log = cfg, ds, teachers, device, log
        self.model = new_meta_learner(ds, cfg, device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.outer_lr)
        G = Generator(ds.image_size, ds.channels, nf=cfg.nf).to(device)
        self.meta_gen = recover.MetaGenerator(G, cfg.gen_lr, recover.GEN_BETAS)
        self.bank = recover.MemoryBank(device=device)
        self.rng = torch.Generator().manual_seed(cfg.seed)  # teacher choice and replay tasks
        self.round = 0
        self.best_val, self.best_state = -1.0, None
        self.stats = dict(recovery_seconds_total=0.0, recovered_tasks=0, warmup_seconds=0.0, train_seconds=0.0,
                          train_recovery_seconds=0.0, kd_seconds=0.0, replay_seconds=0.0,
                          validation_seconds=0.0, validations=0, wall_seconds=0.0, resumes=0)
        self.last_recovered = []

    # ---- state
    def state_dict(self):
        return dict(round=self.round, model=self.model.state_dict(), opt=self.opt.state_dict(),
                    meta_gen=self.meta_gen.state_dict(), bank=self.bank.state_dict(),
                    rng=self.rng.get_state(), torch_rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    best_val=self.best_val, best_state=self.best_state, stats=dict(self.stats),
                    config=dataclasses.asdict(self.cfg))

    def load_state_dict(self, s):
        self.round = s["round"]
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.meta_gen.load_state_dict(s["meta_gen"])
        self.bank.load_state_dict(s["bank"])
        self.rng.set_state(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        if s["cuda_rng"]:
            torch.cuda.set_rng_state_all(s["cuda_rng"])
        self.best_val, self.best_state = s["best_val"], s["best_state"]
        saved = s["stats"]
        self.stats = dict(self.stats, **saved)  # a stat newer than the checkpoint starts from zero
        if "wall_seconds" not in saved:  # a checkpoint older than the wall-time record: count its loop time
            self.stats["wall_seconds"] = saved["warmup_seconds"] + saved["train_seconds"]
        self.stats["resumes"] += 1

    def rounds_done(self):
        """(warm-up rounds done, training rounds done)."""
        return min(self.round, self.cfg.warmup), max(0, self.round - self.cfg.warmup)

    def eta(self):
        """Seconds left: remaining warm-up and training rounds at their mean times so far."""
        cfg, st = self.cfg, self.stats
        warm_done, train_done = self.rounds_done()
        warm_s = st["warmup_seconds"] / max(1, warm_done)
        train_s = st["train_seconds"] / train_done if train_done else warm_s
        return (cfg.warmup - warm_done) * warm_s + (cfg.rounds - cfg.warmup - train_done) * train_s

    # ---- one round
    def recover(self, teachers, warm):
        """FIVE: recover one task per teacher (k steps from theta_G, or from scratch), then
        meta-update theta_G. Returns the recovered tasks."""
        cfg = self.cfg
        student = None if warm else (self.model, maml.detached_params(self.model))  # no L_adv in warm-up
        flip = mirror_invariant(self.ds)
        tasks = []
        for t in teachers:
            if cfg.no_meta_generator:
                r = recover.recover_from_scratch(t.model, cfg.way, cfg.recover_steps, self.ds.image_size,
                                                 self.ds.channels, n_per_class=cfg.n_per_class, lr=cfg.gen_lr,
                                                 student=student, lambda_adv=cfg.lambda_adv, flip=flip, nf=cfg.nf)
            else:
                r = recover.recover_task(self.meta_gen.G, t.model, cfg.way, cfg.k, cfg.n_per_class, cfg.gen_lr,
                                         student=student, lambda_adv=cfg.lambda_adv, flip=flip)
            tasks.append(r)
        if not cfg.no_meta_generator:
            self.meta_gen.meta_update([r.meta_grad for r in tasks])
        return tasks

    def kd_task(self, r, teacher):
        """A recovered task as KD sees it: (A(x), Y, M_i(A(x))), teacher and student on the same augmented
        images, as the authors' code does; (x, Y, M_i(x)) with --no-kd-augment."""
        if self.cfg.no_kd_augment:
            return r.x, r.y, r.teacher_logits
        x = recover.augment(r.x, flip=mirror_invariant(self.ds))
        with torch.no_grad():
            return x, r.y, teacher.model(x)

    def replay(self):
        """Cross-task replay: MAML meta-batches from the memory bank (or, for `maml`, from the real
        meta-train split) until train accuracy stalls for `replay_patience` meta-batches."""
        cfg, best, since, losses, accs = self.cfg, -1.0, 0, [], []
        vectorize = use_vmap(cfg, self.device)
        if cfg.max_replay == 0 or (cfg.method != "maml" and not self.bank.can_sample(cfg.way, cfg.shots, cfg.query)):
            return {"replay_batches": 0}  # replay switched off (--max-replay 0), or too few images per class yet
        for _ in range(cfg.max_replay):
            if cfg.method == "maml":
                batch = sample_tasks(self.ds.splits["train"], cfg.meta_batch, cfg.way, cfg.shots, cfg.query, self.rng)
            else:
                batch = self.bank.sample_tasks(cfg.meta_batch, cfg.way, cfg.shots, cfg.query, self.rng)
            x_s, y_s, x_q, y_q = (v.to(self.device) for v in batch)
            loss, acc = maml.maml_meta_batch_loss(self.model, dict(self.model.named_parameters()), x_s, y_s, x_q,
                                                  y_q, cfg.train_inner_steps, cfg.inner_lr, cfg.first_order,
                                                  vectorize)
            # the one host sync of a meta-batch: the stopping rule needs the accuracy, the NaN guard the loss
            acc_now, finite = torch.stack([acc.detach(), torch.isfinite(loss.detach()).float()]).tolist()
            if not finite:
                check_finite(loss, "MAML replay loss", self.round)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses.append(loss.detach())
            accs.append(acc_now)
            best, since = (acc_now, 0) if acc_now > best else (best, since + 1)
            if since >= cfg.replay_patience:
                break
        return {"replay_loss": torch.stack(losses).mean().item(), "replay_acc": sum(accs) / len(accs),
                "replay_batches": len(losses)}

    def step(self):
        """One round of the paper's algorithm. Returns the values logged for it."""
        cfg = self.cfg
        warm = self.round < cfg.warmup
        row = {"round": self.round + 1, "phase": "warm-up" if warm else "train"}
        if cfg.method == "free":
            idx = torch.randperm(len(self.teachers), generator=self.rng)[:cfg.B].tolist()
            chosen = [self.teachers[i] for i in idx]
            t0 = time.perf_counter()
            tasks = self.recover(chosen, warm)
            secs = time.perf_counter() - t0
            self.stats["recovery_seconds_total"] += secs
            self.stats["recovered_tasks"] += len(tasks)
            row.update(rec_s=secs, rec_acc=sum(r.teacher_acc for r in tasks) / len(tasks))
            self.last_recovered = [(r.x, r.y, t.classes) for r, t in zip(tasks, chosen)]  # to the CPU once, at the end
            if warm:
                return row
            self.stats["train_recovery_seconds"] += secs
            t_kd = time.perf_counter()
            for r, t in zip(tasks, chosen):  # every recovered task; authors' code stores only the last
                keep = r.teacher_logits.argmax(1) == r.y if cfg.bank_filter == "agree" else slice(None)
                self.bank.add(r.x[keep], r.y[keep], t.classes)
            if not cfg.no_kd:  # ablation --no-kd: the meta-learner learns from replay alone
                kd_tasks = [self.kd_task(r, t) for r, t in zip(tasks, chosen)]
                g, kd = maml.align_meta_gradient(self.model, maml.detached_params(self.model), kd_tasks, cfg.alpha,
                                                 cfg.tau, cfg.hard_labels, align=not cfg.no_align,
                                                 optimizer=cfg.theta_tilde_opt)
                check_finite(kd, "KD loss (Eq. 3)", self.round)
                maml.apply_meta_gradient(self.model, self.opt, g)
                row.update(kd=kd.item())
            row.update(bank=len(self.bank))
            self.stats["kd_seconds"] += time.perf_counter() - t_kd
        elif warm:
            return row
        t_replay = time.perf_counter()
        row.update(self.replay())
        self.stats["replay_seconds"] += time.perf_counter() - t_replay
        return row


def peak_memory_mb(device):
    """Peak resident memory of this process (Linux, MB), or peak CUDA memory on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def check_finite(loss, what, round_):
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"round {round_ + 1}: the {what} is {loss.item()}; stopping. last.pt holds the "
                                 f"state before this round (resume with --resume after fixing the cause)")


def format_row(row, elapsed, eta):
    parts = [f"round {row['round']:4d} {row['phase']:7s}"]
    for key, fmt in [("rec_acc", "rec_acc {:.3f}"), ("rec_s", "rec {:.2f}s"), ("kd", "kd {:.4f}"),
                     ("replay_loss", "replay_loss {:.4f}"), ("replay_acc", "replay_acc {:.3f}"),
                     ("replay_batches", "x{}"), ("bank", "bank {}")]:
        if key in row:
            parts.append(fmt.format(row[key]))
    parts.append(f"elapsed {elapsed:.0f}s eta {eta:.0f}s")
    return " | ".join(parts)


# ------------------------------------------------------------------------ main


def check_resume(cfg, out):
    """Refuse to resume a run of another configuration."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(os.path.join(out, "last.pt")):
        raise UserError(f"--resume: no last.pt in {out}; start without --resume")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: cannot read {path} ({e}); it is written at a run's start: start a new run "
                        f"in another --out") from e
    mine = dataclasses.asdict(cfg)
    saved = {**ADDED_SETTINGS, **saved}
    diff = [k for k in mine if k not in NOT_IDENTITY and saved.get(k) != mine[k]]
    if diff:
        raise UserError(f"--resume: {out} belongs to a different configuration; differing settings: "
                         + ", ".join(f"{k} (saved {saved.get(k)!r}, now {mine[k]!r})" for k in diff)
                         + ". Use another --out or the saved settings.")


def check_out(cfg):
    """--out may be resumed only if it holds a run of this configuration, and a run is never overwritten."""
    if cfg.resume:
        check_resume(cfg, cfg.out)
    elif os.path.exists(os.path.join(cfg.out, "last.pt")):
        raise UserError(f"{cfg.out} already holds a run (last.pt); pass --resume to continue it or pick "
                        f"another --out")


def check_settings(cfg, ds):
    """Settings the data cannot satisfy, found before anything is written or trained."""
    needs_zoo = cfg.method in USES_ZOO
    for name, value in (("--n-teachers", cfg.n_teachers if needs_zoo else 1), ("--B", cfg.B), ("--rounds", cfg.rounds),
                        ("--val-tasks", cfg.val_tasks), ("--test-tasks", cfg.test_tasks), ("--way", cfg.way)):
        if value < 1:
            raise UserError(f"{name} {value}: expected at least 1")
    least_replay = 1 if cfg.method == "maml" else 0  # maml learns from replay alone
    if cfg.max_replay < least_replay:
        raise UserError(f"--max-replay {cfg.max_replay}: expected at least {least_replay} for --method {cfg.method}")
    splits = ["val", "test"] + (["train"] if needs_zoo or cfg.method == "maml" else [])
    for s in splits:
        split = ds.splits[s]
        if len(split.classes) < cfg.way:
            raise UserError(f"--way {cfg.way}: the {s} split of {ds.name} has {len(split.classes)} classes; "
                            f"lower --way")
        if s == "train" and cfg.method != "maml":
            continue  # teachers need `way` classes; tasks are sampled from the real train split by maml only
        fewest = torch.bincount(split.labels)[split.classes].min().item()
        if fewest < cfg.shots + cfg.query:
            raise UserError(f"--shots {cfg.shots} + --query {cfg.query}: a class of the {s} split of {ds.name} "
                            f"has {fewest} images; lower --shots or --query")


def open_run(cfg):
    """Create the --out folder (after every check has passed), write config.json, start log.txt."""
    os.makedirs(cfg.out, exist_ok=True)
    write_json_atomic(dataclasses.asdict(cfg), os.path.join(cfg.out, "config.json"))
    return Log(os.path.join(cfg.out, "log.txt"))


def save_best(cfg, model, state, path):
    save_atomic({"model": state, "arch": model.arch, "config": dataclasses.asdict(cfg)}, path)


def is_validation_round(cfg, round_):
    """Meta-validation after every E-th round and after the last, once the warm-up is over."""
    return round_ > cfg.warmup and (round_ % cfg.eval_every == 0 or round_ == cfg.rounds)


def validate(cfg, trainer, best_path):
    """Meta-validation; the best model so far goes to best.pt."""
    t0 = time.perf_counter()
    acc, ci = evaluate(cfg, trainer.model, maml.detached_params(trainer.model), trainer.ds.splits["val"],
                       cfg.val_tasks, VAL_TASK_SEED, trainer.device)
    # model selection on meta-validation; authors' code selects on the test split
    if acc > trainer.best_val:
        trainer.best_val = acc
        trainer.best_state = copy.deepcopy(trainer.model.state_dict())
        save_best(cfg, trainer.model, trainer.best_state, best_path)
    trainer.stats["validation_seconds"] += time.perf_counter() - t0
    trainer.stats["validations"] += 1
    trainer.log(f"round {trainer.round:4d} val {acc:.2f} ± {ci:.2f} (best {trainer.best_val:.2f})")


def train(cfg, trainer, t_start, last_path, best_path):
    """The rounds, with validation and checkpoints. Returns False when Ctrl-C stopped it (last.pt saved)."""
    log, stop = trainer.log, {"flag": False}

    def on_sigint(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        print("\ninterrupt: finishing this round, saving last.pt (Ctrl-C again to abort now)", flush=True)

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        t_loop = time.perf_counter()
        while trainer.round < cfg.rounds:
            t_round = time.perf_counter()
            row = trainer.step()
            trainer.stats["warmup_seconds" if row["phase"] == "warm-up" else "train_seconds"] += \
                time.perf_counter() - t_round
            trainer.round += 1
            eta = trainer.eta()
            log(format_row(row, time.perf_counter() - t_loop, eta))
            if (trainer.device.type == "cpu" and cfg.preset == "paper"
                    and trainer.round == min(cfg.rounds, cfg.warmup + PROJECTION_ROUNDS)):
                log(f"projected time on this CPU for the remaining {cfg.rounds - trainer.round} rounds: "
                    f"{eta / 3600:.1f} h (--preset quick is a shorter run: README 'Presets')")
            validated = is_validation_round(cfg, trainer.round)
            if validated:
                validate(cfg, trainer, best_path)
            if validated or trainer.round % cfg.save_every == 0 or stop["flag"]:
                trainer.stats["wall_seconds"] = time.perf_counter() - t_start
                save_atomic(trainer.state_dict(), last_path)
            if stop["flag"]:
                log(f"stopped at round {trainer.round}; continue with the same command and --resume")
                return False
    finally:
        signal.signal(signal.SIGINT, old_handler)
    return True


def save_recovered_grid(path, recovered, real):
    """recovered.png: per class, GRID_PER_CLASS recovered images, then as many real ones."""
    x, y, classes = recovered
    x, y = x.cpu(), y.cpu()
    rows = []
    for local, cls in enumerate(classes):
        real_imgs = real.images[real.labels == cls][:GRID_PER_CLASS].float() / 255
        rows.append(list(x[y == local][:GRID_PER_CLASS]) + list(real_imgs))
    save_grid(path, rows)


def collect_results(cfg, trainer, test, wall_seconds):
    st, (warm_done, train_done) = trainer.stats, trainer.rounds_done()
    acc, ci = test["test_acc"]
    results = dict(dataset=cfg.dataset, way=cfg.way, shots=cfg.shots, method=cfg.method, ablations=ablations(cfg),
                   teacher_arch=cfg.teacher_arch, preset=cfg.preset, seed=cfg.seed, device=str(trainer.device),
                   rounds=trainer.round, torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                   test_acc=acc, test_ci95=ci,
                   best_val_acc=trainer.best_val if trainer.best_val >= 0 else None,
                   recovery_seconds_total=st["recovery_seconds_total"],
                   recovery_seconds_per_task=st["recovery_seconds_total"] / max(1, st["recovered_tasks"]),
                   wall_seconds=wall_seconds, resumes=st["resumes"], peak_memory_mb=peak_memory_mb(trainer.device),
                   seconds_per_warmup_round=st["warmup_seconds"] / max(1, warm_done),
                   seconds_per_round=st["train_seconds"] / max(1, train_done),
                   # where a training round's time goes: recovery (FIVE), memory bank + KD + Eq. (3), MAML replay
                   seconds_per_round_recovery=st["train_recovery_seconds"] / max(1, train_done),
                   seconds_per_round_kd=st["kd_seconds"] / max(1, train_done),
                   seconds_per_round_replay=st["replay_seconds"] / max(1, train_done),
                   seconds_per_validation=st["validation_seconds"] / max(1, st["validations"]),
                   test_seconds=test["seconds"])
    if "per_domain" in test:
        results["per_domain"] = {d: {"test_acc": a, "test_ci95": c} for d, (a, c) in test["per_domain"].items()}
    return results


def main(argv=None):
    cfg = parse_args(argv)
    device = pick_device(cfg.device)
    check_out(cfg)
    t_start = time.perf_counter()
    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.mirror, seed=cfg.seed)
    check_settings(cfg, ds)  # a failed start writes nothing: the same command runs once the cause is fixed
    log = open_run(cfg)
    log(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    log("config: " + json.dumps(dataclasses.asdict(cfg)))
    log(f"data: {ds.name} {ds.image_size}x{ds.image_size}x{ds.channels}, classes train/val/test "
        f"{len(ds.splits['train'].classes)}/{len(ds.splits['val'].classes)}/{len(ds.splits['test'].classes)}")
    teachers = load_teachers(cfg, ds, device, log) if cfg.method in USES_ZOO else []
    set_seed(cfg.seed)  # the zoo may be cached or trained: start the run's randomness from here

    trainer = Trainer(cfg, ds, teachers, device, log)
    last_path, best_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "best.pt")
    if cfg.resume:
        trainer.load_state_dict(load_checkpoint(last_path, UserError, "--resume:", "it is written atomically, so it "
                                                "was changed outside free.py: start a new run in another --out"))
        log(f"resumed from {last_path} at round {trainer.round}")
        t_start -= trainer.stats["wall_seconds"]  # wall time counts every process of the run
    if cfg.method == "average":
        average_teachers(trainer.model, teachers)
    if cfg.method not in TRAINED:  # untrained baselines: one meta-validation, comparable with FREE's
        validate(cfg, trainer, best_path)
    if cfg.method in TRAINED and not train(cfg, trainer, t_start, last_path, best_path):
        return None  # stopped by Ctrl-C

    # ---- the single meta-test
    model = trainer.model
    if trainer.best_state is not None:
        model.load_state_dict(trainer.best_state)
    elif not os.path.exists(best_path):
        save_best(cfg, model, model.state_dict(), best_path)
    t_test = time.perf_counter()
    test = meta_test(cfg, ds, model, maml.detached_params(model), device)
    test["seconds"] = time.perf_counter() - t_test
    acc, ci = test["test_acc"]
    log(f"meta-test ({cfg.test_tasks} tasks{' per domain' if 'per_domain' in test else ''}, seed {TEST_TASK_SEED}): "
        f"{acc:.2f} ± {ci:.2f}")
    for d, (a, c) in test.get("per_domain", {}).items():
        log(f"  {d}: {a:.2f} ± {c:.2f}")
    if trainer.last_recovered:
        save_recovered_grid(os.path.join(cfg.out, "recovered.png"), trainer.last_recovered[-1], ds.splits["train"])

    results = collect_results(cfg, trainer, test, time.perf_counter() - t_start)
    write_json_atomic(results, os.path.join(cfg.out, "results.json"))
    log(f"results: {os.path.join(cfg.out, 'results.json')}  wall {results['wall_seconds']:.0f}s")
    return results


if __name__ == "__main__":
    try:
        main()
    except (UserError, FloatingPointError) as e:  # errors a user can cause or fix: one line, exit status 1
        sys.exit(f"error: {e}")
