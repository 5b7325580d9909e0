"""The experiments' arithmetic and bookkeeping on small fabricated run records (no training but one tiny GPU-path
run): phase means from metrics.jsonl, projections and speed-ups, mean ± std over seeds, the sweep's command
list and its SLURM script, the local executor's Ctrl-C, `report` with missing runs, the figure's series, the
run-length continuation, the memory-bank and KD probes, and the command line's errors. Expected values are
worked out by hand in the comments."""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

import bench  # first: puts the repository root on sys.path
import free
import probes
import records
import recover
import report
import settings
import tables
from records import SEEDS, Sweep, run_name, seed_flags


def write_metrics(out, lines, tail=""):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, records.METRICS), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines) + tail)


def rnd(r, phase, **seconds):
    return {"event": "round", "round": r, "phase": phase, "seconds": seconds, "elapsed": 0.0}


METRICS = [  # a run of 2 warm-up and 3 training rounds, resumed once (round 4 written twice), validated twice
    {"event": "zoo", "teachers": 3, "trained": 3, "cached": 0, "seconds": 30.0, "held_out_acc": 0.9},
    rnd(1, "warm-up", recovery=1.0, round=1.5), rnd(2, "warm-up", recovery=1.0, round=2.5),
    dict(rnd(3, "train", recovery=2.0, kd=0.5, replay=4.0, round=7.0), replay_acc=0.3, replay_batches=4),
    dict(rnd(4, "train", recovery=9.0, kd=9.0, replay=9.0, round=99.0), replay_acc=0.9, replay_batches=9),  # replaced on resume
    {"event": "zoo", "teachers": 3, "trained": 0, "cached": 3, "seconds": 2.0, "held_out_acc": 0.9},
    dict(rnd(4, "train", recovery=2.0, kd=0.5, replay=5.0, round=8.0), replay_acc=0.5, replay_batches=5),
    rnd(5, "train", recovery=2.0, kd=0.5, round=3.0),  # replay stopped at once: no replay phase
    {"event": "val", "round": 4, "acc": 50.0, "ci95": 1.0, "best": 50.0, "seconds": 10.0},
    {"event": "val", "round": 5, "acc": 52.0, "ci95": 1.5, "best": 52.0, "seconds": 12.0},
    {"event": "test", "round": 5, "acc": 51.0, "ci95": 0.8, "tasks": 10, "seconds": 40.0}]


def summary(acc=60.0, **extra):
    """A free.py results.json, reduced to what the experiments read."""
    return dict(dict(dataset="omniglot", preset="quick", shots=1, method="free", ablations=[], seed=0, workers=1,
                     torch_threads=1, rounds=5, test_acc=acc, test_ci95=0.5, best_val_acc=acc - 1, wall_seconds=10.0),
                **extra)


def test_phase_means_are_computed_from_metrics_jsonl_by_hand(tmp_path):
    write_metrics(tmp_path, METRICS, tail='{"event": "round", "rou')  # a last line cut short by a crash: left out
    m = records.read_metrics(tmp_path)
    ph = records.phase_seconds(m)
    # zoo: 30 + 2 s over the two process starts, 3 teachers trained; warm-up rounds 1.5 and 2.5 -> 2.0
    # training rounds 3, 4 (the later copy), 5: round (7 + 8 + 3) / 3 = 6, recovery 2, kd 0.5,
    # replay (4 + 5 + 0) / 3 = 3 s in (4 + 5 + 0) / 3 = 3 meta-batches (absent in round 5: it took no time);
    # validations (10 + 12) / 2 = 11; test 40
    assert ph == {"zoo": 32.0, "zoo_trained": 3, "warmup_rounds": 2, "train_rounds": 3, "validations": 2,
                  "warmup_round": 2.0, "round": 6.0, "validation": 11.0, "test": 40.0, "recovery": 2.0, "kd": 0.5,
                  "replay": 3.0, "replay_batches": 3.0}
    assert records.val_curve(m) == [[4, 50.0, 1.0], [5, 52.0, 1.5]]
    assert records.replay_curve(m) == [[3, 0.3], [4, 0.5]] and records.rounds_done(m) == 5
    (tmp_path / "results.json").write_text(json.dumps(summary()))
    rec = records.run_record(str(tmp_path), code="abc")
    assert rec["phases"] == ph and rec["replay_acc"] == pytest.approx((0.3 + 0.5) / 2) and rec["code"] == "abc"
    assert records.phases_of(rec) is rec["phases"]


def test_a_damaged_metrics_line_is_a_user_error_and_old_records_read_their_summary(tmp_path):
    write_metrics(tmp_path, METRICS[:2], tail="not json\n" + json.dumps(METRICS[2]) + "\n")
    with pytest.raises(records.UserError, match="line 3"):
        records.read_metrics(tmp_path)
    old = dict(seconds_per_warmup_round=2.0, seconds_per_round=6.0, seconds_per_round_recovery=2.0,
               seconds_per_round_kd=0.5, seconds_per_round_replay=3.0, seconds_per_validation=11.0, test_seconds=40.0)
    ph = records.phases_of(old)  # a record made before metrics.jsonl: the same means, no zoo time
    assert ph["zoo"] is None and ph["round"] == 6.0 and ph["replay"] == 3.0 and ph["test"] == 40.0


def test_paper_run_validates_49_times():
    # rounds 21..1000 (after the 20 warm-up rounds), every 20th: 40, 60, ..., 1000
    paper = free.Config()
    assert sum(settings.is_validation_round(paper, r) for r in range(1, paper.rounds + 1)) == 49


PHASES = dict(zoo=30.0, zoo_trained=3, warmup_round=1.0, round=2.0, recovery=0.5, kd=0.25, replay=1.0,
              validation=5.0, test=7.0)


def test_projection_counts_zoo_warmup_training_validation_and_test():
    cfg = free.Config(rounds=10, warmup=2, eval_every=4)  # validations after rounds 4, 8 and 10 (the last)
    phases = tables.projected_phases(PHASES, cfg)
    # 8 training rounds of 0.5 + 0.25 + 1.0 and 0.25 else (2.0 a round)
    assert phases == {"teacher zoo": 30.0, "warm-up": 2.0, "recovery": 4.0, "KD + Eq. (3)": 2.0, "replay": 8.0,
                      "rest of a round": 2.0, "meta-validation": 15.0, "meta-test": 7.0}
    assert tables.projected(PHASES, cfg) == (70.0, 40.0)  # first run; rerun without the zoo
    assert tables.hms(3725.4) == "1:02:05"


def test_speedup_of_workers_over_one_process_by_hand():
    a = summary(workers=1, threads=2, phases=dict(PHASES))
    b = summary(workers=2, threads=1, phases=dict(PHASES, zoo=20.0, round=1.0, recovery=0.25, replay=0.5, kd=None))
    s = tables.speedups(a, b)
    assert s["zoo"] == 1.5 and s["round"] == 2.0 and s["replay"] == 2.0 and s["recovery"] == 2.0
    assert s["kd"] is None and s["validation"] == 1.0  # kd: b lacks it
    cfg = tables.run_config(a)  # the quick preset: 140 rounds, 10 warm-up, validations at 20, 40, ..., 140
    assert (cfg.rounds, cfg.warmup) == (140, 10)
    # a: 30 + 10 * 1 + 130 * 2 + 7 * 5 + 7 = 342 (rerun 312); b, no split (kd missing): 20 + 10 + 130 * 1 + 35 + 7 = 202
    assert s["first_run"] == pytest.approx(342 / 202) and s["rerun"] == pytest.approx(312 / 182)
    pairs = tables.worker_pairs({"a": a, "b": b, "c": summary(workers=2, shots=5)})  # c has no 1-process twin
    assert [(n1, n2) for _, _, n1, n2 in pairs] == [("a", "b")]


def test_rows_of_one_run_are_compared_at_equal_replay_work_by_hand():
    # a: 2 meta-batches a round of 0.5 s; b: 3 of 0.3 s; the run's mean: 2.5 a round
    a = summary(workers=1, threads=2, phases=dict(PHASES, replay=1.0, replay_batches=2.0))
    b = summary(workers=2, threads=1, phases=dict(PHASES, replay=0.9, replay_batches=3.0))
    other = summary(shots=5, phases=dict(PHASES, replay=1.0, replay_batches=4.0))  # another run: its own mean
    rows = tables.time_rows({"rows": {"a": a, "b": b, "other": other}})
    assert rows["a"]["phases"]["replay"] == 1.25 and rows["a"]["phases"]["round"] == 2.25  # 2.5 x 0.5; + 0.25
    assert rows["b"]["phases"]["replay"] == pytest.approx(0.75) and rows["b"]["phases"]["round"] == pytest.approx(1.85)
    assert rows["a"]["measured_phases"] is a["phases"] and rows["other"]["phases"]["replay"] == 1.0
    assert tables.speedups(rows["a"], rows["b"])["replay"] == pytest.approx(0.5 / 0.3)  # seconds per meta-batch
    old = summary(workers=2, threads=1, phases=dict(PHASES, replay=0.9))  # a record without the count
    assert tables.time_rows({"rows": {"a": a, "old": old}})["a"]["phases"] is a["phases"]  # the run stays as measured
    doc = tables.time_md({"rows": {"a": a, "b": b}})
    assert "| 2.00 | 0.50 / 0.25 / 1.00 | 2.00, 0.500 |" in doc  # the table shows what was measured


def test_ceiling_of_workers_is_the_one_thread_run_shared_out_by_hand():
    a = summary(workers=1, threads=2, phases=dict(PHASES))
    b = summary(workers=2, threads=1, phases=dict(PHASES))
    # one thread: recovery twice a's 0.5 s (a second thread halved it), replay 1.6 s against a's 1.0; else as a
    one = summary(workers=1, threads=1, phases=dict(PHASES, recovery=1.0, replay=1.6, round=2.1))
    rows = {"a": a, "b": b, "one": one}
    assert [(n1, n2) for _, _, n1, n2 in tables.worker_pairs(rows)] == [("a", "b")]  # paired on equal cores, not 1 x 1
    top, twin = tables.ceiling(a, b, rows)
    assert twin is one
    # 2 workers sharing the one-thread phases: recovery 1.0 / 2 = 0.5 s, a's own: 1.0x; replay 1.6 / 2 = 0.8 s: 1.25x
    assert top["recovery"] == 1.0 and top["replay"] == pytest.approx(1.25) and top["zoo"] == 2.0
    # projected runs (140 rounds): a 342 s; one 30 + 10 + 130 * 2.1 + 35 + 7 = 355 s, halved: 177.5 s
    assert top["first_run"] == pytest.approx(342 / 177.5)
    assert tables.ceiling(a, b, {"a": a, "b": b}) is None  # no 1 x 1 row: no ceiling
    doc = tables.time_md({"rows": rows})
    assert f"| omniglot quick 1-shot, ceiling of 2 × 1 against 1 × 2: 2 × (1 × 2 time) / (1 × 1 time) | 2.00x" in doc


def seed_results(values, method="free", flags=(), shots=1, **extra):
    """{run name: record} for one SEED_RUNS entry, one accuracy per seed."""
    return {run_name(method, list(flags) + seed_flags(seed), shots): summary(
        v, seed=seed, rounds=records.target_rounds(method, list(flags)), **extra) for seed, v in zip(SEEDS, values)}


def test_mean_std_and_paired_differences_across_seeds_by_hand():
    seeds = {**seed_results((60.0, 62.0, 67.0)), **seed_results((61.0, 61.0, 61.0), "average"),
             **seed_results((40.0, 40.0, 40.0), "random"), **seed_results((80.0, 82.0, 87.0), "maml"),
             **seed_results((59.0, 63.0, 66.0), "free", ["--no-align"]),
             **seed_results((57.0, 58.0, 62.0), "free", ["--hard-labels"])}
    # free: mean 63, sample std sqrt((9 + 1 + 16) / 2) = 3.61; average: 61, std 0
    assert tables.spread([60.0, 62.0, 67.0]) == "63.00 ± 3.61 (n = 3)" and tables.spread([61.0]) == "61.00 (n = 1)"
    assert tables.paired(seeds, ("free", []), ("average", []), 1) == [-1.0, 1.0, 6.0]
    # gap closed: (60-40)/(80-40) = 50%, (62-40)/(82-40) = 52.38%, (67-40)/(87-40) = 57.45%
    assert tables.gap_closed(seeds, 1) == pytest.approx([50.0, 2200 / 42, 2700 / 47])
    c = tables.component(seeds, "--no-align")  # +1, -1, +1: mean 1/3, std sqrt((4/9 + 16/9 + 4/9) / 2) = 1.155
    assert c["d"] == [1.0, -1.0, 1.0] and c["mean"] == pytest.approx(1 / 3)
    assert c["std"] == pytest.approx(1.1547, abs=1e-4)
    assert not c["outside"] and c["replay"] is None
    assert tables.component(seeds, "--hard-labels")["outside"]  # +3, +4, +5: mean 4 > std 1
    assert tables.component(seeds, "--no-kd") is None  # not run
    seeds[run_name("maml", [], 1)]["rounds"] = 120  # shorter than the preset's 140: waits to be continued
    assert set(tables.per_seed(seeds, "maml", [], 1)) == {1, 2}
    # the README's table: FREE 63.00 ± 3.61 at 1-shot, '–' at 5-shot; the paper's CIFAR-FS FREE beside it
    row = report.readme_table({"seeds": seeds}, Sweep(), "RESULTS.md", "fig.png").splitlines()[2]
    assert row == "| FREE | 63.00 ± 3.61 (n = 3) | – | 39.13 | 52.58 |"


def test_the_sweep_list_is_one_resumable_free_py_command_per_run(tmp_path):
    sweep = Sweep("synthetic", "smoke", str(tmp_path / "runs"), "data", threads=1)
    jobs = records.seed_jobs(sweep, shots=(1,), only=["free", "average"], seeds=(0, 1))
    assert [j.name for j in jobs] == ["synthetic-smoke-1shot-free", "synthetic-smoke-1shot-free-seed-1",
                                      "synthetic-smoke-1shot-average", "synthetic-smoke-1shot-average-seed-1"]
    assert jobs[1].line() == (f"OMP_NUM_THREADS=1 python free.py --dataset synthetic --data-root data --preset smoke "
                              f"--shots 1 --method free --seed 1 --out {tmp_path}/runs/synthetic-smoke-1shot-free-seed-1 "
                              f"--device cpu --resume")
    assert shlex.split(jobs[1].line())[1:] == jobs[1].argv()  # the executor runs the same argv (its own python)
    assert (jobs[0].rounds, jobs[2].rounds) == (free.PRESETS["smoke"]["rounds"], 0)  # average is untrained
    abl = records.seed_jobs(Sweep(), shots=(1,), only=["free --theta-tilde-opt sgd"], seeds=(2,))[0]
    assert abl.name == "omniglot-1shot-free-theta-tilde-opt-sgd-seed-2" and abl.out.startswith(str(records.RUNS))
    assert " --out experiments/runs/omniglot-1shot-free-theta-tilde-opt-sgd-seed-2 " in abl.line()  # portable
    assert len(records.seed_jobs(Sweep())) == len(records.SEED_RUNS) * len(SEEDS)
    os.makedirs(jobs[0].out)
    (tmp_path / "runs" / jobs[0].name / "results.json").write_text(json.dumps(summary(rounds=2)))
    assert not jobs[0].finished()  # 2 rounds < the smoke preset's 3: continued by the same command
    (tmp_path / "runs" / jobs[0].name / "results.json").write_text(json.dumps(summary(rounds=3)))
    assert jobs[0].finished()


def test_the_slurm_script_runs_line_i_of_the_list_as_task_i(tmp_path):
    jobs = records.seed_jobs(Sweep("synthetic", "smoke", str(tmp_path)), shots=(1,), only=["free"])
    script = records.slurm_script(jobs, str(tmp_path)).replace('eval "$line"', 'echo "$line"')  # print, not run
    assert f"#SBATCH --array=1-{len(jobs)}" in script
    for i in (1, 3):
        out = subprocess.run(["bash", "-c", script], env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(i)),
                             capture_output=True, text=True, check=True).stdout
        assert out == jobs[i - 1].line() + "\n"


class Sleeper:
    """A job for run_all: a Python child that waits, and on SIGINT writes `out`/stopped and exits 130."""

    def __init__(self, root, name):
        self.name, self.out, self.env = name, str(root / name), {}

    def argv(self):
        code = ("import os, signal, sys, time\n"
                "def stop(*a):\n    open(os.path.join(sys.argv[1], 'stopped'), 'w').close(); sys.exit(130)\n"
                "signal.signal(signal.SIGINT, stop)\nopen(os.path.join(sys.argv[1], 'started'), 'w').close()\n"
                "time.sleep(30)\n")
        return ["python", "-c", code, self.out]


def test_ctrl_c_stops_each_running_run_once_and_starts_no_queued_one(tmp_path):
    jobs = [Sleeper(tmp_path, f"run{i}") for i in range(3)]

    def interrupt_when_started():
        while not all(os.path.exists(os.path.join(j.out, "started")) for j in jobs[:2]):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches bench.py alone: its runs have their own sessions

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        records.run_all(jobs, 2, lambda job: None)
    assert all(os.path.exists(os.path.join(j.out, "stopped")) for j in jobs[:2])
    assert not os.path.exists(jobs[2].out)  # queued: never started


class FakeProcess:
    """What run_all reads of a started run: wait() returns 130 once SIGINT was sent, 0 if none came in WAIT_S."""
    WAIT_S = 2.0

    def __init__(self):
        self.interrupted = threading.Event()

    def send_signal(self, sig):
        assert sig == signal.SIGINT
        self.interrupted.set()

    def poll(self):
        return 130 if self.interrupted.is_set() else None

    def wait(self):
        return 130 if self.interrupted.wait(self.WAIT_S) else 0

    @property
    def returncode(self):
        return self.poll()


def test_ctrl_c_while_a_run_is_starting_stops_it_and_starts_no_other(tmp_path, monkeypatch):
    """Ctrl-C arrives while a run's process is being started (its start is slow): that run is still stopped
    (it was not yet among the running ones when the Ctrl-C came), and no job starts after the Ctrl-C, even one
    that a pool thread had already picked up."""
    jobs = [Sleeper(tmp_path, f"run{i}") for i in range(4)]
    started = {}

    def slow_start(argv, env, out):
        name = os.path.basename(out)
        started[name] = p = FakeProcess()
        if name == "run0":
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C now, mid-start
            time.sleep(0.3)  # the start takes a while longer: bench.py handles the Ctrl-C meanwhile
        return p

    monkeypatch.setattr(records, "start", slow_start)
    with pytest.raises(KeyboardInterrupt):
        records.run_all(jobs, 2, lambda job: None)
    assert list(started) == ["run0"]  # run1 was picked up by the second thread, and refused after the Ctrl-C
    assert started["run0"].interrupted.wait(FakeProcess.WAIT_S)


def finished_run(runs, name, acc, rounds, metrics=METRICS):
    os.makedirs(os.path.join(runs, name))
    write_metrics(os.path.join(runs, name), metrics)
    with open(os.path.join(runs, name, "results.json"), "w") as f:
        json.dump(summary(acc, rounds=rounds), f)


def test_report_collects_finished_runs_keeps_stored_ones_and_names_the_missing(tmp_path, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    sweep = Sweep(runs=str(runs))
    finished_run(runs, "omniglot-1shot-free", 61.0, 140)
    os.makedirs(runs / "omniglot-1shot-free-seed-1")  # started: 5 rounds in its metrics.jsonl, no results.json
    write_metrics(runs / "omniglot-1shot-free-seed-1", METRICS)
    records.save_results({"seeds": {"omniglot-1shot-average-seed-2": summary(59.0, rounds=0, seed=2)}}, results)
    args = argparse.Namespace(results=str(results), **{k: v for k, v in vars(sweep).items()})
    bench.bench_report(args)
    stored = records.load_results(results)
    assert set(stored["seeds"]) == {"omniglot-1shot-free", "omniglot-1shot-average-seed-2"}  # made elsewhere: kept
    assert stored["seeds"]["omniglot-1shot-free"]["val_curve"] == [[4, 50.0, 1.0], [5, 52.0, 1.5]]
    assert stored["unfinished"] == {"omniglot-1shot-free-seed-1": 5}
    jobs = records.seed_jobs(sweep)
    assert len(stored["missing"]) == len(jobs) - 2 and "omniglot-1shot-free-seed-1" in stored["missing"]
    out = capsys.readouterr().out
    assert f"report: 2 of {len(jobs)} sweep runs finished: missing " in out and "free-seed-1 (round 5 of 140)" in out
    assert "omniglot-1shot-average (not started)" in out


def test_documents_are_written_without_matplotlib_and_only_between_the_readme_markers(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    readme = tmp_path / "README.md"
    start, end = report.README_MARKERS
    readme.write_text(f"intro\n{start}\nold numbers\n{end}\noutro\n")
    results = {"seeds": seed_results((60.0, 62.0, 67.0), val_curve=[[20, 50.0, 1.0]])}
    assert report.write_documents(results, str(tmp_path / "results"), readme=readme) is False
    assert "figure skipped" in capsys.readouterr().out
    text = readme.read_text()
    assert text.startswith(f"intro\n{start}\n") and text.endswith(f"{end}\noutro\n") and "old numbers" not in text
    assert "| FREE | 63.00 ± 3.61 (n = 3) |" in text and "(RESULTS.md)" in text and "(results/val_by_round.png)" in text
    assert (tmp_path / "RESULTS.md").exists()
    readme.write_text("no markers\n")  # the README without its markers: left alone
    report.write_documents(results, str(tmp_path / "results"), readme=readme)
    assert readme.read_text() == "no markers\n"


def test_the_figure_series_by_hand():
    long = {"rounds200-omniglot-1shot-free": summary(seed=0, rounds=200, val_curve=[[20, 50.0, 1], [40, 60.0, 1]]),
            "rounds60-omniglot-1shot-free": summary(seed=0, rounds=60, val_curve=[[20, 50.0, 1]]),
            "rounds200-omniglot-1shot-free-seed-1": summary(seed=1, rounds=200, val_curve=[[20, 54.0, 1]])}
    seeds = {**seed_results((61.0, 63.0, 65.0), "average", best_val_acc=None), **seed_results((40.0,) * 3, "random")}
    for seed, v in zip(SEEDS, (60.0, 62.0, 70.0)):
        seeds[run_name("average", seed_flags(seed), 1)]["best_val_acc"] = v
    s = report.figure_series({"rounds": long, "seeds": seeds})
    assert s["per_seed"] == {0: [(20, 50.0), (40, 60.0)], 1: [(20, 54.0)]}  # each seed's longest run
    assert s["mean"] == [(20, 52.0)]  # only where every seed validated
    assert s["levels"] == {"average": pytest.approx(64.0), "random": 39.0}  # mean best_val_acc; no maml run
    assert s["preset_rounds"] == 140 and "Omniglot" in s["title"] and s["xlabel"] == "round"


def test_continue_run_copies_a_finished_run_and_refuses_an_unfinished_one(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for f in bench.CONTINUED_FILES:
        (src / f).write_text(f)
    with pytest.raises(records.UserError, match="has not finished"):  # no results.json
        bench.continue_run(str(src), str(dst))
    assert not dst.exists()
    (src / "results.json").write_text("{}")
    bench.continue_run(str(src), str(dst))
    assert sorted(os.listdir(dst)) == sorted(bench.CONTINUED_FILES) and (dst / records.METRICS).exists()
    (dst / "last.pt").write_text("trained further")
    bench.continue_run(str(src), str(dst))  # already continued: left as it is
    assert (dst / "last.pt").read_text() == "trained further"


def test_a_longer_run_continues_the_longest_finished_one_below_it_and_is_collected(tmp_path):
    runs = tmp_path / "runs"
    for name, rounds in (("omniglot-1shot-free", 60), ("rounds120-omniglot-1shot-free", 120),
                         ("rounds160-omniglot-1shot-free", None), ("rounds120-omniglot-1shot-free-seed-1", 120)):
        if rounds:
            finished_run(runs, name, 60.0, rounds)
        else:
            os.makedirs(runs / name)
    assert bench.longest_before(runs, 0, 200).endswith("rounds120-omniglot-1shot-free")
    assert bench.longest_before(runs, 0, 120).endswith(os.sep + "omniglot-1shot-free")  # not itself
    assert bench.longest_before(runs, 1, 200).endswith("rounds120-omniglot-1shot-free-seed-1")
    assert bench.longest_before(runs, 0, 60) is None and bench.longest_before(runs, 2, 200) is None
    results = {}
    bench.collect_long(results, str(runs), code="abc")
    assert set(results["rounds"]) == {"rounds120-omniglot-1shot-free", "rounds120-omniglot-1shot-free-seed-1"}
    assert results["rounds"]["rounds120-omniglot-1shot-free"]["replay_curve"] == [[3, 0.3], [4, 0.5]]


def test_the_time_rows_each_start_from_an_empty_cache_with_their_processes_and_threads(tmp_path):
    rows = [bench.TimeJob(str(tmp_path), "data", *row) for row in bench.TIME_ROWS]
    a, b = rows[0], rows[1]
    assert (a.workers, a.threads, b.workers, b.threads) == (1, 2, 2, 1) and a.cache != b.cache
    assert "--workers" not in a.argv() and b.argv()[-2:] == ["--workers", "2"]
    assert a.line().startswith("OMP_NUM_THREADS=2 ") and f"--rounds {bench.TIME_ROUNDS} " in a.line()
    assert rows[-1].rounds == free.PRESETS["smoke"]["rounds"] and "--preset smoke" in rows[-1].line()


def test_two_bench_processes_recording_at_once_keep_each_others_runs(tmp_path):
    records.save_results({"seeds": {"b": summary(50.0)}}, tmp_path)  # an old run of B's row
    a, b = records.load_results(tmp_path), records.load_results(tmp_path)  # both load results.json at their start
    records.store(b, tmp_path, "seeds", "b", summary(51.0))  # B reruns its row
    records.store(a, tmp_path, "seeds", "a", summary(60.0))  # A records later, from its old copy
    on_disk = records.load_results(tmp_path)["seeds"]
    assert {k: v["test_acc"] for k, v in on_disk.items()} == {"a": 60.0, "b": 51.0} and a["seeds"] == on_disk


def test_results_json_puts_a_curve_on_one_line_and_reads_back_the_same():
    results = {"rounds": {"r": {"val_curve": [[20, 57.74, 1.41], [80, 61.05, 1.5]], "note": "a [ b ] c",
                                "seeds": [0, 1], "rows": [{"acc": [1, 2]}], "empty": []}}}
    text = records.compact_json(results)
    assert json.loads(text) == results
    lines = text.splitlines()
    assert '   "val_curve": [[20, 57.74, 1.41], [80, 61.05, 1.5]],' in lines and '     "acc": [1, 2]' in lines


class LookupTeacher(torch.nn.Module):
    """A 2-way 'teacher' whose prediction for an image is looked up by the image's id (pixel value * 255)."""

    def __init__(self, prediction_of_id):
        super().__init__()
        self.prediction_of_id = prediction_of_id

    def forward(self, x):
        ids = (x[:, 0, 0, 0] * 255).round().long().tolist()
        return torch.nn.functional.one_hot(torch.tensor([self.prediction_of_id[i] for i in ids]), 2).float()


def test_cross_teacher_agreement_by_hand(monkeypatch):
    # A holds classes [5, 7], B holds [7, 9]: they share class 7 (A's local 1, B's local 0). Images are ids.
    a = types.SimpleNamespace(classes=[5, 7], model=LookupTeacher({8: 1, 9: 1, 4: 1, 5: 0, 6: 0}))
    b = types.SimpleNamespace(classes=[7, 9], model=LookupTeacher({2: 0, 3: 1, 4: 0, 5: 0, 7: 1}))
    recovered = {a.model: ([0, 1, 2, 3], 0.75), b.model: ([8, 9, 10, 11], 1.0)}  # labels [0, 0, 1, 1] each

    def fake_recovery(G, teacher, way, *args, **kwargs):
        ids, acc = recovered[teacher]
        x = torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1) / 255
        return recover.RecoveredTask(x, torch.tensor([0, 0, 1, 1]), None, acc, None, 0.0)

    monkeypatch.setattr(recover, "recover_task", fake_recovery)
    train = types.SimpleNamespace(images=torch.tensor([4, 5, 6, 7], dtype=torch.uint8).view(-1, 1, 1, 1),
                                  labels=torch.tensor([7, 7, 5, 9]))  # real images 4, 5 are of class 7
    ds = types.SimpleNamespace(name="omniglot", splits={"train": train})
    row = probes.cross_teacher_agreement([a, b], None, None, free.Config(way=2, n_per_class=2), ds)
    # (A, B, 7): B labels A's images 2, 3 of class 7 as 0, 1 -> 0.5; B on real 4, 5 -> 0, 0 -> 1.0
    # (B, A, 7): A labels B's images 8, 9 of class 7 as 1, 1 -> 1.0; A on real 4, 5 -> 1, 0 -> 0.5
    assert row == {"own": (0.75 + 1.0) / 2, "other": (0.5 + 1.0) / 2, "other_real": (1.0 + 0.5) / 2, "triples": 2}


def test_kd_probe_evaluates_each_body_with_each_head_by_hand():
    # states tagged by value: body entries carry 1/2/3 (init/kd/free), head entries 10/20/30
    theta = {key: {"blocks.0.0.weight": torch.full((2, 2), float(i)), "head.weight": torch.full((2, 2), 10.0 * i),
                   "head.bias": torch.full((2,), 10.0 * i)} for i, key in enumerate(("init", "kd", "free"), 1)}
    zero = probes.combine(theta["free"], None)
    assert zero["head.weight"].eq(0).all() and zero["head.bias"].eq(0).all() and zero["blocks.0.0.weight"].eq(3).all()
    assert theta["free"]["head.weight"].eq(30).all()  # combine copies nothing into its inputs

    def tag(s):  # body tag + head tag, e.g. 21 = KD-only body with the initial head
        return s["blocks.0.0.weight"][0, 0].item() * 10 + s["head.weight"][0, 0].item() / 10
    row = probes.swapped_accuracies(theta, tag)
    assert row == {"initial θ_0 (random init)": 11, "initial body, head zeroed": 10,
                   "initial body, KD-only run's head": 12, "KD-only run": 22, "KD-only body, head zeroed": 20,
                   "KD-only body, initial head": 21, "FREE": 33, "FREE's body, head zeroed": 30}
    # body alone: 21 - 11 = +10 on both seeds; head alone: 12 - 11 = +1; both: 22 - 11 = +11
    d = tables.kd_diffs({"0": dict(row), "1": {k: v + 1.5 for k, v in row.items()}})
    assert d == {"body alone": [10, 10], "head alone": [1, 1], "body and head": [11, 11]}


TINY = ["--n-teachers", "3", "--zoo-batch", "32", "--B", "2", "--nf", "8", "--k", "2", "--n-per-class", "4",
        "--meta-batch", "2", "--max-replay", "1",
        "--val-tasks", "4", "--test-tasks", "4", "--rounds", "3", "--warmup", "1", "--eval-every", "3",
        "--train-inner-steps", "1", "--test-inner-steps", "2"]


def test_gpu_benchmark_runs_on_the_cpu_with_tiny_counts(tmp_path, monkeypatch):
    """`bench.py gpu`'s whole path (paper preset, per-phase times from a real run's metrics.jsonl, the projection)
    on the CPU with tiny counts, so it is known to work before a GPU is at hand."""
    monkeypatch.setattr(bench, "GPU_ROUNDS", 3)
    args = argparse.Namespace(shots=[5], runs=str(tmp_path / "runs"), results=str(tmp_path / "results"))
    bench.bench_gpu(args, device="cpu", extra=TINY)  # 1-shot takes the same path
    g = records.load_results(tmp_path / "results")["gpu"]
    assert g["card"].startswith("cpu") and list(g["runs"]) == ["gpu-paper-synthetic-5shot-1worker"]
    r = g["runs"]["gpu-paper-synthetic-5shot-1worker"]
    ph = r["phases"]
    assert (ph["warmup_rounds"], ph["train_rounds"], ph["validations"]) == (1, 2, 1) and ph["test"] > 0
    assert ph["round"] >= ph["recovery"] + ph["replay"] > 0 and "--preset paper" in r["command"]


def test_every_flag_has_help_and_bad_values_end_in_one_error_line(capsys, monkeypatch, tmp_path):
    parser = bench.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.description and p.description.endswith("."), name
        for action in p._actions:
            assert action.help and not action.help.endswith((",", " the", " a")), (name, action.dest)
    for argv in (["seeds", "--jobs", "0"], ["nosuch"], ["rounds", "--rounds", "x"]):
        with pytest.raises(SystemExit) as e:
            bench.cli(argv)
        assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code), argv
    assert bench.cli(["sweep", "--runs", "/proc/nosuch/runs"]) == 1
    assert bench.cli(["sweep", "--only", "nosuch"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(bench.SUBCOMMANDS, "sweep", (interrupted,) + bench.SUBCOMMANDS["sweep"][1:])
    assert bench.cli(["sweep", "--runs", str(tmp_path)]) == 130
    assert capsys.readouterr().err.count("\n") == 1


def test_the_document_is_written_from_empty_and_from_new_form_records(tmp_path):
    assert "# Results" in report.document({}, Sweep(), str(tmp_path), str(tmp_path / "results"))
    a = summary(workers=1, threads=2, phases=dict(PHASES))
    b = summary(workers=2, threads=1, phases=dict(PHASES, zoo=20.0, round=1.0, recovery=0.25, replay=0.5, kd=None))
    results = {"time": {"rows": {"a": a, "b": b}}, "seeds": seed_results((60.0, 62.0, 67.0)),
               "rounds": {"rounds200-omniglot-1shot-free": summary(seed=0, rounds=200, val_curve=[[20, 50.0, 1.0]],
                                                                   replay_curve=[[200, 0.4]])}}
    doc = report.document(results, Sweep(), str(tmp_path), str(tmp_path / "results"))
    s = tables.speedups(a, b)
    assert f"| {s['first_run']:.2f}x | {s['rerun']:.2f}x |" in doc  # the speed-up row of the time table
    # 1 × 2 row, a first run projected at 342 s = 0:05:42 and a rerun at 312 s = 0:05:12
    assert "| 140 rounds: 0:05:42 / 0:05:12 |" in doc and "| FREE val, round 20 | 50.00 ± 1.00 | – | – |" in doc


def test_adapt_table_is_the_mean_over_seeds_with_their_range_and_no_learned_head_off_the_trained_way():
    rows = [dict(seed=s, way=w, shots=1, head=h, acc=acc, ci95=1.0, tasks=200, steps=10)
            for s, w, h, acc in [(0, 5, "learned", 70.0), (1, 5, "learned", 74.0), (0, 5, "prototype", 60.0),
                                 (1, 5, "prototype", 62.0), (0, 5, "zero", 40.0), (1, 5, "zero", 44.0),
                                 (0, 10, "prototype", 50.0), (1, 10, "prototype", 53.0), (0, 10, "zero", 20.0),
                                 (1, 10, "zero", 22.0)]]
    md = tables.adapt_md({"trained_way": 5, "rows": rows})
    assert "| 5 | 1 | 20 | 72.0 [70.0, 74.0] | 61.0 [60.0, 62.0] | 42.0 [40.0, 44.0] |" in md
    assert "| 10 | 1 | 10 | – | 51.5 [50.0, 53.0] | 21.0 [20.0, 22.0] |" in md
    assert "seeds 0, 1" in md and "200 tasks" in md and "10 SGD steps" in md


def test_resize_table_is_the_median_over_teachers_by_run_format_native_first():
    rows = [dict(teacher=t, size=s, channels=c, teacher_acc=ta, student_acc=sa, seconds=sec)
            for t, s, c, ta, sa, sec in [(0, 28, 1, 1.0, 0.5, 2.0), (1, 28, 1, 0.9, 0.7, 4.0), (2, 28, 1, 0.8, 0.6, 3.0),
                                         (0, 32, 3, 0.6, 0.2, 5.0), (1, 32, 3, 0.7, 0.4, 7.0), (2, 32, 3, 0.5, 0.3, 6.0)]]
    md = tables.resize_md({"rows": rows, "steps": 40, "student_steps": 100, "teacher_size": 28, "teacher_channels": 1})
    lines = [line for line in md.splitlines() if line.startswith("| 28x28x1") or line.startswith("| 32x32x3")]
    assert lines == ["| 28x28x1 (the teachers' own) | 90.0% | 60.0% | 3.0 |", "| 32x32x3 | 60.0% | 30.0% | 6.0 |"]
    assert "Medians over 3 teachers" in md
