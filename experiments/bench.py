"""The measurement apparatus of this FREE implementation: it makes the runs behind every number of
experiments/RESULTS.md (and the README's results table and figure), stores them in
experiments/results/results.json, and writes those documents from it (`report`); no number in them is
typed by hand (the provenance notes in results.json are text). Run from the repository root:

    python experiments/bench.py recovery  # recovery speed-up at equal quality (paper §4: ~20x faster)
    python experiments/bench.py sweep     # the accuracy sweep (methods, baselines, ablations x seeds) as commands
    python experiments/bench.py seeds     # ... run here, --jobs at a time
    python experiments/bench.py time      # the quick preset's time by phase, 1 process x 2 threads vs 2 workers, and 1 x 1
    python experiments/bench.py rounds    # FREE 1-shot continued to longer runs: meta-validation by round
    python experiments/bench.py bank      # why MAML replay on the memory bank is a weak signal
    python experiments/bench.py kd        # what KD and Eq. (3) alone do to theta
    python experiments/bench.py adapt     # free.py adapt on 5/10/20-way tasks, by starting head
    python experiments/bench.py resize    # teachers of another input size and channels than the run's
    python experiments/bench.py gpu       # paper preset on one (or every) CUDA device: s/round by phase
    python experiments/bench.py report    # collect finished runs, write RESULTS.md, the README table, the figure

Runs go under experiments/runs/ (git-ignored), one folder per run; the experiments read each run's
results.json and metrics.jsonl (records.py), never its log. Recovery quality has two yardsticks (ours):
the teacher's accuracy on its recovered images (weak: it saturates), and the accuracy on the teacher's
*real* images of a fresh Conv4 distilled from the recovered images alone (STUDENT_STEPS Adam steps).
"""
import argparse
import os
import signal
import sys
from pathlib import Path


def _interrupted_at_start(signum, frame):  # Ctrl-C while torch is imported: one line, status 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.write(sys.stderr.fileno(), b"interrupted before any work; nothing to keep\n")
    raise SystemExit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted_at_start)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the method's modules (free, maml, ...) live in the repository root

import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import free  # noqa: E402
import maml  # noqa: E402
import recover  # noqa: E402
import run  # noqa: E402
import settings  # noqa: E402
from data import DATASETS, UserError, atomic_write, check_writable, load_dataset  # noqa: E402
from zoo import mirror_invariant  # noqa: E402

import probes  # noqa: E402
import records  # noqa: E402
import report  # noqa: E402
from records import (RESULTS, RUNS, SEEDS, THREADS, Job, finished_rounds, load_results, portable,  # noqa: E402
                     read_metrics, rounds_done, run_record, seed_flags, seed_jobs, store, sweep_of)

LONG_ROUNDS = 200  # `bench.py rounds`: FREE 1-shot continued to this many rounds by default
# `bench.py time`: TIME_ROUNDS rounds (warm-up 10, validations at 20 and at the last, the meta-test) from an empty
# zoo cache, so the zoo phase is timed too; each row (dataset, preset, shots, workers, threads, rounds), None = the
# preset's own rounds; the rest of a full run is projected from the phases' times
TIME_ROUNDS = 30
TIME_ROWS = [("omniglot", "quick", shots, workers, threads, TIME_ROUNDS) for shots in (1, 5)
             for workers, threads in ((1, 2), (2, 1), (1, 1))] + [("synthetic", "smoke", 1, 1, 2, None)]
# (1, 1): one process on one thread, the yardstick of what 2 workers could gain at best (the ceiling)
JOBS = 2  # default runs at a time (seeds, rounds)
# `bench.py gpu`: the paper preset on CIFAR-FS-shaped synthetic data (32x32x3), 1- and 5-shot, a few rounds timed
GPU_ROUNDS, GPU_WARMUP = 12, 2  # rounds timed (warm-up included; validation after the last)
GPU_ZOO_EPOCHS = 1  # the 100 teachers train 1 epoch: a round's cost depends on their shape, not what they learned


# ------------------------------------------------------------------------ the accuracy sweep


def bench_sweep(args):
    """Print the sweep's commands, one a line, or write them as a SLURM job array (--slurm FILE)."""
    jobs = seed_jobs(sweep_of(args), args.shots, args.only, args.seeds)
    if not args.slurm:
        print("\n".join(job.line() for job in jobs))
        return
    os.makedirs(args.runs, exist_ok=True)  # the tasks' SLURM logs go there
    script = records.slurm_script(jobs, args.runs)
    atomic_write(Path(args.slurm), lambda f: f.write(script.encode()))
    print(f"wrote {args.slurm}: a SLURM array of {len(jobs)} tasks; submit it with `sbatch {shlex.quote(args.slurm)}`",
          file=sys.stderr)


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
            xa = recover.augment(x, flip=mirror_invariant(ds), generator=g)
            augmented.append(maml.accuracy(t.model(xa), y).item())
    return {"held_out": statistics.mean(t.acc for t in teachers), "own_images": statistics.mean(plain),
            "own_images_under_A": statistics.mean(augmented), "teachers": len(teachers)}


def prepare_zoo(args, seed, results):
    """The teacher zoo of `seed`, built (or read from the cache) once before the runs that share it start;
    records the teachers' accuracy on their own images with and without A(.)."""
    cfg = free.parse_args(["--dataset", args.dataset, "--preset", args.preset, "--data-root", args.data_root,
                           "--seed", str(seed)])
    ds = load_dataset(args.dataset, args.data_root, seed=seed)  # synthetic data depend on the seed
    teachers, _ = run.load_teachers(cfg, ds, torch.device("cpu"), print)
    store(results, args.results, "teachers", records.teachers_key(args.dataset, args.preset, seed),
          teacher_accuracy_under_A(teachers, ds))


def run_line(name, res, how):
    """One finished run, as bench.py prints it: test accuracy, wall time, and whether it ran or was cached."""
    return f"{name}: {res['test_acc']:.2f} ± {res['test_ci95']:.2f}  {res['wall_seconds']:.0f}s  ({how})"


def bench_seeds(args):
    """The sweep's list, run here: each seed's zoo first, then args.jobs runs at a time (args.threads threads each)."""
    results = load_results(args.results)
    jobs = seed_jobs(sweep_of(args), args.shots, args.only, args.seeds)
    for seed in sorted({j.seed for j in jobs if j.method in settings.USES_ZOO}):
        prepare_zoo(args, seed, results)
    code = records.commit()

    def record(job, how="ran"):
        rec = run_record(job.out, code)
        store(results, args.results, "seeds", job.name, rec)
        print(run_line(job.name, rec, how), flush=True)

    todo = []
    for job in jobs:
        if job.finished():
            record(job, "cached")
        else:
            todo.append(job)
    records.run_all(todo, args.jobs, record)
    copy_recovered_grid(args)


def copy_recovered_grid(args):
    """results/recovered.png: the recovered images of the sweep's FREE 1-shot seed-0 run."""
    grid = os.path.join(Job("free", (), 1, 0, sweep_of(args)).out, "recovered.png")
    if os.path.exists(grid):
        os.makedirs(args.results, exist_ok=True)
        shutil.copyfile(grid, os.path.join(args.results, "recovered.png"))


# ------------------------------------------------------------------------ time by phase


class TimeJob:
    """One row of `bench.py time`: a fresh run (and a fresh zoo cache) under runs/time/."""

    def __init__(self, runs, data_root, dataset, preset, shots, workers, threads, rounds):
        self.dataset, self.preset, self.shots, self.workers, self.threads = dataset, preset, shots, workers, threads
        self.rounds = rounds or records.preset_rounds(preset)
        self.name = f"time-{dataset}-{preset}-{shots}shot-{workers}x{threads}"
        self.out = os.path.join(runs, "time", self.name)
        self.cache = self.out + "-cache"
        self.data_root = data_root
        self.env = {"OMP_NUM_THREADS": str(threads)}

    def argv(self):
        return ["python", "free.py", "--dataset", self.dataset, "--data-root", portable(self.data_root), "--preset",
                self.preset, "--shots", str(self.shots), "--rounds", str(self.rounds), "--out", portable(self.out),
                "--cache", portable(self.cache), "--device", "cpu", "--resume"] + \
               (["--workers", str(self.workers)] if self.workers > 1 else [])

    def line(self):
        return f"OMP_NUM_THREADS={self.threads} " + shlex.join(self.argv())


def bench_time(args):
    """Every TIME_ROWS row alone, one after another, each from an empty zoo cache. A finished row is read back;
    an unfinished one is started again from nothing (a resumed run's times mix processes)."""
    rows = [TimeJob(args.runs, args.data_root, *row) for row in TIME_ROWS if row[2] in args.shots or row[1] == "smoke"]
    for job in rows:
        if finished_rounds(job.out) != job.rounds:
            shutil.rmtree(job.out, ignore_errors=True)
            shutil.rmtree(job.cache, ignore_errors=True)
            print(f"{job.name}: {job.line()}", flush=True)
            records.run_all([job], 1, lambda j: None)
    code = records.commit()
    timed = {}
    for job in rows:
        timed[job.name] = dict(run_record(job.out, code), workers=job.workers, threads=job.threads, command=job.line())
        print(run_line(job.name, timed[job.name], "timed"), flush=True)
    records.store_section(args, "time", {"rows": timed, "timed_rounds": TIME_ROUNDS})


# ------------------------------------------------------------------------ run length


def long_name(rounds, seed):
    return f"rounds{rounds}-" + records.run_name("free", seed_flags(seed), 1)


def longest_before(runs, seed, rounds):
    """The finished FREE 1-shot run of `seed` with the most rounds below `rounds`: the sweep's quick-preset run or
    a `bench.py rounds` run; None if there is none (the run then starts from round 0)."""
    listed = os.listdir(runs) if os.path.isdir(runs) else ()
    prefix, suffix = "rounds", "-" + records.run_name("free", seed_flags(seed), 1)
    mine = [records.run_name("free", seed_flags(seed), 1)] + [
        n for n in listed if n.startswith(prefix) and n.endswith(suffix) and n[len(prefix):-len(suffix)].isdigit()]
    length = {n: finished_rounds(os.path.join(runs, n)) for n in mine}
    shorter = [n for n in mine if 0 < length[n] < rounds]
    return os.path.join(runs, max(shorter, key=length.get)) if shorter else None


CONTINUED_FILES = ("config.json", "log.txt", records.METRICS, "best.pt", "last.pt")  # last.pt last: "copied"


def continue_run(src, dst):
    """Seed a longer run with a finished shorter one (`longest_before`): its files up to last.pt (the state after
    its last round); free.py --resume --rounds R then carries on from there, as an uninterrupted R-round run would."""
    if os.path.exists(os.path.join(dst, "last.pt")):
        return
    if not os.path.exists(os.path.join(src, "results.json")):
        raise UserError(f"bench.py rounds continues finished runs; {src} has not finished")
    os.makedirs(dst, exist_ok=True)
    for f in CONTINUED_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


def long_jobs(args):
    """FREE 1-shot at args.rounds rounds for each seed: jobs of the sweep's form under their rounds<R>- names."""
    return [Job("free", ("--rounds", str(args.rounds)), 1, seed, sweep_of(args), long_name(args.rounds, seed))
            for seed in args.seeds]


def collect_long(results, runs, code=None):
    """Every finished `bench.py rounds` run in `runs`, with its validation and replay curves, into results["rounds"]."""
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else ():
        out = os.path.join(runs, name)
        if name.startswith("rounds") and finished_rounds(out):
            rec = run_record(out, code)
            results.setdefault("rounds", {})[name] = dict(rec, replay_curve=records.replay_curve(read_metrics(out)))


def bench_rounds(args):
    """FREE 1-shot, seeds args.seeds, run to args.rounds rounds (args.jobs at a time), each continuing the longest
    finished shorter run of its seed: is it still learning, and when does it pass averaging the teachers?"""
    jobs = long_jobs(args)
    for job in jobs:
        src = longest_before(args.runs, job.seed, args.rounds)
        if src:  # else the run starts from round 0
            continue_run(src, job.out)
    records.run_all([j for j in jobs if not j.finished()], args.jobs,
                    lambda j: print(f"{j.name}: finished", flush=True))
    results = load_results(args.results)  # runs of another bench.py may have finished meanwhile
    collect_long(results, args.runs)
    records.save_results(results, args.results)


# ------------------------------------------------------------------------ GPU timing


def bench_gpu(args, device="cuda", extra=()):
    """Time the paper preset (Config defaults: 100 teachers, B = 4, k = 5, nf = 64, replay patience 10, 600
    validation and test tasks) on CIFAR-FS-shaped synthetic data, 1- and 5-shot: GPU_ROUNDS rounds, each phase
    from metrics.jsonl, peak memory; then the report projects the paper's 1000 rounds. With several CUDA devices
    each shot runs again with one worker per device. `device`/`extra` let the test run it on the CPU with tiny
    counts (later flags override earlier ones)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("bench.py gpu needs a CUDA device; none is available here")
    cuda = device == "cuda"
    card = torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    workers = [1] + ([torch.cuda.device_count()] if cuda and torch.cuda.device_count() > 1 else [])
    runs, code = {}, records.commit()
    for shots in args.shots:
        for n in workers:
            name = f"gpu-paper-synthetic-{shots}shot-{n}worker{'s' if n > 1 else ''}"
            out = os.path.join(args.runs, name)
            argv = ["--dataset", "synthetic", "--preset", "paper", "--shots", str(shots), "--rounds", str(GPU_ROUNDS),
                    "--warmup", str(GPU_WARMUP), "--eval-every", str(GPU_ROUNDS), "--zoo-epochs", str(GPU_ZOO_EPOCHS),
                    "--device", device, "--out", out, "--cache", os.path.join(args.runs, "gpu-cache"), *extra,
                    "--resume", *(["--workers", str(n)] if n > 1 else [])]
            peak = load_results(args.results).get("gpu", {}).get("runs", {}).get(name, {}).get("peak_memory_mb")
            if n > 1:  # one process per device: a subprocess, as a user starts it
                records.run_all([GpuJob(name, out, argv)], 1, lambda j: None)
            elif finished_rounds(out) != GPU_ROUNDS or not os.path.exists(os.path.join(out, records.METRICS)):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                if free.main(argv) is None:
                    raise KeyboardInterrupt  # free.main stopped at Ctrl-C, last.pt saved
                peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
            rec = run_record(out, code)
            runs[name] = dict(rec, workers=n, peak_memory_mb=peak, command="python free.py " + shlex.join(argv))
            print(f"{name}: {rec['phases']['round']:.2f} s/round", flush=True)
    records.store_section(args, "gpu", {"card": card, "torch": torch.__version__, "devices": max(workers),
                                        "runs": runs})


class GpuJob:
    def __init__(self, name, out, argv):
        self.name, self.out, self._argv, self.env = name, out, argv, {}

    def argv(self):
        return ["python", "free.py", *self._argv]


# ------------------------------------------------------------------------ report


def bench_report(args):
    """Collect every finished run of the sweep from --runs (wherever it was run) and every `bench.py rounds` run
    into results.json, say which sweep runs are missing, and write RESULTS.md, the README table and the figure."""
    results = load_results(args.results)
    found = results.setdefault("seeds", {})
    jobs = seed_jobs(sweep_of(args))
    code = records.commit()
    for job in jobs:
        if job.finished():
            found[job.name] = run_record(job.out, code)
    results["unfinished"] = {j.name: rounds_done(read_metrics(j.out)) for j in jobs if not j.finished()
                             and os.path.isdir(j.out) and j.rounds > 0}
    collect_long(results, args.runs, code)
    copy_recovered_grid(args)
    missing = [j for j in jobs if j.rounds > found.get(j.name, {}).get("rounds", -1)]
    results["missing"] = [j.name for j in missing]
    records.save_results(results, args.results)
    where = lambda j: (f"round {results['unfinished'][j.name]} of {j.rounds}" if j.name in results["unfinished"]
                       else "not started")
    print(f"report: {len(jobs) - len(missing)} of {len(jobs)} sweep runs finished"
          + (": missing " + ", ".join(f"{j.name} ({where(j)})" for j in missing) if missing else ""))


# ------------------------------------------------------------------------ command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every error of the entry points
        sys.exit(f"error: {message} (see `{self.prog} --help`)")


def count(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


SUBCOMMANDS = {  # name: (runner, one-line help, description, flag groups)
    "recovery": (probes.bench_recovery, "recovery speed-up of the meta-generator at equal quality",
                 "Time task recovery on teachers the meta-generator never saw: k steps from the meta-generator "
                 "against steps from scratch, at equal quality by both yardsticks.", ("data",)),
    "sweep": (bench_sweep, "print the accuracy sweep as free.py commands (or a SLURM array)",
              "Print the accuracy sweep (every method, baseline and ablation at every seed) as independent, "
              "resumable free.py commands, one a line, for GNU parallel, xargs -P or a cluster; or write them as a "
              "SLURM job array.", ("data", "sweep", "slurm")),
    "seeds": (bench_seeds, "run the sweep's commands here, --jobs at a time",
              "Run the sweep's commands here, --jobs at a time, each seed's teacher zoo built first; finished runs "
              "are read back and stored.", ("data", "sweep", "jobs")),
    "time": (bench_time, "the quick preset's time by phase: 1 process x 2 threads vs 2 workers",
             f"Time the quick preset on Omniglot, 1- and 5-shot, as 1 process x 2 threads, as 2 workers x 1 "
             f"thread and as 1 process x 1 thread (the yardstick of the workers' ceiling), {TIME_ROUNDS} rounds each "
             f"from an empty zoo cache, and the smoke run; the report projects full runs by phase.", ("data", "shots")),
    "rounds": (bench_rounds, "FREE 1-shot continued to longer runs",
               "Continue FREE 1-shot (quick preset) to --rounds rounds per seed, from the longest finished shorter "
               "run: meta-validation by round and the test at each length.", ("data", "seeds", "jobs", "rounds")),
    "bank": (probes.bench_bank, "why replay on the memory bank is a weak signal",
             "On each seed's finished FREE 1-shot run: teachers on each other's recovered images, and bank tasks "
             "against real tasks for FREE's and data-based MAML's best checkpoints.", ("data", "seeds")),
    "kd": (probes.bench_kd, "what KD and Eq. (3) alone do to theta",
           "On each seed's finished runs: meta-validation of theta_0, the KD-only run and FREE with bodies and heads "
           "swapped.", ("data", "seeds")),
    "adapt": (probes.bench_adapt, "free.py adapt beyond the trained way: accuracy by N, K and head",
              "On each seed's finished FREE 1-shot run (best.pt): meta-test tasks of 5, 10 and 20 ways, 1 and 5 "
              "shots, adapted from the meta-learned head (5-way only), a prototype head and a zero head.",
              ("data", "seeds")),
    "resize": (probes.bench_resize, "teachers of another input size and channels than the run's (--zoo)",
               "The Omniglot quick zoo's teachers (28x28 grey) serving runs of other image sizes and channels through "
               "external.fit_input: recovery from a fresh generator, then both yardsticks of recovery quality.",
               ("data",)),
    "gpu": (bench_gpu, "the paper preset on a CUDA machine, by phase",
            f"On a CUDA machine: the paper preset on CIFAR-FS-shaped synthetic data, {GPU_ROUNDS} rounds per shot "
            f"setting, seconds by phase and peak memory; with several devices, 1 worker against one per device.",
            ("shots",)),
    "report": (bench_report, "collect finished runs; write RESULTS.md, the README table, the figure",
               "Collect the finished runs of the sweep (and of `rounds`) from --runs, say which are missing, and write "
               "experiments/RESULTS.md, the README's results table and the figure.", ("sweep-where",)),
}


def build_parser():
    p = Parser(prog="bench.py", description="The experiments of this FREE implementation: each subcommand makes "
               "or collects runs, stores them in results.json and rewrites the results document from it.")
    sub = p.add_subparsers(dest="what", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    for name, (_, short, description, groups) in SUBCOMMANDS.items():
        s = sub.add_parser(name, help=short, description=description)
        s.add_argument("--results", metavar="DIR", default=str(RESULTS), help="folder of results.json and the "
                       "figures; the results document goes beside it (default: experiments/results, beside it "
                       "experiments/RESULTS.md)")
        if name != "recovery":
            s.add_argument("--runs", metavar="DIR", default=str(RUNS), help="folder of the runs, one subfolder each "
                           "(default: experiments/runs)")
        if "data" in groups:
            s.add_argument("--data-root", metavar="DIR", default="data", help="data folder, as free.py's "
                           "--data-root (the stored results: a folder holding images_background_small1.zip)")
        if "sweep" in groups or "sweep-where" in groups:
            s.add_argument("--dataset", default="omniglot", choices=DATASETS, help="data set of the sweep's runs "
                           "(default: omniglot; synthetic makes a demo that runs in seconds)")
            s.add_argument("--preset", default="quick", choices=tuple(free.PRESETS), help="free.py preset of the "
                           "sweep's runs (default: quick; smoke for a demo)")
        if "sweep" in groups:
            s.add_argument("--shots", type=int, nargs="+", default=[1, 5], choices=(1, 5), help="only these shot "
                           "settings (default: 1 5)")
            s.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), choices=SEEDS, help="only these "
                           "seeds (default: 0 1 2)")
            s.add_argument("--only", nargs="+", metavar="LABEL", help="only these runs, by label (e.g. free average "
                           "'free --no-align'); default: all")
            s.add_argument("--threads", type=count, default=THREADS, help=f"torch threads of each run, as "
                           f"OMP_NUM_THREADS (default: {THREADS})")
            s.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="free.py's --device "
                           "for each run (default: cpu, where the stored results ran)")
        elif "shots" in groups:
            s.add_argument("--shots", type=int, nargs="+", default=[1, 5], choices=(1, 5), help="only these shot "
                           "settings (default: 1 5)")
        if "seeds" in groups:
            s.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), choices=SEEDS, help="only these "
                           "seeds (default: 0 1 2)")
        if "jobs" in groups:
            s.add_argument("--jobs", type=count, default=JOBS, help=f"runs at a time (default: {JOBS})")
        if "rounds" in groups:
            s.add_argument("--rounds", type=count, default=LONG_ROUNDS, help=f"rounds to continue each seed's FREE "
                           f"1-shot run to (default: {LONG_ROUNDS})")
            s.add_argument("--threads", type=count, default=THREADS,
                           help=f"torch threads of each run (default: {THREADS})")
        if "slurm" in groups:
            s.add_argument("--slurm", metavar="FILE", help="write a SLURM job-array script over the list to FILE "
                           "instead of printing the list")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("results", "runs"):
        if hasattr(args, flag):
            check_writable("--" + flag, getattr(args, flag))
    labels = {records.label(m, f) for m, f, _ in records.SEED_RUNS}
    unknown = [x for x in getattr(args, "only", None) or () if x not in labels]
    if unknown:
        raise UserError(f"--only {' '.join(map(shlex.quote, unknown))}: not a run of the sweep; its labels are "
                        + ", ".join(sorted(labels)))
    if getattr(args, "slurm", None):
        check_writable("--slurm", os.path.dirname(os.path.abspath(args.slurm)))
    for key, value in vars(records.Sweep()).items():  # subcommands of the stored sweep (Omniglot, quick) lack these
        if not hasattr(args, key):
            setattr(args, key, value)
    t0 = time.perf_counter()
    SUBCOMMANDS[args.what][0](args)
    if args.what != "sweep":
        default = Path(os.path.abspath(args.results)) == RESULTS  # the README shows the stored results only
        report.write_documents(load_results(args.results), args.results, sweep_of(args),
                               readme=ROOT / "README.md" if default else None)
        print(f"bench.py {args.what}: {time.perf_counter() - t0:.0f}s; see "
              f"{portable(report.document_path(args.results))}")


def cli(argv=None):
    """The entry point: errors a user can cause end as one `error: ...` line and status 1; Ctrl-C as one line and
    status 130 (128 + SIGINT), after what is done is stored. Returns the exit status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished runs are stored and runs in progress saved their last.pt; the same command "
              "continues", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
