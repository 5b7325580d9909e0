"""The probes of experiments/bench.py that measure inside the method rather than time whole runs:
`recovery` (FIVE's speed-up at equal quality, paper §4: about 20x faster than recovering from scratch),
`bank` (why MAML replay on the memory bank is a weak signal), `kd` (what KD and Eq. (3) alone do to
theta) and `adapt` (`free.py adapt` on other numbers of classes than the run's, by starting head). Each stores one section of results.json; the results document shows them (tables.py).

Recovery quality has two yardsticks (ours): the teacher's accuracy on its recovered images (weak: it
saturates), and the accuracy on the teacher's *real* images of a fresh Conv4 distilled from the
recovered images alone (STUDENT_STEPS Adam steps).
"""
import os
import statistics
import time
from types import SimpleNamespace

import torch

import records  # first: puts the repository root on sys.path
import adapt
import external
import free
import maml
import recover
import run
import settings
import tables
import zoo
from zoo import mirror_invariant
from data import UserError, load_dataset, sample_tasks
from models import Conv4, Generator
from records import seed_flags

# recovery benchmark: recovery timed on teachers the meta-generator never saw
META_TEACHERS = 40  # teachers the meta-generator is meta-trained on (the quick preset's zoo)
UNSEEN_TEACHERS = 6  # teachers it never sees, on which recovery is timed
META_ROUNDS = 60  # meta-generator rounds of B teachers before recovery is timed (ours)
SCRATCH_BUDGET = 400  # most from-scratch steps tried when matching quality (2x BiDf-MKD's 200)
CHECKPOINTS = tables.CHECKPOINTS  # from-scratch steps at which the student yardstick is taken
STUDENT_STEPS = 100  # KD Adam steps of the yardstick student (ours)
STUDENT_LR = 0.01  # its Adam lr (the Conv4 teachers' lr, authors' code)
BANK_TASKS, BANK_TASK_SEED = tables.BANK_TASKS, 7  # `bank`: tasks of each kind (as many as the quick preset validates on)


# ------------------------------------------------------------------------ recovery speed


def student_accuracy(x, teacher_logits, x_real, y_real, ds, seed):
    """The sharp yardstick: a fresh Conv4 (fixed init) distilled from the recovered images only,
    then measured on the teacher's real images."""
    torch.manual_seed(seed)
    student = Conv4(teacher_logits.shape[1], ds.channels, ds.image_size, ds.mean, ds.std, track_running_stats=False)
    opt = torch.optim.Adam(student.parameters(), lr=STUDENT_LR)
    for _ in range(STUDENT_STEPS):
        opt.zero_grad()
        maml.kd_loss(student(x), teacher_logits).backward()
        opt.step()
    with torch.no_grad():
        return maml.accuracy(student(x_real), y_real).item()


def trace_recovery(G, teacher, cfg, steps, ds, real, checkpoints=()):
    """Recover with `steps` steps of Eq. (1) from generator G, recording for every step the elapsed
    recovery time and the teacher's accuracy on that step's images, and at `checkpoints` the student
    yardstick (row `s` describes the task that `recover_task(steps=s)` returns)."""
    trace, t0, traced = [], time.perf_counter(), [0.0]

    def after_step(step, x):
        t_cb = time.perf_counter()
        with torch.no_grad():
            logits = teacher(x)
        y = recover.labels_Y(cfg.way, cfg.n_per_class, x.device)
        row = {"step": step, "seconds": t_cb - t0 - traced[0], "teacher_acc": (logits.argmax(1) == y).float().mean().item()}
        if step in checkpoints:
            row["student_acc"] = student_accuracy(x, logits, *real, ds, seed=step)
        trace.append(row)
        traced[0] += time.perf_counter() - t_cb

    r = recover.recover_task(G, teacher, cfg.way, steps, cfg.n_per_class, cfg.gen_lr, flip=ds.channels == 3,
                             meta_grad=False, after_step=after_step)
    final = {"steps": steps, "seconds": r.seconds, "teacher_acc": r.teacher_acc,
             "student_acc": student_accuracy(r.x, r.teacher_logits, *real, ds, seed=0)}
    return final, trace


def bench_recovery(args):
    cfg = free.parse_args(["--dataset", "omniglot", "--preset", "quick", "--data-root", args.data_root,
                           "--n-teachers", str(META_TEACHERS + UNSEEN_TEACHERS)])
    ds = load_dataset("omniglot", args.data_root)
    teachers, _ = run.load_teachers(cfg, ds, torch.device("cpu"), print)
    seen, unseen = teachers[:META_TEACHERS], teachers[META_TEACHERS:]
    settings.set_seed(cfg.seed)
    meta = recover.MetaGenerator(Generator(ds.image_size, ds.channels, nf=cfg.nf), cfg.gen_lr)
    init_state = {k: v.clone() for k, v in meta.G.state_dict().items()}
    t0 = time.perf_counter()
    for rnd in range(META_ROUNDS):
        idx = torch.randperm(len(seen))[:cfg.B].tolist()
        tasks = [recover.recover_task(meta.G, seen[i].model, cfg.way, cfg.k, cfg.n_per_class, cfg.gen_lr, flip=False)
                 for i in idx]
        meta.meta_update([t.meta_grad for t in tasks])
        if (rnd + 1) % 10 == 0:
            print(f"meta-generator round {rnd + 1}/{META_ROUNDS}: teacher acc on recovered "
                  f"{sum(t.teacher_acc for t in tasks) / len(tasks):.3f}, {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for t in unseen:
        train = ds.splits["train"]
        mask = torch.isin(train.labels, torch.tensor(t.classes))
        real = (train.images[mask].float() / 255, torch.tensor([t.classes.index(c) for c in train.labels[mask].tolist()]))
        torch.manual_seed(100 + t.index)
        meta5, _ = trace_recovery(meta.G, t.model, cfg, cfg.k, ds, real)
        meta0, _ = trace_recovery(meta.G, t.model, cfg, 0, ds, real)
        fresh = Generator(ds.image_size, ds.channels, nf=cfg.nf)
        fresh.load_state_dict(init_state)  # theta_G before meta-training: the same initial weights
        torch.manual_seed(100 + t.index)
        scratch, trace = trace_recovery(fresh, t.model, cfg, SCRATCH_BUDGET, ds, real, CHECKPOINTS)
        match_t = next((r for r in trace if r["teacher_acc"] >= meta5["teacher_acc"]), None)
        match_s = next((r for r in trace if "student_acc" in r and r["student_acc"] >= meta5["student_acc"]), None)
        at = {r["step"]: r for r in trace}
        rows.append({"teacher": t.index, "meta_k5": meta5, "meta_k0": meta0, "scratch": {str(s): at[s] for s in CHECKPOINTS},
                     "match_teacher_acc": match_t, "match_student_acc": match_s})
        print(f"unseen teacher {t.index}: meta k={cfg.k} {meta5['seconds']:.2f}s teacher {meta5['teacher_acc']:.3f} "
              f"student {meta5['student_acc']:.3f} | match(teacher) {match_t['step'] if match_t else '-'} "
              f"match(student) {match_s['step'] if match_s else '-'}", flush=True)
    records.store_section(args, "recovery", {"rows": rows, "meta_rounds": META_ROUNDS, "meta_teachers": META_TEACHERS,
                                     "nf": cfg.nf, "k": cfg.k, "k_counts": "evaluations", "images": cfg.way * cfg.n_per_class,
                                     "scratch_budget": SCRATCH_BUDGET, "student_steps": STUDENT_STEPS,
                                     "meta_training_seconds": time.perf_counter() - t0,
                                     "torch_threads": torch.get_num_threads()})


# ------------------------------------------------------------------------ why replay is weak; KD alone


def cross_teacher_agreement(teachers, G, meta_learner, cfg, ds):
    """Each teacher A's task recovered as a training round recovers it (k steps from the run's meta-generator,
    L_adv against the run's meta-learner); every other teacher B that shares a class c with A labels A's
    recovered images of c, and real meta-train images of c. Means over (A, B, c) triples, and A's own accuracy."""
    train, flip = ds.splits["train"], mirror_invariant(ds)
    with torch.no_grad():  # each teacher on the real images of each of its classes, once
        on_real = {(i, c): maml.accuracy(b.model(train.images[train.labels == c].float() / 255), j).item()
                   for i, b in enumerate(teachers) for j, c in enumerate(b.classes)}
    own, other, real = [], [], []
    for a in teachers:
        r = recover.recover_task(G, a.model, cfg.way, cfg.k, cfg.n_per_class, cfg.gen_lr, meta_learner=meta_learner,
                                 lambda_adv=cfg.lambda_adv, flip=flip, meta_grad=False)
        own.append(r.teacher_acc)
        for i, b in enumerate(teachers):
            for c in set(a.classes) & set(b.classes) if b is not a else ():
                with torch.no_grad():
                    other.append(maml.accuracy(b.model(r.x[r.y == a.classes.index(c)]), b.classes.index(c)).item())
                real.append(on_real[i, c])
    return {"own": statistics.mean(own), "other": statistics.mean(other), "other_real": statistics.mean(real),
            "triples": len(other)}


def replay_accuracy(model, tasks, cfg):
    """Query accuracy after MAML replay's inner loop (train_inner_steps steps at inner_lr), mean over tasks."""
    accs = maml.meta_test(model, maml.detached_params(model), *tasks, cfg.train_inner_steps, cfg.inner_lr,
                          vectorize=False)
    return accs.mean().item()


def bench_bank(args):
    """Why MAML replay on the memory bank is a weak signal, on each seed's quick-preset FREE 1-shot run:
    (1) do teachers that share a class recognise each other's recovered images of it (the bank merges them)?
    (2) how hard are bank tasks for a meta-learner that is good on real tasks (data-based MAML's best.pt)?"""
    cpu, ds, rows = torch.device("cpu"), load_dataset("omniglot", args.data_root), {}
    for seed in args.seeds:
        cfg = free.parse_args(["--dataset", "omniglot", "--preset", "quick", "--data-root", args.data_root,
                               *seed_flags(seed)])
        state = records.finished_run_state(args, "bank", "free", [], seed)
        teachers, _ = run.load_teachers(cfg, ds, cpu, lambda line: None)
        meta_gen = recover.MetaGenerator(Generator(ds.image_size, ds.channels, nf=cfg.nf), cfg.gen_lr)
        meta_gen.load_state_dict(state["meta_gen"])
        model = free.new_meta_learner(ds, cfg, cpu)
        model.load_state_dict(state["model"])
        bank = recover.MemoryBank()
        bank.load_state_dict(state["bank"])
        torch.manual_seed(seed)
        row = cross_teacher_agreement(teachers, meta_gen.G, (model, maml.detached_params(model)), cfg, ds)
        g = torch.Generator().manual_seed(BANK_TASK_SEED)
        tasks = {"bank": bank.sample_tasks(BANK_TASKS, cfg.way, cfg.shots, cfg.query, g),
                 "real": sample_tasks(ds.splits["train"], BANK_TASKS, cfg.way, cfg.shots, cfg.query, g)}
        for method in ("free", "maml"):
            best = os.path.join(records.Job(method, (), 1, seed, records.sweep_of(args)).out, "best.pt")
            model.load_state_dict(zoo.load_checkpoint(best, UserError, "bank:", "rerun the sweep's run")["model"])
            for kind, t in tasks.items():
                row[f"{method}_on_{kind}"] = replay_accuracy(model, t, cfg)
        row.update(bank_classes=len(bank.classes()), teachers_per_class=statistics.mean(
            sum(c in t.classes for t in teachers) for c in bank.classes()))
        rows[str(seed)] = row
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    records.store_section(args, "bank", rows)


def combine(body, head):
    """A meta-learner state dict: every entry of `body` but the linear head's, which come from `head`
    (a zero head if None: adaptation then starts from the body's features alone)."""
    return {k: v if not k.startswith("head.") else head[k] if head is not None else torch.zeros_like(v)
            for k, v in body.items()}


def swapped_accuracies(theta, accuracy):
    """{row: accuracy(state)} for every tables.KD_ROWS row, its state made of theta[body]'s body and theta[head]'s head."""
    return {name: accuracy(combine(theta[body], theta[head] if head else None)) for name, body, head in tables.KD_ROWS}


def bench_kd(args):
    """What KD and Eq. (3) alone do to theta: each seed's initial theta_0 (the start every run of that seed
    shares: free.main reseeds, then builds the meta-learner first), and the KD-only run's and FREE's theta at
    the end (last.pt), bodies and heads paired as tables.KD_ROWS lists, on the meta-validation tasks."""
    cpu, ds, rows = torch.device("cpu"), load_dataset("omniglot", args.data_root), {}
    for seed in args.seeds:
        cfg = free.parse_args(["--dataset", "omniglot", "--preset", "quick", "--data-root", args.data_root,
                               *seed_flags(seed)])
        settings.set_seed(cfg.seed)
        theta = {"init": free.new_meta_learner(ds, cfg, cpu).state_dict()}
        for key, (method, flags) in {"kd": tables.KD_ONLY, "free": ("free", [])}.items():
            theta[key] = records.finished_run_state(args, "kd", method, flags, seed)["model"]
        model = free.new_meta_learner(ds, cfg, cpu)

        def val_accuracy(state):
            model.load_state_dict(state)
            return free.evaluate(cfg, model, maml.detached_params(model), ds.splits["val"], cfg.val_tasks,
                                 free.VAL_TASK_SEED, cpu)[0]

        rows[str(seed)] = swapped_accuracies(theta, val_accuracy)
        print(f"seed {seed}: " + ", ".join(f"{n} {a:.2f}" for n, a in rows[str(seed)].items()), flush=True)
    records.store_section(args, "kd", rows)


# ------------------------------------------------------------------------ adapt: beyond the trained way

ADAPT_WAYS = (5, 10, 20)  # N of the support sets `free.py adapt` is measured on (the runs are 5-way)
ADAPT_SHOTS = (1, 5)  # K
ADAPT_TASKS = 200  # meta-test tasks per (seed, N, K), the same tasks for every head


def bench_adapt(args):
    """`free.py adapt` beyond the trained way: each seed's FREE 1-shot run (quick preset, best.pt, the theta its
    meta-test scores) adapted to N-way K-shot tasks of the Omniglot meta-test split by adapt.adapt_task, from
    the meta-learned head (N = the run's way only), a prototype head and a zero head; mean accuracy and 95% CI
    over ADAPT_TASKS tasks, the same tasks for every head."""
    ds, rows = load_dataset("omniglot", args.data_root), []
    test = ds.splits["test"]
    for seed in args.seeds:
        job = records.Job("free", (), 1, seed, records.sweep_of(args))
        path = os.path.join(job.out, "best.pt")
        if not job.finished():
            raise UserError(f"adapt: {job.out} is not a finished {job.rounds}-round run; run `python experiments/"
                            f"bench.py seeds --shots 1 --only free --seeds {seed}` first")
        arch, state, config = adapt.load_meta_learner(path)
        for way in ADAPT_WAYS:
            for shots in ADAPT_SHOTS:
                g = torch.Generator().manual_seed(free.TEST_TASK_SEED)
                x_s, y_s, x_q, y_q = sample_tasks(test, ADAPT_TASKS, way, shots, config["query"], g)
                for head in adapt.STARTS:
                    if head == "learned" and way != arch["num_classes"]:
                        continue  # the meta-learned head has the run's way rows
                    model = adapt.meta_learner(arch, state, way, head, path)
                    accs = [maml.accuracy(adapt.adapt_task(model, x_s[t], y_s[t], x_q[t], way, head,
                                                           config["test_inner_steps"], config["inner_lr"]),
                                          y_q[t]).item() for t in range(ADAPT_TASKS)]
                    acc, ci = maml.mean_ci95(accs)
                    rows.append(dict(seed=seed, way=way, shots=shots, head=head, acc=acc, ci95=ci,
                                     tasks=ADAPT_TASKS, steps=config["test_inner_steps"]))
                    print(f"seed {seed} {way}-way {shots}-shot {head:9s} head: {acc:.2f} ± {ci:.2f}", flush=True)
    records.store_section(args, "adapt", {"trained_way": arch["num_classes"], "rows": rows})


# ------------------------------------------------------------------------ resize: a teacher's own input format

RESIZE_FORMATS = ((28, 1), (56, 1), (28, 3), (32, 3))  # (size, channels) of runs served by 28x28 grey teachers
RESIZE_TEACHERS = 4  # teachers of the quick zoo measured (its last ones)
RESIZE_STEPS = 40  # evaluations of Eq. (1) from a fresh generator per recovery


def bench_resize(args):
    """A teacher's own input format (--zoo, external.fit_input; ours, not in the paper), measured before it is
    trusted: the Omniglot quick zoo's teachers (28x28 grey) exported as --zoo programs serve runs of other image
    sizes and channels. Per run format: a recovery from a fresh generator (RESIZE_STEPS evaluations of Eq. (1))
    at the run's format, the teacher seeing its images through fit_input; the yardsticks: the teacher's
    accuracy on them, and a fresh Conv4 at the run's format distilled from them alone (student_accuracy),
    measured on the teacher's real images brought to the run's format (bilinear resize, grey repeated)."""
    cfg = free.parse_args(["--dataset", "omniglot", "--preset", "quick", "--data-root", args.data_root])
    ds = load_dataset("omniglot", args.data_root)
    teachers, _ = run.load_teachers(cfg, ds, torch.device("cpu"), print)
    train, rows = ds.splits["train"], []
    for t in teachers[-RESIZE_TEACHERS:]:
        program = external.export_program(t.model).module()
        norm = t.model.normalize
        teacher = external.ExternalTeacher(program, ds.image_size, ds.channels, norm.mean.flatten().tolist(),
                                           norm.std.flatten().tolist())
        mask = torch.isin(train.labels, torch.tensor(t.classes))
        x_real = train.images[mask].float() / 255  # [n, 1, 28, 28]
        y_real = torch.tensor([t.classes.index(c) for c in train.labels[mask].tolist()])
        for size, channels in RESIZE_FORMATS:
            run_format = SimpleNamespace(image_size=size, channels=channels, mean=ds.mean * channels,
                                         std=ds.std * channels)
            real = torch.nn.functional.interpolate(x_real.expand(-1, channels, -1, -1), size=(size, size),
                                                   mode="bilinear", align_corners=False) if size != ds.image_size \
                else x_real.expand(-1, channels, -1, -1)
            g = torch.Generator().manual_seed(t.index)
            r = recover.recover_from_scratch(teacher, cfg.way, RESIZE_STEPS, size, channels, nf=cfg.nf,
                                             n_per_class=cfg.n_per_class, lr=cfg.gen_lr, flip=False, generator=g)
            student = student_accuracy(r.x, r.teacher_logits, real, y_real, run_format, seed=0)
            rows.append(dict(teacher=t.index, size=size, channels=channels, teacher_acc=r.teacher_acc,
                             student_acc=student, seconds=r.seconds))
            print(f"teacher {t.index} run {size}x{size}x{channels}: teacher acc {r.teacher_acc:.3f}, student on real "
                  f"{student:.3f}, {r.seconds:.1f}s", flush=True)
    records.store_section(args, "resize", {"rows": rows, "steps": RESIZE_STEPS, "student_steps": STUDENT_STEPS,
                                           "teacher_size": ds.image_size, "teacher_channels": ds.channels})
