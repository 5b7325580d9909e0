"""FREE end to end: `python free.py --dataset cifarfs --shots 1`.

Paper: Wei et al., "FREE: Faster and Better Data-Free Meta-Learning", CVPR 2024, §3 (method) and §4
(setup); the counts are the authors' code defaults. The file reads in the paper's order:
    Config       every setting, with its paper symbol and default;
    Trainer.step one round: sample B teachers -> FIVE: recover each task in k steps, meta-update theta_G
                 -> memory bank <- all recovered tasks -> BELL: KD with Eq. (3) alignment -> MAML replay;
                 the first `warmup` rounds train only the meta-generator (no L_adv, nothing stored);
    train        the rounds; every E rounds a meta-validation keeps the best theta;
    meta_test    once, at the end, on a fixed set of test tasks;
    main         the whole run; the plumbing (command line, checks, files, Ctrl-C) comes after it.
Baselines: `random` (random-init Conv4), `average` (mean of same-architecture teachers' weights, new
head), `maml` (data-based MAML on the real meta-train images: the upper bound, the only one that sees
data). Ablations: --no-meta-generator, --no-align, --hard-labels, --no-kd, --max-replay 0.
`--workers N` (or torchrun) spreads a round's independent tasks over N processes (workers.py).

Differences from the authors' code (one-line comments mark them where they happen):
model selection on the meta-validation split, not the test split; every recovered task enters the
memory bank; the generator's Adam persists; paths and counts come from one Config.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

import maml
import recover
import workers
from data import DATASETS, UserError, atomic_write, load_dataset, sample_tasks
from models import ARCHS, Conv4, Generator
from zoo import QUICK_SETTINGS, build_zoo, load_checkpoint, mirror_invariant, paper_settings, teacher_path, zoo_dir

METHODS = ("free", "random", "average", "maml")
TRAINED = ("free", "maml")  # methods that meta-train for `rounds`; random and average are evaluated as they start
USES_ZOO = ("free", "average")  # methods that read the teacher zoo
BANK_FILTERS = ("all", "agree")  # --bank-filter choices
TEST_TASK_SEED = 2024  # the meta-test task seed: fixed, so every method and seed sees the same tasks
VAL_TASK_SEED = 1234  # the meta-validation task seed (same val tasks at every evaluation)
PROJECTION_ROUNDS = 3  # after this many training rounds of the paper preset on the CPU, print the projected time
EVAL_CHUNK = 50  # meta-test tasks evaluated at once (memory only; no effect on the results)


@dataclass
class Config:
    # ---- what to run
    dataset: str = "cifarfs"  # data set (paper §4; README "Data")
    way: int = 5  # N, classes per task (paper: 5)
    shots: int = 1  # K, support images per class (paper: 1 or 5)
    query: int = 15  # Q, query images per class (paper: 15)
    method: str = "free"  # free / random / average / maml (README "Baselines and ablations")
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
    preset: str = "paper"  # paper / quick / smoke: counts only, never the algorithm (README "Presets")
    # ---- where and how
    data_root: str = "data"  # folder of the data sets, downloads go there (README "Data")
    mirror: str = None  # base URL replacing every download's (http:// or https://)
    out: str = None  # output folder (default runs/<dataset>-<way>w<shots>s-<method>)
    cache: str = "cache"  # teacher-zoo cache folder, shared by runs
    seed: int = 0  # seeds the whole run: teacher zoo, generator, meta-learner, task sampling
    device: str = "auto"  # auto (CUDA when present) / cpu / cuda
    workers: int = 1  # processes sharing each round's tasks (torch.distributed; one CPU core or one GPU each)
    vmap: str = "auto"  # map a meta-batch's / meta-test chunk's tasks with torch.func.vmap: auto (on CUDA) / on / off
    resume: bool = False  # continue the run in --out if it holds one (else start it); a finished run is reported
    # ---- counts (the preset sets these; a flag overrides)
    n_teachers: int = 100  # size of the teacher zoo (paper §4: 100)
    zoo_epochs: int = None  # teacher training epochs (authors' code: 60, CUB 100; None = the paper's for the data set)
    zoo_batch: int = 128  # teacher training batch size (authors' code: 128)
    rounds: int = 1000  # meta-training rounds, warm-up included (authors' default)
    warmup: int = 20  # warm-up rounds, generator only (authors' code: 20)
    B: int = 4  # B, teachers per round (authors' code: 4)
    k: int = recover.K  # k, evaluations of Eq. (1) per teacher, k - 1 Adam steps between them (paper §3.2: 5)
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
    # a CPU run on Omniglot; rounds: the fewest at which FREE's meta-validation beat average's by 3 points on
    # every seed (`python experiments/bench.py rounds`; how each count was chosen: experiments/RESULTS.md)
    "quick": dict(n_teachers=40, zoo_epochs=QUICK_SETTINGS.epochs, zoo_batch=QUICK_SETTINGS.batch_size, rounds=140,
                  warmup=10, nf=16, replay_patience=2, max_replay=4, eval_every=20, val_tasks=200, save_every=10,
                  recover_steps=20),
    # seconds, for CI and tests
    "smoke": dict(n_teachers=3, zoo_epochs=2, zoo_batch=32, rounds=3, warmup=1, B=2, nf=8, meta_batch=2,
                  max_replay=1, eval_every=2, val_tasks=6, test_tasks=10, save_every=1,
                  recover_steps=3, train_inner_steps=1, test_inner_steps=2),
}
# settings that may differ when a run is resumed (where and how it runs, and how long); any other difference
# makes a checkpoint belong to another run
NOT_IDENTITY = ("out", "resume", "device", "workers", "vmap", "data_root", "mirror", "cache", "rounds")


# ------------------------------------------------------------------------ one round of FREE


class Trainer:
    """The FREE meta-training loop (paper §3) and its resumable state."""

    def __init__(self, cfg, ds, teachers, device):
        self.cfg, self.ds, self.teachers, self.device = cfg, ds, teachers, device
        self.model = new_meta_learner(ds, cfg, device)  # f_theta
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.outer_lr)  # outer Adam: Eq. (3) and replay
        G = Generator(ds.image_size, ds.channels, nf=cfg.nf).to(device)  # G(theta_G), supplement Table 1
        self.meta_gen = recover.MetaGenerator(G, cfg.gen_lr, recover.GEN_BETAS)
        self.bank = recover.MemoryBank(device=device)
        self.rng = torch.Generator().manual_seed(cfg.seed)  # teacher choice and replay tasks
        self.round = 0 if cfg.method == "free" else cfg.warmup  # maml has no meta-generator to warm up
        self.best_val, self.best_state = -1.0, None
        self.wall_seconds, self.resumes = 0.0, 0  # of earlier processes of a resumed run
        self.timer = Timer(device)
        self.last_recovered = None  # (x, y, classes) of the round's last task, for recovered.png

    def step(self):
        """One round of the paper's algorithm. Returns the values logged for it."""
        cfg, warm = self.cfg, self.round < self.cfg.warmup
        row = {"round": self.round + 1, "phase": "warm-up" if warm else "train"}
        if cfg.method == "free":
            teachers = self.sample_teachers()  # B teachers of the zoo
            with self.timer("recovery"):
                tasks = self.five(teachers, adversarial=not warm)  # FIVE: k evaluations of Eq. (1) each, theta_G's update
            row["rec_acc"] = sum(t.teacher_acc for t in tasks) / len(tasks)
            if warm:
                return row  # warm-up: the meta-generator alone; nothing stored, no L_adv
            with self.timer("kd"):
                self.memory_bank(tasks, teachers)  # every recovered task; authors' code stores only the last
                row["bank"] = len(self.bank)
                if not cfg.no_kd:  # ablation --no-kd: the meta-learner learns from replay alone
                    row["kd_loss"] = self.distill_and_align(tasks, teachers)  # BELL: KD with Eq. (3)'s alignment
        with self.timer("replay"):
            row.update(self.replay())  # cross-task MAML replay from the memory bank (maml: real data)
        return row

    def sample_teachers(self):
        idx = torch.randperm(len(self.teachers), generator=self.rng)[:self.cfg.B].tolist()
        return [self.teachers[i] for i in idx]

    def five(self, teachers, adversarial):
        """FIVE (paper §3.2): recover one task per teacher, k evaluations of Eq. (1) from theta_G (or
        from scratch), then meta-update theta_G with the mean first-order meta-gradient. L_adv needs the
        meta-learner (`adversarial`), off during warm-up. Each worker recovers its share of the teachers."""
        cfg = self.cfg
        meta_learner = (self.model, maml.detached_params(self.model)) if adversarial else None
        flip = mirror_invariant(self.ds)
        mine = []
        for j in workers.my_share(len(teachers)):
            g = task_generator(cfg.seed, self.round, j)  # the same draws on any worker
            if cfg.no_meta_generator:
                r = recover.recover_from_scratch(teachers[j].model, cfg.way, cfg.recover_steps, self.ds.image_size,
                                                 self.ds.channels, nf=cfg.nf, n_per_class=cfg.n_per_class,
                                                 lr=cfg.gen_lr, meta_learner=meta_learner, lambda_adv=cfg.lambda_adv,
                                                 flip=flip, generator=g)
            else:
                r = recover.recover_task(self.meta_gen.G, teachers[j].model, cfg.way, cfg.k, cfg.n_per_class,
                                         cfg.gen_lr, meta_learner=meta_learner, lambda_adv=cfg.lambda_adv, flip=flip,
                                         generator=g)
            mine.append(r)
        tasks = workers.gather_from_workers(mine, self.device)  # all B tasks, in teacher order, on every worker
        if not cfg.no_meta_generator:
            self.meta_gen.meta_update([r.meta_grad for r in tasks])
        self.last_recovered = (tasks[-1].x, tasks[-1].y, teachers[-1].classes)
        return tasks

    def memory_bank(self, tasks, teachers):
        """Memory bank (paper §3.2): each recovered task's images under the global ids of its teacher's classes."""
        for r, t in zip(tasks, teachers):
            keep = r.teacher_logits.argmax(1) == r.y if self.cfg.bank_filter == "agree" else slice(None)
            self.bank.add(r.x[keep], r.y[keep], t.classes)

    def distill_and_align(self, tasks, teachers):
        """BELL's KD step (paper §3.3; replay is BELL's other half): theta_tilde takes one KD step per recovered
        task in sequence (Eq. (3)), and the outer Adam moves theta toward theta_tilde. Returns the mean KD loss."""
        cfg = self.cfg
        g = task_generator(cfg.seed, self.round, len(tasks))  # A(.) of the KD images
        kd_tasks = [self.kd_task(r, t, g) for r, t in zip(tasks, teachers)]
        g, kd = maml.align_meta_gradient(self.model, maml.detached_params(self.model), kd_tasks, cfg.alpha, cfg.tau,
                                         cfg.hard_labels, align=not cfg.no_align, optimizer=cfg.theta_tilde_opt)
        check_finite(kd, "KD loss (Eq. 3)", self.round)
        maml.apply_meta_gradient(self.model, self.opt, g)
        return kd.item()

    def kd_task(self, r, teacher, generator):
        """A recovered task as KD sees it: (A(x), Y, M_i(A(x))), teacher and meta-learner on the same augmented
        images, as the authors' code does; (x, Y, M_i(x)) with --no-kd-augment."""
        if self.cfg.no_kd_augment:
            return r.x, r.y, r.teacher_logits
        x = recover.augment(r.x, flip=mirror_invariant(self.ds), generator=generator)
        with torch.no_grad():
            return x, r.y, teacher.model(x)

    def replay(self):
        """Cross-task replay (paper §3.3): MAML meta-batches from the memory bank (for `maml`: from the real
        meta-train split) until the train accuracy has not improved for `replay_patience` meta-batches.
        Each worker computes the outer loss of its share of a meta-batch's tasks."""
        cfg, best, since, losses, accs = self.cfg, -1.0, 0, [], []
        if cfg.max_replay == 0 or (cfg.method != "maml" and not self.bank.can_sample(cfg.way, cfg.shots, cfg.query)):
            return {}  # replay switched off (--max-replay 0), or too few images per class yet
        mine = workers.my_share(cfg.meta_batch)
        for _ in range(cfg.max_replay):
            if cfg.method == "maml":
                batch = sample_tasks(self.ds.splits["train"], cfg.meta_batch, cfg.way, cfg.shots, cfg.query, self.rng)
            else:
                batch = self.bank.sample_tasks(cfg.meta_batch, cfg.way, cfg.shots, cfg.query, self.rng)
            x_s, y_s, x_q, y_q = (v[mine.start:mine.stop].to(self.device) for v in batch)
            loss, acc = maml.maml_meta_batch_loss(self.model, dict(self.model.named_parameters()), x_s, y_s, x_q, y_q,
                                                  cfg.train_inner_steps, cfg.inner_lr, cfg.first_order,
                                                  use_vmap(cfg, self.device))
            share = len(mine) / cfg.meta_batch  # (1/T) sum over all T tasks = sum over workers of share * mean
            self.opt.zero_grad(set_to_none=True)
            (share * loss).backward()
            # the one host sync of a meta-batch: the outer gradient, and the loss and accuracy that the NaN guard
            # and the stopping rule read
            seen = torch.stack([share * loss.detach(), share * acc])
            workers.sum_over_workers([seen] + [p.grad for p in self.model.parameters()])
            loss_now, acc_now = seen.tolist()
            check_finite(torch.tensor(loss_now), "MAML replay loss", self.round)
            self.opt.step()
            losses.append(loss_now)
            accs.append(acc_now)
            best, since = (acc_now, 0) if acc_now > best else (best, since + 1)
            if since >= cfg.replay_patience:
                break
        return {"replay_loss": sum(losses) / len(losses), "replay_acc": sum(accs) / len(accs),
                "replay_batches": len(losses)}

    # ---- state
    def state_dict(self):
        return dict(round=self.round, model=self.model.state_dict(), opt=self.opt.state_dict(),
                    meta_gen=self.meta_gen.state_dict(), bank=self.bank.state_dict(),
                    rng=self.rng.get_state(), torch_rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    best_val=self.best_val, best_state=self.best_state, wall_seconds=self.wall_seconds,
                    resumes=self.resumes, config=dataclasses.asdict(self.cfg))

    def load_state_dict(self, s):
        self.round = s["round"]
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.meta_gen.load_state_dict(s["meta_gen"])
        self.bank.load_state_dict(s["bank"])
        self.rng.set_state(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        if s["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda_rng"])
        self.best_val, self.best_state = s["best_val"], s["best_state"]
        self.wall_seconds, self.resumes = s["wall_seconds"], s["resumes"] + 1


def task_generator(seed, round_, j):
    """The random stream of task j of a round (a CPU generator): a recovery draws the same on any worker."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, round_, j]).generate_state(1)[0]))


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


def check_finite(loss, what, round_):
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"round {round_ + 1}: the {what} is {loss.item()}; stopping. last.pt, if any, holds "
                                 f"the last checkpoint before this round (every --save-every rounds and at each "
                                 f"validation): --resume continues from it once the cause is fixed")


# ------------------------------------------------------------------------ train, validate, meta-test


def train(cfg, trainer, run):
    """The rounds, with meta-validation and checkpoints. Returns False when Ctrl-C stopped it (last.pt saved)."""
    with finish_round_on_ctrl_c() as stop:
        while trainer.round < cfg.rounds:
            t_round = time.perf_counter()
            row = trainer.step()
            trainer.round += 1
            row["seconds"] = dict(trainer.timer.take(), round=time.perf_counter() - t_round)
            run.round_done(row, trainer)
            if is_validation_round(cfg, trainer.round):
                validate(cfg, trainer, run)
            stopping = workers.any_worker(stop["flag"])
            if is_validation_round(cfg, trainer.round) or trainer.round % cfg.save_every == 0 or stopping:
                run.save_checkpoint(trainer)
            if stopping:
                run.log(f"stopped at round {trainer.round}; last.pt is saved: the same command with --resume "
                        f"continues")
                workers.barrier()  # no worker exits (and so ends the others) before rank 0 has written and logged
                return False
    return True


def is_validation_round(cfg, round_):
    """Meta-validation after every E-th round and after the last, once the warm-up is over."""
    return round_ > cfg.warmup and (round_ % cfg.eval_every == 0 or round_ == cfg.rounds)


def validate(cfg, trainer, run):
    """Meta-validation on the val split; the best theta so far goes to best.pt."""
    t0 = time.perf_counter()
    acc, ci = evaluate(cfg, trainer.model, maml.detached_params(trainer.model), trainer.ds.splits["val"],
                       cfg.val_tasks, VAL_TASK_SEED, trainer.device)
    # model selection on meta-validation; authors' code selects on the test split
    if acc > trainer.best_val:
        trainer.best_val = acc
        trainer.best_state = copy.deepcopy(trainer.model.state_dict())
        run.save_best(trainer.model, trainer.best_state)
    run.validated(trainer.round, acc, ci, trainer.best_val, time.perf_counter() - t0)


def evaluate(cfg, model, params, split, n_tasks, seed, device, classes=None, chunk=EVAL_CHUNK):
    """Mean accuracy and 95% CI over n_tasks tasks of `split` sampled with a fixed seed (paper §4
    protocol: adapt test_inner_steps SGD steps on the support set, score the query set). Every worker
    samples every task and scores its share."""
    g = torch.Generator().manual_seed(seed)
    accs = []
    for start in range(0, n_tasks, chunk):
        t = min(chunk, n_tasks - start)
        batch = sample_tasks(split, t, cfg.way, cfg.shots, cfg.query, g, classes)
        mine = workers.my_share(t)
        x_s, y_s, x_q, y_q = (v[mine.start:mine.stop].to(device) for v in batch)
        if len(mine):
            accs += maml.meta_test(model, params, x_s, y_s, x_q, y_q, cfg.test_inner_steps, cfg.inner_lr,
                                   use_vmap(cfg, device)).cpu().tolist()
    return maml.mean_ci95(workers.gather_from_workers(accs))


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


def use_vmap(cfg, device):
    """Map tasks with torch.func.vmap: --vmap on / off, or auto = on CUDA only (on the CPU the per-task
    loop is faster, README "Speed"). Both paths compute the same losses (test_free checks them)."""
    return cfg.vmap == "on" or (cfg.vmap == "auto" and device.type == "cuda")


# ------------------------------------------------------------------------ the methods' starting points


def load_teachers(cfg, ds, device, log):
    """The teacher zoo of this configuration: trained once (each worker trains its share), then read from
    the cache."""
    settings = dataclasses.replace(paper_settings(cfg.dataset), batch_size=cfg.zoo_batch)
    if cfg.zoo_epochs is not None:
        settings.epochs = cfg.zoo_epochs
    if workers.world_size() > 1:
        build_zoo(ds, cfg.teacher_arch, cfg.n_teachers, cfg.way, cfg.seed, cfg.preset, settings, cfg.cache, device,
                  log=log, indices=workers.my_share(cfg.n_teachers))  # rank 0 logs its share's progress
        workers.barrier()  # every teacher is in the cache now
        log = None  # the pass below only reads them back
    teachers = build_zoo(ds, cfg.teacher_arch, cfg.n_teachers, cfg.way, cfg.seed, cfg.preset, settings, cfg.cache,
                         device, log=log)
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


# ------------------------------------------------------------------------ main


def main(argv=None):
    """One run of free.py. Returns its results (the dict in results.json), or None when Ctrl-C stopped it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    check_config(cfg)
    if cfg.workers > 1 and not workers.under_torchrun():
        return spawn_workers(cfg, argv)
    with workers.process_group(pick_device(cfg.device, probe=True).type):
        return run_method(cfg)


def run_method(cfg):
    device = pick_device(cfg.device)
    finished = check_out(cfg)
    if finished is not None:
        if workers.is_main():
            print(f"{cfg.out} holds a finished run of {cfg.rounds} rounds: meta-test {finished['test_acc']:.2f} ± "
                  f"{finished['test_ci95']:.2f} (results.json)")
        return finished
    t_start = time.perf_counter()
    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.mirror, seed=cfg.seed)
    check_settings(cfg, ds)  # a failed start writes nothing: the same command runs once the cause is fixed
    run = Run(cfg)
    run.log(f"device: {device}  workers {workers.world_size()}  torch {torch.__version__}  "
            f"threads {torch.get_num_threads()}")
    run.log("config: " + json.dumps(dataclasses.asdict(cfg)))
    run.log(f"data: {ds.name} {ds.image_size}x{ds.image_size}x{ds.channels}, classes train/val/test "
            f"{len(ds.splits['train'].classes)}/{len(ds.splits['val'].classes)}/{len(ds.splits['test'].classes)}")
    teachers = run.zoo(ds, lambda: load_teachers(cfg, ds, device, run.log)) if cfg.method in USES_ZOO else []
    set_seed(cfg.seed)  # the zoo may be cached or trained: start the run's randomness from here

    trainer = Trainer(cfg, ds, teachers, device)
    if os.path.exists(run.last_path):
        ckpt = load_checkpoint(run.last_path, UserError, "--resume:", "it is written atomically, so it was changed "
                               "outside free.py: start a new run in another --out")
        if "wall_seconds" not in ckpt:
            raise UserError(f"--resume: {run.last_path} was written by an older free.py (no wall_seconds); start a new "
                            f"run in another --out")
        trainer.load_state_dict(ckpt)
        run.resumed(trainer)
    run.start(t_start, trainer)
    if cfg.method == "average":
        average_teachers(trainer.model, teachers)
    if cfg.method not in TRAINED:  # untrained baselines: one meta-validation, comparable with FREE's
        validate(cfg, trainer, run)
    elif cfg.method == "maml" and trainer.round == cfg.warmup and cfg.warmup:
        run.log(f"maml: no meta-generator to warm up; rounds {cfg.warmup + 1}-{cfg.rounds} replay real tasks")
    if cfg.method in TRAINED and not train(cfg, trainer, run):
        return None  # stopped by Ctrl-C

    # ---- the single meta-test, of the best theta on meta-validation
    model = trainer.model
    model.load_state_dict(trainer.best_state)  # every method has validated at least once
    t_test = time.perf_counter()
    test = meta_test(cfg, ds, model, maml.detached_params(model), device)
    run.tested(trainer, test, time.perf_counter() - t_test)
    if trainer.last_recovered is not None:
        run.save_recovered_grid(trainer.last_recovered, ds.splits["train"])
    results = run.finish(trainer, test)
    workers.barrier()  # rank 0 has written results.json
    return results


def spawn_workers(cfg, argv):
    """`--workers N` on one machine: N processes, as torchrun would start them; rank 0 writes results.json."""
    status = workers.launch(cli, argv, cfg.workers, pick_device(cfg.device).type)
    if status == workers.INTERRUPTED:
        return None
    if status:
        raise SystemExit(status)  # a worker failed; its error is printed above
    with open(os.path.join(cfg.out, "results.json")) as f:
        return json.load(f)


def cli(argv=None):
    """The command line: main(), with every error a user can cause or fix as one `error:` line (exit 1), and
    Ctrl-C as one line (exit 130) that says what is kept."""
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


# ------------------------------------------------------------------------ command line and checks


def parse_args(argv=None):
    """Build argparse from Config; the preset fills counts the user did not set."""
    p = OneLineErrorParser(description=__doc__.split("\n")[0])
    choices = dict(dataset=DATASETS, method=METHODS, teacher_arch=ARCHS + ("mix",),
                   preset=tuple(PRESETS), device=("auto", "cpu", "cuda"), shots=(1, 5),
                   theta_tilde_opt=maml.THETA_TILDE_OPTIMIZERS, bank_filter=BANK_FILTERS, vmap=("auto", "on", "off"))
    comments = field_comments()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        by_preset = "".join(f"; {name}: {over[f.name]}" for name, over in PRESETS.items() if f.name in over)
        help_ = f"{comments[f.name]} (default: {f.default}{by_preset})"
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


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line naming the fix (--help), like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message} (python free.py --help lists every flag)\n")


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


# the least value of each count (a flag below it ends in one error line before any work)
AT_LEAST = dict(way=2, query=1, recover_steps=1, seed=0, workers=1, n_teachers=1, zoo_epochs=1, zoo_batch=2,
                rounds=1, warmup=0, B=1, k=1, n_per_class=1, nf=1, meta_batch=1, replay_patience=1, max_replay=0,
                eval_every=1, val_tasks=1, test_tasks=1, save_every=1, train_inner_steps=1, test_inner_steps=0)
SEED_MAX = 2 ** 63 - 1  # the largest seed every generator of the run accepts (torch, numpy)
POSITIVE = ("gen_lr", "alpha", "tau", "outer_lr", "inner_lr")  # rates: finite and > 0
NON_NEGATIVE = ("lambda_adv",)  # weights: finite and >= 0


def flag(name):
    return "--" + name.replace("_", "-")


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
    if cfg.method in USES_ZOO and cfg.B > cfg.n_teachers:
        raise UserError(f"--B {cfg.B}: a round samples B of the {cfg.n_teachers} teachers; lower --B or raise "
                        f"--n-teachers")
    if cfg.method in TRAINED and cfg.rounds <= cfg.warmup:
        raise UserError(f"--rounds {cfg.rounds} with --warmup {cfg.warmup}: the meta-learner would never train; "
                        f"expected --rounds > --warmup")
    if cfg.seed > SEED_MAX:
        raise UserError(f"--seed {cfg.seed}: expected at most {SEED_MAX}")
    if cfg.method == "average" and cfg.teacher_arch not in ("conv4", "mix"):
        raise UserError(f"--method average with --teacher-arch {cfg.teacher_arch}: it averages conv4 teachers' weights; "
                        f"use --teacher-arch conv4 or mix")
    if cfg.method == "maml" and cfg.max_replay < 1:
        raise UserError(f"--max-replay {cfg.max_replay}: expected at least 1 for --method maml (it learns from "
                        f"replay alone)")
    if cfg.mirror is not None and not cfg.mirror.startswith(("http://", "https://")):
        raise UserError(f"--mirror {cfg.mirror}: expected an http:// or https:// base address")
    if cfg.workers > 1 or workers.under_torchrun():
        check_workers(cfg)
    for what, folder in (("--out", cfg.out), ("--data-root", cfg.data_root)) + \
            ((("--cache", cfg.cache),) if cfg.method in USES_ZOO else ()):
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


def check_writable(what, folder):
    """`folder` exists as a writable folder, or can be made: its nearest existing ancestor is one."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder}: {path} is not a writable folder; pick another {what}")
    if os.path.realpath(path).startswith(("/proc", "/sys")):
        raise UserError(f"{what} {folder}: {path} is a kernel file system, not a folder for files; pick another {what}")


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
        fewest = torch.bincount(split.labels)[split.classes].min().item()
        if fewest < cfg.shots + cfg.query:
            raise UserError(f"--shots {cfg.shots} + --query {cfg.query}: a class of the {s} split of {ds.name} "
                            f"has {fewest} images; lower --shots or --query")


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


# ------------------------------------------------------------------------ files and progress


class Run:
    """A run's folder: config.json, log.txt (the lines printed), metrics.jsonl (one JSON object per event:
    zoo, round, val, test), last.pt, best.pt, results.json, recovered.png. Rank 0 alone writes."""

    def __init__(self, cfg):
        self.cfg, self.main = cfg, workers.is_main()
        self.last_path, self.best_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "best.pt")
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        self.rounds_timed = {"warm-up": [0, 0.0], "train": [0, 0.0]}  # phase -> [rounds, seconds] in this process
        self.val_seconds = []
        if self.main:
            os.makedirs(cfg.out, exist_ok=True)
            write_json_atomic(dataclasses.asdict(cfg), os.path.join(cfg.out, "config.json"))
            if not os.path.exists(self.last_path):  # a fresh start: records of a run that died before last.pt go
                for name in ("log.txt", "metrics.jsonl"):
                    if os.path.exists(os.path.join(cfg.out, name)):
                        os.remove(os.path.join(cfg.out, name))

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

    def zoo(self, ds, load):
        """The teacher zoo, loaded (and trained where not cached) by load(), and its record."""
        cfg = self.cfg
        folder = zoo_dir(cfg.cache, ds.name, cfg.teacher_arch, cfg.n_teachers, cfg.way, cfg.seed, cfg.preset)
        cached = sum(teacher_path(folder, i).is_file() for i in range(cfg.n_teachers))
        workers.barrier()  # every rank counts (rank 0's count is recorded) before any worker trains a teacher
        t0 = time.perf_counter()
        teachers = load()
        self.record("zoo", teachers=len(teachers), trained=len(teachers) - cached, cached=cached,
                    seconds=time.perf_counter() - t0, held_out_acc=sum(t.acc for t in teachers) / len(teachers))
        return teachers

    def resumed(self, trainer):
        """Drop the records of rounds after the checkpoint (they are done again), so metrics.jsonl is one history."""
        if self.main and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:  # a last line cut short by a kill is dropped
                kept = [line for line in f if line.endswith("\n") and keep_on_resume(json.loads(line), trainer.round)]
            atomic_text("".join(kept), self.metrics_path)
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
            save_atomic(trainer.state_dict(), self.last_path)

    def save_best(self, model, state):
        if self.main:
            save_atomic({"model": state, "arch": model.arch, "config": dataclasses.asdict(self.cfg)}, self.best_path)

    def tested(self, trainer, test, seconds):
        acc, ci = test["test_acc"]
        per_domain = {d: {"acc": a, "ci95": c} for d, (a, c) in test.get("per_domain", {}).items()}
        self.record("test", round=trainer.round, acc=acc, ci95=ci, tasks=self.cfg.test_tasks, seconds=seconds,
                    **({"per_domain": per_domain} if per_domain else {}))
        self.log(f"meta-test ({self.cfg.test_tasks} tasks{' per domain' if per_domain else ''}, seed "
                 f"{TEST_TASK_SEED}): {acc:.2f} ± {ci:.2f}  {seconds:.0f}s")
        for d, v in per_domain.items():
            self.log(f"  {d}: {v['acc']:.2f} ± {v['ci95']:.2f}")

    def save_recovered_grid(self, recovered, real):
        """recovered.png: per class, GRID_PER_CLASS recovered images, then as many real ones."""
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
            write_json_atomic(results, os.path.join(cfg.out, "results.json"))
        self.log(f"results: {os.path.join(cfg.out, 'results.json')}  wall {format_hms(results['wall_seconds'])}")
        return results


def keep_on_resume(record, round_):
    """A metrics.jsonl record still true after resuming at `round_`: the zoo's, and rounds and validations up to it."""
    return record["event"] == "zoo" or (record["event"] in ("round", "val") and record["round"] <= round_)


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


def save_atomic(obj, path):
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_text(text, path):
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_json_atomic(obj, path):
    atomic_text(json.dumps(obj, indent=2), path)


GRID_PER_CLASS = 8  # recovered.png: images per class shown (recovered, then real)
GRID_PAD = 2  # recovered.png: pixels between images


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


if __name__ == "__main__":
    sys.exit(cli())
