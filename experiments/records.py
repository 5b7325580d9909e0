"""Run records for the experiments: what a free.py run leaves in its --out folder, read back, and the
sweep of independent free.py commands that makes them.

A run writes results.json (its summary: settings, test_acc, test_ci95, best_val_acc, wall_seconds,
resumes) and metrics.jsonl (one JSON object per line: a `zoo` event per process that loads the zoo,
a `round` event per round with the seconds of its phases, a `val` event per meta-validation, a `test`
event). The experiments read these, never log.txt: `read_metrics`, then `phase_seconds`, `val_curve`,
`replay_curve`. results.json of the experiments (experiments/results/results.json) also holds records
made before metrics.jsonl existed, with per-phase seconds in the summary itself; `phases_of` reads both.
"""
import concurrent.futures
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the method's modules (free, maml, zoo, ...) live in the repository root

import torch  # noqa: E402

import free  # noqa: E402  (after the path above)
import settings  # noqa: E402
import zoo  # noqa: E402
from data import UserError, atomic_write  # noqa: E402

RUNS = ROOT / "experiments" / "runs"  # default folder of the runs the experiments make (git-ignored)
RESULTS = ROOT / "experiments" / "results"  # default folder of results.json and the figures
METRICS = "metrics.jsonl"
THREADS = 1  # default torch threads of each sweep run (two runs share a 2-core CPU)
REPLAY_WINDOW = 10  # rounds over which the replay accuracy is averaged (it varies from meta-batch to meta-batch)
# the accuracy sweep: every method and ablation, over seeds; (method, flags, shots) in the order they run and are
# tabled: the comparison FREE must win first, then ablations, then the data-based upper bound
SEEDS = (0, 1, 2)  # each reseeds the whole pipeline: teacher zoo, generator, meta-learner, task sampling
SEED_RUNS = [("free", [], 1), ("average", [], 1), ("random", [], 1), ("free", [], 5), ("average", [], 5),
             ("random", [], 5), ("free", ["--no-align"], 1), ("free", ["--hard-labels"], 1),
             ("free", ["--no-meta-generator"], 1), ("free", ["--theta-tilde-opt", "sgd"], 1),
             ("free", ["--no-kd-augment"], 1), ("free", ["--bank-filter", "agree"], 1),
             ("free", ["--max-replay", "0"], 1), ("free", ["--max-replay", "1"], 1), ("free", ["--no-kd"], 1),
             ("free", ["--first-order"], 1), ("maml", [], 1), ("maml", [], 5)]
# a phase of a training round as metrics.jsonl names it -> the key of phase_seconds and of old summaries
ROUND_PHASES = {"recovery": "seconds_per_round_recovery", "kd": "seconds_per_round_kd",
                "replay": "seconds_per_round_replay"}
LEGACY_PHASES = dict(ROUND_PHASES, warmup_round="seconds_per_warmup_round", round="seconds_per_round",
                     validation="seconds_per_validation", test="test_seconds")  # records made before metrics.jsonl


# ------------------------------------------------------------------------ metrics.jsonl


def read_metrics(out):
    """The records of `out`/metrics.jsonl, in order ([] if there is none). A last line without its newline
    is a write cut short by a crash and is left out; any other line that is not JSON is an error."""
    path = os.path.join(out, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")  # the last item is "" when the file ends with a newline
    records = []
    for n, line in enumerate(lines[:-1], 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not a JSON record ({e.msg}); the file is written by free.py "
                                f"only: rerun that run") from e
    return records


def events(records, kind):
    """The records of one event kind, the last one kept where a round appears twice (one consistent history)."""
    rows = [r for r in records if r.get("event") == kind]
    if kind == "zoo":
        return rows  # one per process start, not per round
    return list({r["round"]: r for r in rows}.values())


def rounds_done(records):
    """The rounds a run has finished according to its metrics.jsonl (0 before the first)."""
    return max((r["round"] for r in events(records, "round")), default=0)


def val_curve(records):
    """[[round, meta-val accuracy, 95% CI], ...]: every meta-validation of the run."""
    return [[r["round"], r["acc"], r["ci95"]] for r in events(records, "val")]


def replay_curve(records):
    """[[round, MAML replay's query accuracy on memory-bank tasks], ...]: the rounds that replayed."""
    return [[r["round"], r["replay_acc"]] for r in events(records, "round") if r.get("replay_acc") is not None]


def replay_window(curve, rounds):
    """The replay accuracies of the REPLAY_WINDOW rounds up to `rounds`."""
    return [a for r, a in curve if rounds - REPLAY_WINDOW < r <= rounds]


def mean_or_none(xs):
    return statistics.mean(xs) if xs else None


def phase_seconds(records):
    """Where a run's time went, from its metrics.jsonl: `zoo` (seconds of every zoo phase, None without one)
    and `zoo_trained` (teachers trained; None if a zoo record does not say); `warmup_round` and `round` (mean
    seconds of a warm-up and of a training round); `recovery`, `kd`, `replay` (mean seconds of each phase over
    the training rounds, 0 in a round where it did not run); `validation` (mean seconds of a meta-validation);
    `test` (the meta-test); `replay_batches` (mean replay meta-batches a training round); and the counts they are
    means of."""
    zoo_, rounds, vals, tests = (events(records, k) for k in ("zoo", "round", "val", "test"))
    warm = [r for r in rounds if r["phase"] == "warm-up"]
    train = [r for r in rounds if r["phase"] == "train"]
    phases = {"zoo": sum(z["seconds"] for z in zoo_) if zoo_ else None,
              "zoo_trained": sum(z["trained"] for z in zoo_) if all("trained" in z for z in zoo_) else None,
              "warmup_rounds": len(warm), "train_rounds": len(train), "validations": len(vals),
              "warmup_round": mean_or_none([r["seconds"]["round"] for r in warm]),
              "round": mean_or_none([r["seconds"]["round"] for r in train]),
              "validation": mean_or_none([v["seconds"] for v in vals]),
              "test": tests[-1]["seconds"] if tests else None}
    for phase in ROUND_PHASES:
        phases[phase] = mean_or_none([r["seconds"].get(phase, 0.0) for r in train])
    phases["replay_batches"] = mean_or_none([r.get("replay_batches", 0) for r in train])  # MAML meta-batches a round
    return phases


def phases_of(record):
    """phase_seconds of a stored record: its `phases`, or, for a record made before metrics.jsonl, the same
    means from the summary's seconds_per_* keys (no zoo time: those runs found it cached)."""
    if "phases" in record:
        return record["phases"]
    return dict({k: record.get(old) for k, old in LEGACY_PHASES.items()}, zoo=None, zoo_trained=None)


def run_record(out, code=None):
    """A finished run as the experiments store it: its results.json, plus `phases`, `val_curve` and `replay_acc`
    (mean of the last REPLAY_WINDOW rounds' replay accuracy, if it replayed) from its metrics.jsonl, and `code`
    (the commit of this checkout when the record was collected)."""
    summary = read_summary(out)
    m = read_metrics(out)
    record = dict(summary, phases=phase_seconds(m), val_curve=val_curve(m), code=code or commit())
    last = replay_window(replay_curve(m), summary["rounds"])
    if last:
        record["replay_acc"] = statistics.mean(last)
    return record


def read_summary(out):
    path = os.path.join(out, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e.msg}); free.py writes it atomically: rerun that run") from e


def finished_rounds(out):
    """The rounds of the finished run in `out` (its results.json), or 0 if it has not finished."""
    return read_summary(out)["rounds"] if os.path.exists(os.path.join(out, "results.json")) else 0


# ------------------------------------------------------------------------ results.json of the experiments


def compact_json(obj, indent=""):
    """JSON with one key per line, but a list that holds no object (a curve, a list of seeds) on one line."""
    inner = indent + " "
    if isinstance(obj, dict) and obj:
        items = (f"{inner}{json.dumps(k)}: {compact_json(v, inner)}" for k, v in obj.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        return "[\n" + ",\n".join(inner + compact_json(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj)


def load_results(results_dir):
    path = os.path.join(results_dir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_results(results, results_dir):
    os.makedirs(results_dir, exist_ok=True)
    atomic_write(Path(results_dir) / "results.json", lambda f: f.write(compact_json(results).encode()))


def store(results, results_dir, key, name, value):
    """results[key][name] = value, written to results.json. The file is read again first (and `results`
    refreshed from it), so what another bench.py process stored since this one loaded it is kept."""
    fresh = load_results(results_dir)
    fresh.setdefault(key, {})[name] = value
    results.clear()
    results.update(fresh)
    save_results(results, results_dir)


def commit():
    """This checkout's commit (short hash, '-dirty' with uncommitted changes to tracked files), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def machine():
    """The CPU this runs on, in words: model name (Linux) and core count."""
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{os.cpu_count()} CPU cores" + (f", {model}" if model else "")


# ------------------------------------------------------------------------ the sweep: independent free.py commands


def label(method, flags):
    return " ".join([method] + list(flags))


def seed_flags(seed):
    return ["--seed", str(seed)] if seed else []


def run_name(method, flags, shots, dataset="omniglot", preset="quick"):
    """A run's folder name: e.g. omniglot-1shot-free-no-align-seed-1 (the preset named unless it is quick)."""
    head = f"{dataset}-{shots}shot" if preset == "quick" else f"{dataset}-{preset}-{shots}shot"
    return "-".join([head, method] + [f.lstrip("-") for f in flags])


def teachers_key(dataset, preset, seed):
    """The key of a zoo's record in results["teachers"]: the seed for the stored Omniglot quick sweep."""
    return str(seed) if (dataset, preset) == ("omniglot", "quick") else f"{dataset}-{preset}-seed{seed}"


def preset_rounds(preset):
    return free.PRESETS[preset].get("rounds", free.Config.rounds)


def target_rounds(method, flags, preset="quick"):
    """The rounds a run asks for: its --rounds flag, else the preset's; 0 for the untrained baselines."""
    if method not in settings.TRAINED:
        return 0
    return int(flags[flags.index("--rounds") + 1]) if "--rounds" in flags else preset_rounds(preset)


def portable(path):
    """`path` relative to the repository root when it lies inside it (the commands run from the root), else
    absolute: a printed command then works in any checkout."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Sweep:
    """Where and how the sweep's runs are made (the CLI's --dataset, --preset, --runs, --data-root, --threads,
    --device)."""
    dataset: str = "omniglot"
    preset: str = "quick"
    runs: str = str(RUNS)
    data_root: str = "data"
    threads: int = THREADS  # OMP_NUM_THREADS of each run
    device: str = "cpu"


@dataclass(frozen=True)
class Job:
    """One free.py run of the sweep: a SEED_RUNS entry at one seed."""
    method: str
    flags: tuple
    shots: int
    seed: int
    sweep: Sweep
    rename: str = None  # a name other than the sweep's (`bench.py rounds`: rounds<R>-...)

    @property
    def name(self):
        if self.rename:
            return self.rename
        return run_name(self.method, list(self.flags) + seed_flags(self.seed), self.shots, self.sweep.dataset,
                        self.sweep.preset)

    @property
    def out(self):
        return os.path.join(self.sweep.runs, self.name)

    @property
    def rounds(self):
        return target_rounds(self.method, list(self.flags), self.sweep.preset)

    def argv(self, python="python"):
        s = self.sweep
        return [python, "free.py", "--dataset", s.dataset, "--data-root", portable(s.data_root), "--preset",
                s.preset, "--shots", str(self.shots), "--method", self.method, *self.flags, *seed_flags(self.seed),
                "--out", portable(self.out), "--device", s.device, "--resume"]

    @property
    def env(self):
        return {"OMP_NUM_THREADS": str(self.sweep.threads)}

    def line(self):
        """The job as one shell command, run from the repository root: resumable and idempotent (free.py
        --resume starts the run if its folder holds none and does nothing if it has finished)."""
        return " ".join(f"{k}={v}" for k, v in self.env.items()) + " " + shlex.join(self.argv())

    def finished(self):
        return os.path.exists(os.path.join(self.out, "results.json")) and finished_rounds(self.out) >= self.rounds


def seed_jobs(sweep, shots=(1, 5), only=None, seeds=SEEDS):
    """Every SEED_RUNS entry at every seed, in running order (a seed's runs share its teacher zoo)."""
    return [Job(m, tuple(f), s, seed, sweep) for m, f, s in SEED_RUNS for seed in seeds
            if s in shots and (not only or label(m, f) in only)]


def slurm_script(jobs, log_dir):
    """A SLURM job-array script over the jobs' command lines: task i runs line i, read with sed."""
    sweep = jobs[0].sweep if jobs else Sweep()
    lines = "\n".join(j.line() for j in jobs)
    report = " ".join(["python experiments/bench.py report", "--runs", shlex.quote(portable(sweep.runs))]
                      + [f"--{k} {getattr(sweep, k)}" for k in ("dataset", "preset")
                         if getattr(sweep, k) != getattr(Sweep(), k)])
    return f"""#!/bin/bash
# FREE's accuracy sweep as a SLURM job array, written by `python experiments/bench.py sweep --slurm`:
# task i runs line i of the list below (the lines `bench.py sweep` prints), from the repository root.
# Each command is resumable: resubmitting the array continues what stopped and skips what finished.
# Add the #SBATCH lines your cluster needs (--time, --mem, --partition); submit with `sbatch THIS_FILE`,
# then collect with `{report}`.
#SBATCH --job-name=free-sweep
#SBATCH --array=1-{len(jobs)}
#SBATCH --cpus-per-task={sweep.threads}
#SBATCH --output={shlex.quote(os.path.abspath(log_dir))}/slurm-%A_%a.out
set -euo pipefail
cd {shlex.quote(str(ROOT))}
line=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" <<'LIST'
{lines}
LIST
)
eval "$line"
"""


# ------------------------------------------------------------------------ the local executor of the sweep


def start(job_argv, env, out):
    """Start one free.py command from the repository root in its own session (a Ctrl-C reaches it once,
    through `run_all`), its output appended to out/stdout.txt."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stdout.txt"), "a") as log:
        return subprocess.Popen([sys.executable] + job_argv[1:], cwd=ROOT, env=dict(os.environ, **env), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run_all(jobs, n, on_done):
    """Run jobs (each with .argv(), .env, .out, .name) n at a time: the local executor of the sweep's list.
    on_done(job) follows each success. A failed run does not stop the others; they are named at the end.
    Ctrl-C sends each running run one SIGINT (free.py then finishes its round and saves last.pt), waits for
    them, and re-raises, so the same command resumes them."""
    procs, failed, lock, stopping = {}, [], threading.Lock(), threading.Event()

    def run_job(job):
        with lock:  # a job starts before the Ctrl-C (and is signalled below) or never
            if stopping.is_set():
                return False
            procs[job.name] = p = start(job.argv(), job.env, job.out)
        if p.wait() != 0:
            failed.append(f"{job.name} (status {p.returncode}; see {portable(job.out)}/stdout.txt)")
            return False
        return True

    pool = concurrent.futures.ThreadPoolExecutor(n)
    try:
        futures = {pool.submit(run_job, job): job for job in jobs}
        for fut in concurrent.futures.as_completed(futures):
            if fut.result():
                on_done(futures[fut])
    except KeyboardInterrupt:
        with lock:
            stopping.set()  # no job starts after this, whether queued or picked up by a thread just now
        pool.shutdown(wait=False, cancel_futures=True)
        for p in list(procs.values()):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in list(procs.values()):
            p.wait()
        raise
    pool.shutdown()
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} runs failed: {'; '.join(failed)}")


# ------------------------------------------------------------------------ what the runners share


def sweep_of(args):
    """The Sweep of a parsed command line (its --dataset, --preset, --runs, --data-root, --threads, --device)."""
    return Sweep(args.dataset, args.preset, args.runs, args.data_root, args.threads, args.device)


def stamp(command):
    """Where a stored section came from: this checkout's commit, the machine, torch, the command, the date."""
    return {"commit": commit(), "machine": machine(), "torch": torch.__version__, "command": command,
            "date": time.strftime("%Y-%m-%d")}


def store_section(args, key, value):
    """Replace one whole section of results.json, stamped with where it came from (results["provenance"])."""
    results = load_results(args.results)
    results[key] = value
    results.setdefault("provenance", {})[key] = stamp(" ".join(["python experiments/bench.py"] + sys.argv[1:]))
    save_results(results, args.results)


def finished_run_state(args, what, method, flags, seed):
    """last.pt of a finished 1-shot run of the sweep (what `bank` and `kd` examine); an unfinished run is a
    UserError that names the command making it."""
    job = Job(method, tuple(flags), 1, seed, sweep_of(args))
    if not job.finished():
        raise UserError(f"{what}: {job.out} is not a finished {job.rounds}-round run; run `python experiments/bench.py "
                        f"seeds --shots 1 --only {shlex.quote(label(method, flags))}` first")
    return zoo.load_checkpoint(os.path.join(job.out, "last.pt"), UserError, f"{what}:", "rerun the sweep's run")
