"""FREE end to end: `python free.py --dataset cifarfs --shots 1`.

Paper: Wei et al., "FREE: Faster and Better Data-Free Meta-Learning", CVPR 2024, §3 (method) and §4
(setup); the counts are the authors' code defaults. The file reads in the paper's order:
    Config       every setting, with its paper symbol and default;
    Trainer.step one round: sample B teachers -> FIVE: recover each task in k steps, meta-update theta_G
                 -> memory bank <- all recovered tasks -> BELL: KD with Eq. (3) alignment -> MAML replay;
                 the first `warmup` rounds train only the meta-generator (no L_adv, nothing stored);
    train        the rounds; every E rounds a meta-validation keeps the best theta;
    meta_test    once, at the end, on a fixed set of test tasks;
    main         the whole run.
The plumbing around it: settings.py (command line, checks), run.py (the run's files and progress, Ctrl-C).
The teachers: the zoo free.py trains (zoo.py), or your own with --zoo DIR (external.py); a trained
meta-learner labels your images with `python free.py adapt` (adapt.py).
Baselines: `random` (random-init Conv4), `average` (mean of same-architecture teachers' weights, new
head), `maml` (data-based MAML on the real meta-train images: the upper bound, the only one that sees
data). Ablations: --no-meta-generator, --no-align, --hard-labels, --no-kd, --max-replay 0.
`--workers N` (or torchrun) spreads a round's independent tasks over N processes (workers.py).

Differences from the authors' code (one-line comments mark them where they happen):
model selection on the meta-validation split, not the test split; every recovered task enters the
memory bank; the generator's Adam persists; paths and counts come from one Config.
"""
import signal
import sys


def interrupted_while_starting(signum, frame):
    """Ctrl-C while torch is imported: one line and status 130, as in every later phase."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("\ninterrupted while starting: nothing was written", file=sys.stderr, flush=True)
    raise SystemExit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_starting)

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

import adapt
import maml
import recover
import workers
from data import UserError, load_dataset, sample_tasks
from external import EXTERNAL_ARCH, parameters_like, restrict, zoo_digest
from models import Conv4, Generator
from run import Run, Timer, export_teachers, finish_round_on_ctrl_c, load_teachers, spawn_workers, user_teachers
from run import cli as run_cli
from settings import (TRAINED, USES_ZOO, check_config, check_out, check_settings, is_validation_round, pick_device,
                      run_name, set_seed)
from settings import parse_args as settings_parse_args
from zoo import QUICK_SETTINGS, mirror_invariant

TEST_TASK_SEED = 2024  # the meta-test task seed: fixed, so every method and seed sees the same tasks
VAL_TASK_SEED = 1234  # the meta-validation task seed (same val tasks at every evaluation)
EVAL_CHUNK = 50  # meta-test tasks evaluated at once (memory only; no effect on the results)
CLASS_DRAW = 1  # task_generator's stream of a teacher's class draw (ours: teachers of more than `way` classes)


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
    zoo: str = None  # a folder of your own teachers: zoo.json + one program each (README "Your own models and data")
    preset: str = "paper"  # paper / quick / smoke: counts only, never the algorithm (README "Presets")
    # ---- where and how
    data_root: str = "data"  # folder of the data sets, downloads go there; --dataset folder: the folder (README "Data")
    image_size: int = None  # side of the run's images (None: the data set's; folder: the median side, rounded)
    export_zoo: str = None  # write the teacher zoo of these settings to this folder (zoo.json, .pt2 files) and exit
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
        # the warm-up trains the meta-generator: maml and --no-meta-generator have none, so they start after it
        self.round = 0 if cfg.method == "free" and not cfg.no_meta_generator else cfg.warmup
        self.best_val, self.best_state = -1.0, None
        self.before_end = None  # (best_val, best_state) before a validation at a last round off the E-round schedule
        self.wall_seconds, self.resumes = 0.0, 0  # of earlier processes of a resumed run
        self.timer = Timer(device)
        self.last_recovered = None  # (x, y, classes) of the round's last task, for recovered.png
        self.zoo = zoo_digest(cfg.zoo) if cfg.zoo and cfg.method in USES_ZOO else None  # the --zoo run's identity

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
        """B teachers of the zoo, each seen as a `way`-way classifier: a teacher of more classes shows `way` of
        them, drawn from the task's own stream (the same on any worker; the paper's 5-way teachers draw nothing)."""
        idx = torch.randperm(len(self.teachers), generator=self.rng)[:self.cfg.B].tolist()
        return [way_view(self.teachers[i], self.cfg.way, task_generator(self.cfg.seed, self.round, j, CLASS_DRAW))
                for j, i in enumerate(idx)]

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
                    best_val=self.best_val, best_state=self.best_state, before_end=self.before_end,
                    wall_seconds=self.wall_seconds,
                    resumes=self.resumes, arch=self.model.arch, zoo=self.zoo, config=dataclasses.asdict(self.cfg))

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
        self.best_val, self.best_state, self.before_end = s["best_val"], s["best_state"], s.get("before_end")
        self.wall_seconds, self.resumes = s["wall_seconds"], s["resumes"] + 1


def task_generator(seed, round_, j, *stream):
    """The random stream of task j of a round (a CPU generator): a recovery draws the same on any worker.
    `stream` (CLASS_DRAW) names another stream of the same task."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, round_, j, *stream]).generate_state(1)[0]))


def way_view(teacher, way, generator):
    """The teacher as a `way`-way classifier (external.restrict): its model restricted to the drawn classes."""
    model, classes = restrict(teacher, way, generator)
    names = teacher.class_names and [teacher.class_names[teacher.classes.index(c)] for c in classes]
    return dataclasses.replace(teacher, model=model, classes=classes, class_names=names)


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


def validate(cfg, trainer, run):
    """Meta-validation on the val split; the best theta so far goes to best.pt."""
    t0 = time.perf_counter()
    acc, ci = evaluate(cfg, trainer.model, maml.detached_params(trainer.model), trainer.ds.splits["val"],
                       cfg.val_tasks, VAL_TASK_SEED, trainer.device)
    # a run continued past this round (--resume --rounds) undoes a validation off the E-round schedule
    trainer.before_end = (trainer.best_val, trainer.best_state) if trainer.round % cfg.eval_every else None
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


def new_meta_learner(ds, cfg, device):
    return Conv4(cfg.way, ds.channels, ds.image_size, ds.mean, ds.std, track_running_stats=False).to(device)


def average_teachers(model, teachers):
    """`average` baseline: theta = mean of the Conv4 teachers' weights (a --zoo's teachers: those named like
    models.Conv4's); a freshly initialised head."""
    same = [t for t in teachers if t.arch in ("conv4", EXTERNAL_ARCH)]
    if not same:
        raise UserError("--method average needs conv4 teachers; this zoo has none (use --teacher-arch conv4 or mix)")
    weights = [parameters_like(t, model) for t in same]  # {name: tensor} of every parameter but the head's
    state = model.state_dict()
    for name in weights[0]:
        state[name] = torch.stack([w[name] for w in weights]).mean(0)
    model.load_state_dict(state)


# ------------------------------------------------------------------------ main


def main(argv=None):
    """One run of free.py. Returns its results (the dict in results.json), or None when Ctrl-C stopped it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    check_config(cfg)
    if cfg.export_zoo:
        return export_teachers(cfg)
    if cfg.workers > 1 and not workers.under_torchrun():
        return spawn_workers(cli, cfg, argv)
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
    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.mirror, cfg.image_size, cfg.seed,
                      need_train=cfg.zoo is None or cfg.method == "maml")  # --zoo: the data set's train/ may be missing
    check_settings(cfg, ds)  # a failed start writes nothing: the same command runs once the cause is fixed
    given = user_teachers(cfg, ds, device)  # --zoo: every teacher checked before anything is written
    run = Run(cfg, device, ds)  # the run's folder; the device, config and data lines
    teachers = run.zoo(lambda: load_teachers(cfg, ds, device, run.log, given)) if cfg.method in USES_ZOO else []
    set_seed(cfg.seed)  # the zoo may be cached or trained: start the run's randomness from here

    trainer = Trainer(cfg, ds, teachers, device)
    run.resume(trainer)  # from last.pt, when --out holds one
    run.start(t_start, trainer)
    if cfg.method == "average":
        average_teachers(trainer.model, teachers)
    if cfg.method not in TRAINED:  # untrained baselines: one meta-validation, comparable with FREE's
        validate(cfg, trainer, run)
    elif trainer.round == cfg.warmup and cfg.warmup:
        run.log(f"{run_name(cfg)}: no meta-generator to warm up; training starts at round {cfg.warmup + 1}")
    if cfg.method in TRAINED and not train(cfg, trainer, run):
        return None  # stopped by Ctrl-C

    # ---- the single meta-test, of the best theta on meta-validation
    model = trainer.model
    model.load_state_dict(trainer.best_state)  # every method has validated at least once
    t_test = time.perf_counter()
    test = meta_test(cfg, ds, model, maml.detached_params(model), device)
    run.tested(trainer, test, time.perf_counter() - t_test, TEST_TASK_SEED)
    if trainer.last_recovered is not None:
        run.save_recovered_grid(trainer.last_recovered, ds.splits["train"])
    results = run.finish(trainer, test)
    workers.barrier()  # rank 0 has written results.json
    return results


def cli(argv=None):
    """`python free.py ...`: main() with every user error as one `error:` line (exit 1) and Ctrl-C as one line
    (exit 130); `python free.py adapt ...` applies a trained meta-learner to new images (adapt.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return adapt.cli(argv[1:]) if argv[:1] == ["adapt"] else run_cli(main, argv)


def parse_args(argv=None):
    """The command line as a Config (settings.py builds the flags from Config's fields and comments)."""
    return settings_parse_args(argv, Config, PRESETS)


if __name__ == "__main__":
    sys.exit(cli())
