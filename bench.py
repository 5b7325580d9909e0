"""Measure FREE's claims on this machine; writes bench/results.json and bench/results.md (the README
includes the latter). Every number there is written by this script; none is typed by hand.

    python bench.py recovery   # speed-up of task recovery at equal quality (paper §4: ~20x)
    python bench.py seeds      # Omniglot 5-way 1/5-shot, seeds 0-2: FREE, baselines, ablations (quick preset)
    python bench.py time       # the quick preset's wall time alone, and where a round's time goes
    python bench.py rounds     # FREE 1-shot at other run lengths: meta-validation by round, test at each length
                               # (--rounds R: continues the longest finished run of each seed below R; default 200)
    python bench.py bank       # why MAML replay on the memory bank is a weak signal (cross-teacher agreement)
    python bench.py kd         # what KD and Eq. (3) alone do to theta: body and head swapped, on meta-validation
    python bench.py gpu        # paper preset on CIFAR-shaped synthetic data: s/round, projected 1000 rounds
    python bench.py report     # rewrite bench/results.md from bench/results.json

Recovery quality has two yardsticks (ours): the teacher's accuracy on its recovered images (weak:
it saturates), and the accuracy on the teacher's *real* images of a fresh Conv4 distilled from the
recovered images alone (KD, STUDENT_STEPS Adam steps).
"""
import argparse
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import free
import maml
import recover
import zoo
from data import UserError, load_dataset, sample_tasks
from models import Conv4, Generator

OUT = "bench"
# recovery benchmark: recovery timed on teachers the meta-generator never saw
META_TEACHERS = 40  # teachers the meta-generator is meta-trained on (the quick preset's zoo)
UNSEEN_TEACHERS = 6  # teachers it never sees, on which recovery is timed
META_ROUNDS = 60  # meta-generator rounds of B teachers before recovery is timed (ours)
SCRATCH_BUDGET = 400  # most from-scratch steps tried when matching quality (2x BiDf-MKD's 200)
CHECKPOINTS = (5, 10, 20, 50, 100, 200, 400)  # from-scratch steps at which the student yardstick is taken
STUDENT_STEPS = 100  # KD Adam steps of the yardstick student (ours)
STUDENT_LR = 0.01  # its Adam lr (the Conv4 teachers' lr, authors' code)
# accuracy benchmark (`bench.py seeds`): every method and ablation, quick preset, over seeds; (method, flags, shots),
# in the order they run: the comparison FREE must win first, then ablations, then the data-based upper bound
SEEDS = (0, 1, 2)  # each reseeds the whole pipeline: teacher zoo, generator, meta-learner, task sampling
SEED_RUNS = [("free", [], 1), ("average", [], 1), ("random", [], 1), ("free", [], 5), ("average", [], 5),
             ("random", [], 5), ("free", ["--no-align"], 1), ("free", ["--hard-labels"], 1),
             ("free", ["--no-meta-generator"], 1), ("free", ["--theta-tilde-opt", "sgd"], 1),
             ("free", ["--no-kd-augment"], 1), ("free", ["--bank-filter", "agree"], 1),
             ("free", ["--max-replay", "0"], 1), ("free", ["--max-replay", "1"], 1), ("free", ["--no-kd"], 1),
             ("free", ["--first-order"], 1), ("maml", [], 1), ("maml", [], 5)]
# what each ablation or setting removes, for the README's "component" lines
COMPONENTS = {"--no-align": "Eq. (3) alignment (vs independent KD steps)",
              "--hard-labels": "soft-label KD (vs CE on hard labels, supplement Table 2)",
              "--no-meta-generator": "the meta-generator (vs 20 from-scratch steps)",
              "--theta-tilde-opt sgd": "Adam on theta_tilde (vs plain SGD)",
              "--no-kd-augment": "A(.) on the KD images (vs none)",
              "--bank-filter agree": "keeping every recovered image (vs only those the teacher labels as Y)",
              "--max-replay 0": "cross-task MAML replay (vs none: KD and Eq. (3) alone)",
              "--max-replay 1": f"up to {free.PRESETS['quick']['max_replay']} replay meta-batches a round (vs 1)",
              "--no-kd": "KD with Eq. (3) (vs none: replay alone)",
              "--first-order": "second-order MAML replay (vs first-order, the authors' --approx)"}
# the paper's CIFAR-FS numbers (Table 2 of the paper and supplement Table 2, Conv4 5-way), beside ours
PAPER_CIFARFS = {"free": (39.13, 52.58), "free --hard-labels": (37.81, 50.35)}
LONG_ROUNDS = 200  # `bench.py rounds`: FREE 1-shot continued to this many rounds by default
QUICK_ROUNDS = free.PRESETS["quick"]["rounds"]  # a run of `bench.py seeds` shorter than this is continued to it
ROUND_PHASES = {"recovery": "seconds_per_round_recovery", "KD + Eq. (3)": "seconds_per_round_kd",
                "replay": "seconds_per_round_replay"}  # a training round's phases as free.py's results.json records them
TIME_ROUNDS = 40  # `bench.py time`: rounds timed (warm-up, training, two meta-validations, the meta-test); the rest projected
TIME_RUNS = [("free", [], 1), ("free", [], 5), ("free", ["--first-order"], 1)]  # `bench.py time`: (method, flags, shots)
BANK_TASKS, BANK_TASK_SEED = 200, 7  # `bench.py bank`: tasks of each kind (as many as the quick preset validates on)
KD_ONLY = ("free", ["--max-replay", "0"])  # `bench.py kd`: the run whose meta-learner learns from KD + Eq. (3) alone
VAL_MARGIN = 3.0  # the quick preset's rounds: the fewest at which FREE's meta-val beats average's by this on every seed
JOBS, THREADS = 2, 1  # default runs at a time and torch threads per run (`bench.py time` runs alone, all threads)
# `bench.py gpu`: the paper preset on CIFAR-FS-shaped synthetic data (32x32x3), 1- and 5-shot, a few rounds timed
GPU_ROUNDS, GPU_WARMUP = 12, 2  # rounds timed (warm-up included; validation after the last): <= 8 min on one GPU
GPU_ZOO_EPOCHS = 1  # the 100 teachers train 1 epoch: a round's cost depends on their shape, not what they learned


def load_results():
    path = os.path.join(OUT, "results.json")
    return json.load(open(path)) if os.path.exists(path) else {}


README_MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")  # README.md includes results.md here


def compact_json(obj, indent=""):
    """JSON with one key per line, but a list that holds no object (a curve, a list of seeds) on one line."""
    inner = indent + " "
    if isinstance(obj, dict) and obj:
        items = (f"{inner}{json.dumps(k)}: {compact_json(v, inner)}" for k, v in obj.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        return "[\n" + ",\n".join(inner + compact_json(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj)


def save_results(results):
    """bench/results.json, bench/results.md, and the copy of results.md inside README.md."""
    os.makedirs(OUT, exist_ok=True)
    zoo.atomic_write(Path(OUT) / "results.json", lambda f: f.write(compact_json(results).encode()))
    md = report(results)
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(md)
    if os.path.exists("README.md"):
        text = open("README.md").read()
        start, end = README_MARKERS
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + start + "\n" + md + end + rest.split(end, 1)[1]
            with open("README.md.tmp", "w") as f:
                f.write(text)
            os.replace("README.md.tmp", "README.md")


# ------------------------------------------------------------------------ 1. recovery speed


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
    flip = ds.channels == 3

    def after_step(step, x):
        t_cb = time.perf_counter()
        with torch.no_grad():
            logits = teacher(x)
        row = {"step": step, "seconds": t_cb - t0 - traced[0],
               "teacher_acc": (logits.argmax(1) == recover.labels_Y(cfg.way, cfg.n_per_class, x.device)).float().mean().item()}
        if step in checkpoints:
            row["student_acc"] = student_accuracy(x, logits, *real, ds, seed=step)
        trace.append(row)
        traced[0] += time.perf_counter() - t_cb

    r = recover.recover_task(G, teacher, cfg.way, steps, cfg.n_per_class, cfg.gen_lr, flip=flip, meta_grad=False,
                             after_step=after_step)
    final = {"steps": steps, "seconds": r.seconds, "teacher_acc": r.teacher_acc,
             "student_acc": student_accuracy(r.x, r.teacher_logits, *real, ds, seed=0)}
    return final, trace


def bench_recovery(args):
    cfg = free.parse_args(["--dataset", "omniglot", "--preset", "quick", "--data-root", args.data_root,
                           "--n-teachers", str(META_TEACHERS + UNSEEN_TEACHERS), "--out", os.path.join(OUT, "tmp")])
    ds = load_dataset("omniglot", args.data_root)
    teachers = free.load_teachers(cfg, ds, torch.device("cpu"), print)
    seen, unseen = teachers[:META_TEACHERS], teachers[META_TEACHERS:]
    free.set_seed(cfg.seed)
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
        x_real = train.images[mask].float() / 255
        y_real = torch.tensor([t.classes.index(c) for c in train.labels[mask].tolist()])
        real = (x_real, y_real)
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
        row = {"teacher": t.index, "meta_k5": meta5, "meta_k0": meta0,
               "scratch": {str(s): at[s] for s in CHECKPOINTS},
               "match_teacher_acc": match_t, "match_student_acc": match_s}
        rows.append(row)
        print(f"unseen teacher {t.index}: meta k=5 {meta5['seconds']:.2f}s teacher {meta5['teacher_acc']:.3f} "
              f"student {meta5['student_acc']:.3f} | scratch 200 {at[200]['seconds']:.1f}s teacher "
              f"{at[200]['teacher_acc']:.3f} student {at[200]['student_acc']:.3f} | match(teacher) "
              f"{match_t['step'] if match_t else '>' + str(SCRATCH_BUDGET)} match(student) "
              f"{match_s['step'] if match_s else '>' + str(SCRATCH_BUDGET)}", flush=True)
    results = load_results()
    results["recovery"] = {"rows": rows, "meta_rounds": META_ROUNDS, "meta_teachers": META_TEACHERS,
                           "nf": cfg.nf, "k": cfg.k, "images": cfg.way * cfg.n_per_class,
                           "scratch_budget": SCRATCH_BUDGET, "student_steps": STUDENT_STEPS,
                           "meta_training_seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}
    save_results(results)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def recovery_md(rec):
    rows = rec["rows"]
    med = lambda f: median([f(r) for r in rows])
    lines = [f"### Recovery speed (Omniglot, {len(rows)} teachers the meta-generator never saw; medians)", "",
             f"Meta-generator meta-trained for {rec['meta_rounds']} rounds on {rec['meta_teachers']} other teachers "
             f"(nf = {rec['nf']}, {rec['images']} images a task). Student = fresh Conv4 distilled from the recovered "
             f"images alone ({rec['student_steps']} Adam steps), measured on the teacher's real images. Times: "
             f"{rec['torch_threads']} torch thread(s), the benchmark alone on the CPU.", "",
             "| recovery | time (s) | teacher acc. on recovered | student acc. on real images |",
             "|---|---|---|---|"]
    for name, f in [(f"meta-generator, k = {rec['k']}", lambda r: r["meta_k5"]),
                    ("meta-generator, k = 0", lambda r: r["meta_k0"])] + \
                   [(f"from scratch, {s} steps", (lambda s: lambda r: r["scratch"][str(s)])(s)) for s in CHECKPOINTS]:
        lines.append(f"| {name} | {med(lambda r: f(r)['seconds']):.2f} | {100 * med(lambda r: f(r)['teacher_acc']):.1f}% "
                     f"| {100 * med(lambda r: f(r)['student_acc']):.1f}% |")
    lines.append("")
    for key, what in [("match_teacher_acc", "teacher accuracy on recovered images"),
                      ("match_student_acc", "student accuracy on real images")]:
        matched = [r for r in rows if r[key]]
        ratios = [r[key]["seconds"] / r["meta_k5"]["seconds"] for r in matched]
        lost = len(rows) - len(matched)
        text = (f"from scratch matched it in a median of {median([r[key]['step'] for r in matched]):.0f} steps on "
                f"{len(matched)}/{len(rows)} teachers; time ratio at equal quality: median {median(ratios):.1f}x"
                if matched else "from scratch never matched it")
        if lost:
            text += f"; on {lost} teacher(s) it did not match within {rec['scratch_budget']} steps " \
                    f"(> {median([r['scratch'][str(rec['scratch_budget'])]['seconds'] / r['meta_k5']['seconds'] for r in rows if not r[key]]):.0f}x)"
        lines.append(f"- Equal {what} to the meta-generator's k = {rec['k']}: {text}.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ 2. accuracy over seeds


def label(method, flags):
    return " ".join([method] + flags)


def run_name(method, flags, shots):
    return "-".join([f"omniglot-{shots}shot", method] + [f.lstrip("-") for f in flags])


def seed_flags(seed):
    return ["--seed", str(seed)] if seed else []


def seed_jobs(shots, only=None, seeds=SEEDS):
    """(method, flags + seed flags, shots) for every SEED_RUNS entry and seed, in running order."""
    return [(m, f + seed_flags(seed), s) for m, f, s in SEED_RUNS for seed in seeds
            if s in shots and (not only or label(m, f) in only)]


def target_rounds(method, flags):
    """The rounds a run of `bench.py` asks for: its --rounds flag, else the quick preset's; 0 for untrained baselines."""
    if method not in free.TRAINED:
        return 0
    return int(flags[flags.index("--rounds") + 1]) if "--rounds" in flags else QUICK_ROUNDS


def run_one(method, flags, shots, args, threads=-1, name=None):
    """One free.py run (subprocess); cached: a finished run is read back, an interrupted one resumed, and a
    finished one shorter than the rounds asked for continued to them (`free.py --resume --rounds`)."""
    out = os.path.join(OUT, "runs", name or run_name(method, flags, shots))
    res_path = os.path.join(out, "results.json")
    how = "ran"
    if os.path.exists(res_path):
        res = json.load(open(res_path))
        if res["rounds"] >= target_rounds(method, flags):
            return res, "cached"
        how = f"continued from {res['rounds']} rounds"
    cmd = [sys.executable, "free.py", "--dataset", "omniglot", "--data-root", args.data_root, "--preset", "quick",
           "--shots", str(shots), "--method", method, *flags, "--out", out, "--device", "cpu"]
    if os.path.exists(os.path.join(out, "last.pt")):
        cmd.append("--resume")
    threads = args.threads if threads == -1 else threads
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stdout.txt"), "a") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
    return json.load(open(res_path)), how


def teacher_accuracy_under_A(teachers, ds):
    """Mean accuracy of each teacher on its own real meta-train images, as they are and through A(.) of
    Eq. (1) (the crop, and flips where A flips): what recovery asks a teacher to be invariant to."""
    train, plain, augmented = ds.splits["train"], [], []
    g = torch.Generator().manual_seed(0)
    for t in teachers:
        mask = torch.isin(train.labels, torch.tensor(t.classes))
        x = train.images[mask].float() / 255
        y = torch.tensor([t.classes.index(c) for c in train.labels[mask].tolist()])
        with torch.no_grad():
            plain.append(maml.accuracy(t.model(x), y).item())
            xa = recover.augment(x, flip=free.mirror_invariant(ds), generator=g)
            augmented.append(maml.accuracy(t.model(xa), y).item())
    return {"held_out": statistics.mean(t.acc for t in teachers), "own_images": statistics.mean(plain),
            "own_images_under_A": statistics.mean(augmented), "teachers": len(teachers)}


def build_quick_zoo(args, seed, results):
    """The quick preset's teacher zoo of `seed`, built (or read from the cache) once before parallel runs
    share it; records the teachers' accuracy on their own images with and without A(.)."""
    cfg = free.parse_args(["--dataset", "omniglot", "--preset", "quick", "--data-root", args.data_root,
                           "--seed", str(seed)])
    ds = load_dataset("omniglot", args.data_root)
    teachers = free.load_teachers(cfg, ds, torch.device("cpu"), print)
    store(results, "teachers", str(seed), teacher_accuracy_under_A(teachers, ds))


def run_line(name, res, how):
    """One finished run, as bench.py prints it: test accuracy, wall time, and whether it ran or was cached."""
    return f"{name}: {res['test_acc']:.2f} ± {res['test_ci95']:.2f}  {res['wall_seconds']:.0f}s  ({how})"


def store(results, key, name, value):
    """results[key][name] = value, and rewrite results.json/.md. results.json is read again first (and `results`
    refreshed from it), so what another bench.py process stored since this one loaded it is kept: two
    `bench.py seeds` may run at once."""
    fresh = load_results()
    fresh.setdefault(key, {})[name] = value
    results.clear()
    results.update(fresh)
    save_results(results)


def record(results, key, job, res, how, name=None):
    """Store one run's results under results[key] (`store`) and print it."""
    name = name or run_name(*job)
    store(results, key, name, res)
    print(run_line(name, res, how), flush=True)


def bench_seeds(args):
    """Every method and ablation over SEEDS, args.jobs runs at a time with args.threads threads each."""
    results = load_results()
    for seed in SEEDS:
        build_quick_zoo(args, seed, results)
    jobs = seed_jobs(args.shots, args.only, args.seeds)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, *job, args): job for job in jobs}
        for fut in concurrent.futures.as_completed(futures):
            record(results, "seeds", futures[fut], *fut.result())
    copy_recovered_grid(results)


def bench_time(args):
    """The quick preset's time: FREE seed 0, 1- and 5-shot, each alone with every thread (zoo cached), timed
    for TIME_ROUNDS rounds (and FOMAML replay at 1-shot, the cheaper replay); the report projects a whole
    quick run from the times of each phase."""
    results = load_results()
    build_quick_zoo(args, 0, results)
    for method, flags, shots in TIME_RUNS:
        if shots in args.shots:
            name = time_name(method, flags, shots)
            res, how = run_one(method, flags + ["--rounds", str(TIME_ROUNDS)], shots, args, threads=None, name=name)
            record(results, "time", (method, flags, shots), res, how, name=name)


def time_name(method, flags, shots):
    return "time-" + run_name(method, flags, shots)


def long_name(rounds, seed):
    return f"rounds{rounds}-" + run_name("free", seed_flags(seed), 1)


LONG_RUN = re.compile(r"rounds(\d+)-" + re.escape(run_name("free", [], 1)) + r"(-seed-\d+)?")  # a long_name


def finished_rounds(path):
    """The rounds of the finished run in `path`, or 0 if it has not finished."""
    res = os.path.join(path, "results.json")
    return json.load(open(res))["rounds"] if os.path.exists(res) else 0


LAST_ROUND = re.compile(r"^round +(\d+) ", re.M)  # a round's line in log.txt


def collect_unfinished(results):
    """results["unfinished"] = {run name: last round in its log.txt} for every trained `bench.py seeds` run that
    has started but not reached the rounds it asks for (interrupted, or being continued)."""
    results["unfinished"] = {}
    for m, f, s in seed_jobs((1, 5)):
        out = os.path.join(OUT, "runs", run_name(m, f, s))
        log = os.path.join(out, "log.txt")
        if m in free.TRAINED and os.path.exists(log) and finished_rounds(out) < target_rounds(m, f):
            logged = LAST_ROUND.findall(open(log).read())
            results["unfinished"][run_name(m, f, s)] = int(logged[-1]) if logged else 0


def longest_before(seed, rounds):
    """The finished FREE 1-shot run of `seed` with the most rounds below `rounds`: the quick preset's run of
    `bench.py seeds` or a `bench.py rounds` run; None if there is none (the run then starts from round 0)."""
    runs = os.path.join(OUT, "runs")
    listed = os.listdir(runs) if os.path.isdir(runs) else ()
    mine = [run_name("free", seed_flags(seed), 1)] + [
        n for n in listed if (m := LONG_RUN.fullmatch(n)) and n == long_name(int(m.group(1)), seed)]
    length = {n: finished_rounds(os.path.join(runs, n)) for n in mine}
    shorter = [n for n in mine if 0 < length[n] < rounds]
    return os.path.join(runs, max(shorter, key=length.get)) if shorter else None


def continue_run(src, dst):
    """Seed a longer run with a finished shorter one (`longest_before`): its last.pt (the state after its last round),
    best.pt, config.json and log.txt; free.py --resume --rounds R then carries on from there, exactly as an
    uninterrupted R-round run would (test_run checks that a resumed run equals an uninterrupted one)."""
    if os.path.exists(os.path.join(dst, "last.pt")):
        return
    if not os.path.exists(os.path.join(src, "results.json")):
        raise UserError(f"bench.py rounds continues finished runs; {src} has not finished")
    os.makedirs(dst, exist_ok=True)
    for f in ("config.json", "log.txt", "best.pt", "last.pt"):  # last.pt last: its presence means "copied"
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


VAL_LINE = re.compile(r"^round +(\d+) val ([\d.]+) ± ([\d.]+)", re.M)
REPLAY_LINE = re.compile(r"^round +(\d+) train .*replay_acc ([\d.]+)", re.M)
REPLAY_WINDOW = 10  # rounds over which the replay accuracy is averaged (it varies from meta-batch to meta-batch)


def log_curves(out):
    """From a run's log.txt: val_curve [[round, meta-val accuracy, 95% CI], ...] (every meta-validation it
    made) and replay_curve [[round, MAML replay query accuracy], ...] (its training rounds)."""
    log = open(os.path.join(out, "log.txt")).read()
    return dict(val_curve=[[int(r), float(a), float(c)] for r, a, c in VAL_LINE.findall(log)],
                replay_curve=[[int(r), float(a)] for r, a in REPLAY_LINE.findall(log)])


def replay_window(replay_curve, rounds):
    """The replay accuracies of a run's REPLAY_WINDOW rounds up to `rounds`."""
    return [a for r, a in replay_curve if rounds - REPLAY_WINDOW < r <= rounds]


def collect_long(results):
    """Read every finished `bench.py rounds` run back from bench/runs into results["rounds"]."""
    runs = os.path.join(OUT, "runs")
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else ():
        path = os.path.join(runs, name, "results.json")
        if LONG_RUN.fullmatch(name) and os.path.exists(path):
            results.setdefault("rounds", {})[name] = dict(json.load(open(path)), **log_curves(os.path.join(runs, name)))


def bench_rounds(args):
    """FREE 1-shot, seeds args.seeds (default 0-2), run to args.rounds rounds (args.jobs at a time), each continuing
    the longest finished shorter run of its seed: is it still learning, and when does it pass averaging the
    teachers on meta-validation?"""
    names = {seed: long_name(args.rounds, seed) for seed in args.seeds}
    for seed, name in names.items():
        src = longest_before(seed, args.rounds)
        if src:  # else the run starts from round 0
            continue_run(src, os.path.join(OUT, "runs", name))
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, "free", ["--rounds", str(args.rounds)] + seed_flags(seed), 1, args,
                               name=name): name for seed, name in names.items()}
        for fut in concurrent.futures.as_completed(futures):
            print(run_line(futures[fut], *fut.result()), flush=True)
    results = load_results()  # runs of another bench.py may have finished meanwhile
    collect_long(results)
    save_results(results)


def copy_recovered_grid(results):
    """bench/recovered.png, shown in the README: the recovered images of FREE 1-shot, seed 0."""
    grid = os.path.join(OUT, "runs", run_name("free", [], 1), "recovered.png")
    if os.path.exists(grid):
        shutil.copyfile(grid, os.path.join(OUT, "recovered.png"))


def spread(xs):
    """'mean ± std (n)' over seeds; std is the sample std across seeds (training noise)."""
    if len(xs) < 2:
        return f"{xs[0]:.2f} (n = 1)" if xs else "–"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} (n = {len(xs)})"


def per_seed(seeds, method, flags, shots):
    """{seed: results} of the finished runs of one SEED_RUNS entry at the quick preset's rounds (a shorter run
    waits to be continued)."""
    found = {seed: seeds.get(run_name(method, flags + seed_flags(seed), shots)) for seed in SEEDS}
    return {seed: r for seed, r in found.items() if r and r.get("rounds", 0) >= target_rounds(method, flags)}


def paired(seeds, a, b, shots):
    """Per-seed differences a - b (same seed: same zoo and tasks), over seeds where both ran."""
    ra, rb = per_seed(seeds, *a, shots), per_seed(seeds, *b, shots)
    return [ra[s]["test_acc"] - rb[s]["test_acc"] for s in SEEDS if s in ra and s in rb]


def seeds_md(seeds, teachers=None, unfinished=None):
    runs = []
    for m, f, _ in SEED_RUNS:
        if (m, f) not in runs:
            runs.append((m, f))
    lines = [f"### Accuracy over seeds (Omniglot, Conv4, 5-way, quick preset: {QUICK_ROUNDS} rounds, seeds "
             f"{', '.join(map(str, SEEDS))})", "",
             "`python bench.py seeds`. Each seed reseeds the whole pipeline (teacher zoo, generator, meta-learner, task "
             "sampling); the 600 test tasks are the same for every run. A cell is the mean ± std across seeds "
             "(training noise); the per-seed table gives each run's test-task 95% CI. '–': not run yet at the preset's "
             "rounds (the same command runs, resumes or continues what is missing).", "",
             "| method | 1-shot | 5-shot | wall s, mean (1/5-shot) | paper, CIFAR-FS (1/5-shot) |", "|---|---|---|---|---|"]
    for m, f in runs:
        cells, walls = [], []
        for s in (1, 5):
            r = per_seed(seeds, m, f, s)
            cells.append(spread([x["test_acc"] for x in r.values()]))
            walls.append(f"{statistics.mean(x['wall_seconds'] for x in r.values()):.0f}" if r else "–")
        paper = PAPER_CIFARFS.get(label(m, f))
        lines.append(f"| {label(m, f)} | {cells[0]} | {cells[1]} | {' / '.join(walls)} | "
                     f"{f'{paper[0]} / {paper[1]}' if paper else '–'} |")
    lines += ["", "| run | " + " | ".join(f"seed {s}" for s in SEEDS) + " | threads |", "|---|" + "---|" * (len(SEEDS) + 1)]
    for m, f, s in SEED_RUNS:
        r = per_seed(seeds, m, f, s)
        if r:
            cells = [f"{r[x]['test_acc']:.2f} ± {r[x]['test_ci95']:.2f}" if x in r else "–" for x in SEEDS]
            threads = sorted({str(x.get("torch_threads", "?")) for x in r.values()})
            lines.append(f"| {label(m, f)}, {s}-shot | " + " | ".join(cells) + f" | {'/'.join(threads)} |")
    lines.append("")
    started = [f"`{label(m, f)}` {s}-shot seed {seed} at round {unfinished[name]} of {target_rounds(m, f)}"
               for m, f, s in SEED_RUNS for seed in SEEDS
               if (name := run_name(m, f + seed_flags(seed), s)) in (unfinished or {})
               and seed not in per_seed(seeds, m, f, s)]
    if started:
        lines.append(f"- Not finished when the report was written (`bench.py seeds` resumes them): {'; '.join(started)}.")
    for s in (1, 5):
        for other in ("average", "random"):
            d = paired(seeds, ("free", []), (other, []), s)
            if d:
                lines.append(f"- {s}-shot, FREE − {other}: per seed {', '.join(f'{x:+.2f}' for x in d)}; mean "
                             f"{statistics.mean(d):+.2f}, positive on {sum(x > 0 for x in d)}/{len(d)} seeds.")
        f_, r_, m_ = (per_seed(seeds, m, [], s) for m in ("free", "random", "maml"))
        both = [x for x in SEEDS if x in f_ and x in r_ and x in m_]
        if both:
            gap = [100 * (f_[x]["test_acc"] - r_[x]["test_acc"]) / (m_[x]["test_acc"] - r_[x]["test_acc"]) for x in both]
            lines.append(f"- {s}-shot, share of the gap from random init to data-based MAML that FREE closes: "
                         f"{statistics.mean(gap):.0f}% (mean over {len(both)} seed{'s' if len(both) > 1 else ''}).")
    for flags, what in COMPONENTS.items():
        d = paired(seeds, ("free", []), ("free", flags.split()), 1)
        if d:
            avg = statistics.mean(d)
            verdict = "helps" if avg > 0 else "does not help"
            scatter = ""
            if len(d) > 1:  # is the mean larger than the seed-to-seed scatter of the difference?
                sd = statistics.stdev(d)
                scatter = f", std {sd:.2f}, {'outside' if abs(avg) > sd else 'within'} its spread across seeds"
            replay = ""
            ra, rb = per_seed(seeds, "free", [], 1), per_seed(seeds, "free", flags.split(), 1)
            both = [x for x in SEEDS if "replay_acc" in ra.get(x, {}) and "replay_acc" in rb.get(x, {})]
            if both:
                replay = (f" Replay accuracy on bank tasks, last {REPLAY_WINDOW} rounds, mean over seeds "
                          f"{', '.join(map(str, both))}: {statistics.mean(rb[x]['replay_acc'] for x in both):.3f} "
                          f"against FREE's {statistics.mean(ra[x]['replay_acc'] for x in both):.3f}.")
            lines.append(f"- 1-shot, {what}: FREE − `free {flags}` per seed {', '.join(f'{x:+.2f}' for x in d)}; "
                         f"mean {avg:+.2f} ({verdict} on the mean{scatter}; positive on "
                         f"{sum(x > 0 for x in d)}/{len(d)} seeds).{replay}")
    if teachers:
        t = [teachers[k] for k in sorted(teachers)]
        lines.append(f"- Teachers ({t[0]['teachers']} per seed, trained with the crop of A(.)): held-out accuracy "
                     f"{100 * statistics.mean(x['held_out'] for x in t):.1f}%; on their own meta-train images "
                     f"{100 * statistics.mean(x['own_images'] for x in t):.1f}% as they are, "
                     f"{100 * statistics.mean(x['own_images_under_A'] for x in t):.1f}% through A(.) "
                     f"(mean over seeds {', '.join(sorted(teachers))}).")
    return "\n".join(lines) + "\n"


def rounds_md(long, seeds, timed=None):
    """Meta-validation by round of FREE 1-shot continued past the quick preset, against `average` on the
    same validation tasks, and, for each length run, the test accuracy of its best meta-validation checkpoint."""
    by_length, longest = {}, {}  # {rounds: {seed: results}}, {seed: its longest run}
    for r in sorted(long.values(), key=lambda r: r["rounds"]):
        by_length.setdefault(r["rounds"], {})[r["seed"]] = r
        longest[r["seed"]] = r  # its log holds every validation since round 1
    if not by_length:
        return ""
    quick = per_seed(seeds, "free", [], 1)
    if quick:
        by_length = {next(iter(quick.values()))["rounds"]: quick, **by_length}  # the quick preset's own runs first
    avg = per_seed(seeds, "average", [], 1)
    lines = ["### FREE 1-shot by run length (`python bench.py rounds`)", "",
             "Each length continues the longest finished shorter run of its seed (`free.py --resume --rounds R`: the "
             "state an uninterrupted R-round run would have; the quick preset's runs of `bench.py seeds` are among "
             "them), one thread each; other runs shared the two cores, so the wall times (every process of a run, "
             "summed) overstate a run alone. Meta-validation accuracy (the same 200 tasks each time) by round; "
             "`average` is the untrained baseline on the same validation tasks. A test row is the best "
             "meta-validation checkpoint of an R-round run, tested once; replay_acc is MAML replay's query accuracy "
             f"on memory-bank tasks (chance 0.2), the mean of the {REPLAY_WINDOW} rounds up to R.", "",
             "| | " + " | ".join(f"seed {s}" for s in SEEDS) + " |", "|---|" + "---|" * len(SEEDS)]
    val = {s: {p[0]: p for p in r["val_curve"]} for s, r in longest.items()}  # {seed: {round: [round, acc, ci]}}
    points = sorted({pt for v in val.values() for pt in v})  # every validation round of any seed
    for pt in points:
        cells = [f"{val[s][pt][1]:.2f} ± {val[s][pt][2]:.2f}" if pt in val.get(s, {}) else "–" for s in SEEDS]
        lines.append(f"| FREE val, round {pt} | " + " | ".join(cells) + " |")
    lines.append("| average val | " + " | ".join(
        f"{avg[s]['best_val_acc']:.2f}" if avg.get(s, {}).get("best_val_acc") is not None else "–" for s in SEEDS) + " |")
    summary = []
    ahead = [pt for pt in points if all(
        pt in val.get(s, {}) and avg.get(s, {}).get("best_val_acc") is not None
        and val[s][pt][1] - avg[s]["best_val_acc"] >= VAL_MARGIN for s in SEEDS)]
    if ahead:
        summary.append(f"- Meta-validation: the fewest rounds at which FREE beats `average` by {VAL_MARGIN:.0f} points "
                       f"or more on every seed: {ahead[0]} (the quick preset runs {QUICK_ROUNDS}).")
    for rounds, runs in sorted(by_length.items()):
        lines.append(f"| FREE test, {rounds} rounds | " + " | ".join(
            f"{runs[s]['test_acc']:.2f} ± {runs[s]['test_ci95']:.2f}" if s in runs else "–" for s in SEEDS) + " |")
        diff = {s: runs[s]["test_acc"] - avg[s]["test_acc"] for s in SEEDS if s in runs and s in avg}
        lines.append(f"| FREE − average, test, {rounds} rounds | " + " | ".join(
            f"{diff[s]:+.2f}" if s in diff else "–" for s in SEEDS) + " |")
        replay = {s: replay_window(longest[s].get("replay_curve", []), rounds) for s in longest}
        lines.append(f"| replay_acc, rounds {rounds - REPLAY_WINDOW + 1}-{rounds} | " + " | ".join(
            f"{statistics.mean(replay[s]):.3f}" if replay.get(s) else "–" for s in SEEDS) + " |")
        lines.append(f"| wall s, {rounds} rounds | " + " | ".join(
            f"{runs[s]['wall_seconds']:.0f}" if s in runs else "–" for s in SEEDS) + " |")
        if diff:
            d = list(diff.values())
            alone = ""
            if timed:  # the 1-shot run of `bench.py time`: its round, validation and test times, at this length
                cfg = free.parse_args(["--dataset", "omniglot", "--preset", "quick", "--rounds", str(rounds)])
                alone = (f" Alone on this CPU: {projected_seconds(timed, cfg) / 60:.0f} min (projected from the "
                         f"times of `bench.py time`).")
            summary.append(f"- {rounds} rounds, FREE − average (test): mean {statistics.mean(d):+.2f}, positive on "
                           f"{sum(x > 0 for x in d)}/{len(d)} seeds; FREE {spread([runs[s]['test_acc'] for s in runs])}."
                           + alone)
    return "\n".join(lines + [""] + summary) + "\n"


def time_md(timed):
    """The quick preset's time alone and where it goes (per-phase seconds that free.py records), and a full quick
    run projected from them when the timed run is shorter than the preset."""
    quick = free.parse_args(["--dataset", "omniglot", "--preset", "quick"])
    labels = {time_name(m, f, s): label(m, f) for m, f, s in TIME_RUNS}
    lines = ["### Quick preset: time alone on this 2-core CPU (FREE, seed 0, zoo cached; `python bench.py time`)", "",
             f"| run | shots | rounds | wall s | threads | warm-up round s | round s | of which recovery / KD + Eq. (3) / "
             f"replay | validation s (each) | meta-test s | test accuracy | {quick.rounds} rounds alone, projected |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(timed.items()):
        phases = [r.get(k) for k in ROUND_PHASES.values()]
        split = " / ".join(f"{p:.2f}" for p in phases) if all(p is not None for p in phases) else "–"
        lines.append(f"| {labels.get(name, name)} | {r['shots']} | {r['rounds']} | {r['wall_seconds']:.0f} | "
                     f"{r.get('torch_threads', '?')} | "
                     f"{r['seconds_per_warmup_round']:.2f} | {r['seconds_per_round']:.2f} | {split} | "
                     f"{r['seconds_per_validation']:.1f} | {r['test_seconds']:.1f} | "
                     f"{r['test_acc']:.2f} ± {r['test_ci95']:.2f} | {projected_seconds(r, quick) / 60:.0f} min |")
    lines.append("")
    for name, r in sorted(timed.items()):
        phases = projected_phases(r, quick)
        total = sum(phases.values())
        shares = ", ".join(f"{k} {v:.0f} s ({100 * v / total:.0f}%)" for k, v in phases.items() if v >= 0.5)  # not "0 s"
        lines.append(f"- {labels.get(name, name)}, {r['shots']}-shot, a {quick.rounds}-round run alone, projected: "
                     f"{total:.0f} s = {shares}.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ 3. why replay is weak; KD alone


def finished_run_state(what, method, flags, seed):
    """last.pt of a finished 1-shot run of `bench.py seeds` (what `bench.py bank` and `bench.py kd` examine); an
    unfinished run is a UserError that names the command making it."""
    run = os.path.join(OUT, "runs", run_name(method, flags + seed_flags(seed), 1))
    if finished_rounds(run) < QUICK_ROUNDS:
        raise UserError(f"{what}: {run} is not a finished {QUICK_ROUNDS}-round run; run `bench.py seeds --shots 1 "
                        f"--only {shlex.quote(label(method, flags))}` first")
    return zoo.load_checkpoint(os.path.join(run, "last.pt"), UserError, f"{what}:", "rerun `bench.py seeds`")


def cross_teacher_agreement(teachers, G, student, cfg, ds):
    """Each teacher A's task recovered as a training round recovers it (k steps from the run's meta-generator,
    L_adv against the run's meta-learner); every other teacher B that shares a class c with A labels A's
    recovered images of c, and real meta-train images of c. Means over (A, B, c) triples, and A's own accuracy."""
    train, flip = ds.splits["train"], free.mirror_invariant(ds)
    with torch.no_grad():  # each teacher on the real images of each of its classes, once
        on_real = {(i, c): maml.accuracy(b.model(train.images[train.labels == c].float() / 255), j).item()
                   for i, b in enumerate(teachers) for j, c in enumerate(b.classes)}
    own, other, real = [], [], []
    for a in teachers:
        r = recover.recover_task(G, a.model, cfg.way, cfg.k, cfg.n_per_class, cfg.gen_lr, student=student,
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
    """Why MAML replay on the memory bank is a weak signal, measured on each seed's quick-preset FREE 1-shot run:
    (1) do teachers that share a class recognise each other's recovered images of it (the bank merges them)?
    (2) how hard are bank tasks for a meta-learner that is good on real tasks (data-based MAML's best.pt)?"""
    results, cpu = load_results(), torch.device("cpu")
    ds = load_dataset("omniglot", args.data_root)
    for seed in args.seeds:
        flags = seed_flags(seed)
        cfg = free.parse_args(["--dataset", "omniglot", "--preset", "quick", "--data-root", args.data_root, *flags])
        state = finished_run_state("bank", "free", [], seed)
        teachers = free.load_teachers(cfg, ds, cpu, lambda line: None)
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
            best = zoo.load_checkpoint(os.path.join(OUT, "runs", run_name(method, flags, 1), "best.pt"), UserError,
                                       "bank:", f"rerun `bench.py seeds --only {method}`")
            model.load_state_dict(best["model"])
            for kind, t in tasks.items():
                row[f"{method}_on_{kind}"] = replay_accuracy(model, t, cfg)
        row.update(bank_classes=len(bank.classes()), teachers_per_class=statistics.mean(
            sum(c in t.classes for t in teachers) for c in bank.classes()))
        store(results, "bank", str(seed), row)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)


def bank_md(bank):
    seeds = sorted(bank)
    rows = [("teacher A, on its own recovered images (k = 5; mean over teachers)", "own"),
            ("teacher B sharing a class with A, on A's recovered images of it", "other"),
            ("teacher B, on real images of that class", "other_real"),
            ("FREE's best.pt, on bank tasks", "free_on_bank"),
            ("FREE's best.pt, on real meta-train tasks", "free_on_real"),
            ("data-based MAML's best.pt, on bank tasks", "maml_on_bank"),
            ("data-based MAML's best.pt, on real meta-train tasks", "maml_on_real")]
    lines = ["### Why replay is a weak signal (`python bench.py bank`)", "",
             f"On the memory bank and meta-generator of each seed's quick-preset FREE 1-shot run (its last.pt). Teacher "
             f"rows: accuracy on the images of one class (chance 20%), mean over every (teacher A, other teacher B, "
             f"shared class) triple; the bank keeps images under the real class, so a class's images come from "
             f"every teacher that holds it. Model rows: query accuracy after replay's inner loop ({free.Config.train_inner_steps} steps) "
             f"on {BANK_TASKS} 5-way 1-shot tasks drawn as replay draws them, from the bank or from real meta-train "
             f"images.", "", "| | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    for name, key in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * bank[s][key]:.1f}%" for s in seeds) + " |")
    lines.append(f"| teachers holding a bank class (mean) | " +
                 " | ".join(f"{bank[s]['teachers_per_class']:.1f}" for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def combine(body, head):
    """A meta-learner state dict: every entry of `body` but the linear head's, which come from `head`
    (a zero head if None: adaptation then starts from the body's features alone)."""
    return {k: v if not k.startswith("head.") else head[k] if head is not None else torch.zeros_like(v)
            for k, v in body.items()}


KD_ROWS = [  # `bench.py kd`: (row, body, head): theta_0 at the run's start, after KD alone, after FREE
    ("initial θ_0 (random init)", "init", "init"),
    ("initial body, head zeroed", "init", None),
    ("initial body, KD-only run's head", "init", "kd"),
    ("KD-only run", "kd", "kd"),
    ("KD-only body, head zeroed", "kd", None),
    ("KD-only body, initial head", "kd", "init"),
    ("FREE", "free", "free"),
    ("FREE's body, head zeroed", "free", None),
]


def swapped_accuracies(theta, accuracy):
    """{row: accuracy(state)} for every KD_ROWS row, its state made of theta[body]'s body and theta[head]'s head."""
    return {name: accuracy(combine(theta[body], theta[head] if head else None)) for name, body, head in KD_ROWS}


def bench_kd(args):
    """What KD and Eq. (3) alone do to theta (the `free --max-replay 0` runs end below their own start on
    meta-validation): each seed's initial theta_0 (the start every run of that seed shares: free.main reseeds,
    then builds the meta-learner first), and the KD-only run's and FREE's theta after QUICK_ROUNDS rounds
    (last.pt), bodies and heads paired as KD_ROWS lists, on the meta-validation tasks."""
    results, cpu = load_results(), torch.device("cpu")
    ds = load_dataset("omniglot", args.data_root)
    for seed in args.seeds:
        flags = seed_flags(seed)
        cfg = free.parse_args(["--dataset", "omniglot", "--preset", "quick", "--data-root", args.data_root, *flags])
        free.set_seed(cfg.seed)
        theta = {"init": free.new_meta_learner(ds, cfg, cpu).state_dict()}
        for key, (method, run_flags) in {"kd": KD_ONLY, "free": ("free", [])}.items():
            theta[key] = finished_run_state("kd", method, run_flags, seed)["model"]
        model = free.new_meta_learner(ds, cfg, cpu)

        def val_accuracy(state):
            model.load_state_dict(state)
            return free.evaluate(cfg, model, maml.detached_params(model), ds.splits["val"], cfg.val_tasks,
                                 free.VAL_TASK_SEED, cpu)[0]

        row = swapped_accuracies(theta, val_accuracy)
        store(results, "kd", str(seed), row)
        print(f"seed {seed}: " + ", ".join(f"{name} {acc:.2f}" for name, acc in row.items()), flush=True)


def kd_md(kd):
    seeds = sorted(kd)
    lines = ["### What KD alone does to θ (`python bench.py kd`)", "",
             f"Meta-validation accuracy (the {free.PRESETS['quick']['val_tasks']} tasks every run validates on, "
             f"{free.Config.test_inner_steps} adaptation steps) of each seed's initial θ_0 (the start that seed's "
             f"runs share: the `random` baseline), of the `{label(*KD_ONLY)}` run (KD and Eq. (3), no replay) and "
             f"of FREE, both after {QUICK_ROUNDS} rounds (last.pt). A row pairs the convolutional body "
             f"(convolutions and BatchNorm) of one with the linear head of another, or with a zeroed head.", "",
             "| body, head | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, _, _ in KD_ROWS:
        lines.append(f"| {name} | " + " | ".join(f"{kd[s][name]:.2f}" for s in seeds) + " |")
    lines.append("")
    for what, name in (("body alone", "KD-only body, initial head"), ("head alone", "initial body, KD-only run's head"),
                       ("body and head", "KD-only run")):
        d = [kd[s][name] - kd[s][KD_ROWS[0][0]] for s in seeds]  # minus theta_0 as it starts
        lines.append(f"- The KD-only run's {what} ({name}) − initial θ_0: per seed "
                     + ", ".join(f"{x:+.2f}" for x in d) + f"; mean {statistics.mean(d):+.2f}.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ 4. GPU timing


def bench_gpu(args, device="cuda", extra=()):
    """Time the paper preset (Config defaults: 100 teachers, B = 4, k = 5, nf = 64, replay patience 10,
    600 validation and test tasks) on CIFAR-FS-shaped synthetic data, 1- and 5-shot: GPU_ROUNDS rounds,
    each phase timed, then project the paper's 1000 rounds. `device`/`extra` let the test run it on
    the CPU with tiny counts (later flags override earlier ones)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("bench.py gpu needs a CUDA device; none is available here")
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    runs = {}
    for shots in args.shots:
        out = os.path.join(OUT, "runs", f"gpu-paper-synthetic-{shots}shot")
        argv = ["--dataset", "synthetic", "--preset", "paper", "--shots", str(shots), "--rounds", str(GPU_ROUNDS),
                "--warmup", str(GPU_WARMUP), "--eval-every", str(GPU_ROUNDS), "--zoo-epochs", str(GPU_ZOO_EPOCHS),
                "--device", device, "--out", out, "--cache", os.path.join(OUT, "cache"), *extra]
        path = os.path.join(out, "results.json")
        res = json.load(open(path)) if os.path.exists(path) else free.main(argv)
        runs[str(shots)] = dict({k: res[k] for k in GPU_FIELDS}, projected_minutes=projected_seconds(
            res, free.Config(shots=shots)) / 60, command="python free.py " + " ".join(argv))
        print(f"gpu {shots}-shot: {res['seconds_per_round']:.2f} s/round, projected "
              f"{runs[str(shots)]['projected_minutes']:.1f} min for the paper's run", flush=True)
    results = load_results()  # read after the runs: another bench.py may have stored runs meanwhile
    results["gpu"] = {"card": card, "torch": torch.__version__, "runs": runs}
    save_results(results)


GPU_FIELDS = ("seconds_per_warmup_round", "seconds_per_round", "seconds_per_round_recovery", "seconds_per_round_kd",
              "seconds_per_round_replay", "seconds_per_validation", "test_seconds", "peak_memory_mb")


def projected_phases(res, cfg):
    """A full run of `cfg` at a short run's measured speeds, by phase in seconds: warm-up rounds; the training
    rounds' recovery, KD with Eq. (3), replay, and the rest of a round (memory bank, logging, checkpoints);
    every meta-validation; the meta-test. The teacher zoo is trained once and cached, so not counted."""
    validations = sum(free.is_validation_round(cfg, r) for r in range(1, cfg.rounds + 1))
    train = cfg.rounds - cfg.warmup
    phases = {"warm-up": cfg.warmup * res["seconds_per_warmup_round"]}
    if all(k in res for k in ROUND_PHASES.values()):
        phases.update({name: train * res[k] for name, k in ROUND_PHASES.items()})
        phases["rest of a round"] = train * (res["seconds_per_round"] - sum(res[k] for k in ROUND_PHASES.values()))
    else:  # a run older than the per-phase record
        phases["training rounds"] = train * res["seconds_per_round"]
    phases["meta-validation"] = validations * res["seconds_per_validation"]
    phases["meta-test"] = res["test_seconds"]
    return phases


def projected_seconds(res, cfg):
    """A full run of `cfg` at a short run's measured speeds (the sum of `projected_phases`)."""
    return sum(projected_phases(res, cfg).values())


def gpu_md(g):
    lines = [f"### GPU: {g['card']} (torch {g['torch']}; `python bench.py gpu`)", "",
             f"Paper preset on CIFAR-FS-shaped synthetic data (32x32x3, 100 Conv4 teachers trained {GPU_ZOO_EPOCHS} "
             f"epoch), {GPU_ROUNDS} rounds timed ({GPU_WARMUP} warm-up), then projected to the paper's 1000 rounds with "
             "49 meta-validations and the meta-test (600 tasks each).", "",
             "| shots | warm-up round s | round s | recovery / KD + Eq. (3) / replay s | validation s | meta-test s "
             "| peak memory MB | projected 1000 rounds |", "|---|---|---|---|---|---|---|---|"]
    for shots, r in sorted(g["runs"].items()):
        lines.append(f"| {shots} | {r['seconds_per_warmup_round']:.2f} | {r['seconds_per_round']:.2f} | "
                     f"{r['seconds_per_round_recovery']:.2f} / {r['seconds_per_round_kd']:.2f} / "
                     f"{r['seconds_per_round_replay']:.2f} | {r['seconds_per_validation']:.1f} | {r['test_seconds']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['projected_minutes']:.1f} min |")
    return "\n".join(lines) + "\n"


def report(results):
    parts = ["<!-- written by bench.py; do not edit by hand -->\n"]
    if "recovery" in results:
        parts.append(recovery_md(results["recovery"]))
    if "seeds" in results:
        parts.append(seeds_md(results["seeds"], results.get("teachers"), results.get("unfinished")))
    if results.get("rounds"):
        timed = results.get("time", {}).get(time_name("free", [], 1))
        parts.append(rounds_md(results["rounds"], results.get("seeds", {}), timed))
    if "time" in results:
        parts.append(time_md(results["time"]))
    if results.get("bank"):
        parts.append(bank_md(results["bank"]))
    if results.get("kd"):
        parts.append(kd_md(results["kd"]))
    parts.append(gpu_md(results["gpu"]) if results.get("gpu") else
                 "### GPU\n\nNo GPU run exists yet: `python bench.py gpu` on a CUDA machine writes this section "
                 "(paper preset, 1- and 5-shot: seconds per round and per phase, peak memory, projected full run).\n")
    return "\n".join(parts)


def bench_report(args):
    """Rewrite results.md (and the README section) from results.json plus every finished run in
    bench/runs/, including runs finished outside `bench.py seeds` (e.g. resumed by hand)."""
    results = load_results()
    found = results.setdefault("seeds", {})
    for job in seed_jobs((1, 5)):
        out = os.path.join(OUT, "runs", run_name(*job))
        path = os.path.join(out, "results.json")
        if os.path.exists(path):
            res = found[run_name(*job)] = json.load(open(path))
            has_log = res["rounds"] and os.path.exists(os.path.join(out, "log.txt"))
            last = replay_window(log_curves(out)["replay_curve"], res["rounds"]) if has_log else []
            if last:
                res["replay_acc"] = statistics.mean(last)  # MAML replay's query accuracy near the run's end
    collect_unfinished(results)
    collect_long(results)
    copy_recovered_grid(results)
    save_results(results)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("recovery", "seeds", "time", "rounds", "bank", "kd", "gpu", "report"))
    p.add_argument("--data-root", default="data", help="Omniglot's folder, as free.py's --data-root (the README's "
                   "figures: a folder holding images_background_small1.zip)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5], choices=(1, 5))
    p.add_argument("--jobs", type=int, default=JOBS, help="free.py runs at a time (seeds)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads per run (seeds)")
    p.add_argument("--rounds", type=int, default=LONG_ROUNDS, help="rounds: continue FREE 1-shot to this many rounds")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), choices=SEEDS, help="seeds, rounds, bank, kd: only these seeds")
    p.add_argument("--only", nargs="+", help="seeds: only these runs, by label (e.g. free average 'free --no-align')")
    args = p.parse_args()
    t0 = time.perf_counter()
    {"recovery": bench_recovery, "seeds": bench_seeds, "time": bench_time, "rounds": bench_rounds, "bank": bench_bank,
     "kd": bench_kd, "gpu": bench_gpu,
     "report": bench_report}[args.what](args)
    print(f"bench.py {args.what}: {time.perf_counter() - t0:.0f}s; see {OUT}/results.md")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # errors a user can cause or fix: one line, exit status 1
        sys.exit(f"error: {e}")
    except subprocess.CalledProcessError as e:  # a free.py run failed; its own error line is in its stdout.txt
        sys.exit(f"error: {' '.join(e.cmd[1:3])} ... exited with status {e.returncode}; see the run's stdout.txt")
