"""bench.py's bookkeeping on hand-made run results (no training): the GPU projection, the run-to-run
summary, the threads column, and `report` collecting finished runs into results.json, results.md
and the README; the memory-bank diagnostic on hand-made teachers; the KD probe's pairing of
bodies and heads."""
import argparse
import json
import os
import types

import pytest
import torch

import bench
import free
import recover


def run(acc, **extra):
    """A free.py results.json, reduced to what bench.py reads."""
    return dict(test_acc=acc, test_ci95=0.5, wall_seconds=10.0, peak_memory_mb=100.0, **extra)


def test_paper_run_validates_49_times():
    # rounds 21..1000 (after the 20 warm-up rounds), every 20th: 40, 60, ..., 1000
    paper = free.Config()
    assert sum(free.is_validation_round(paper, r) for r in range(1, paper.rounds + 1)) == 49


def test_projection_counts_warmup_training_validation_and_test():
    cfg = free.Config(rounds=10, warmup=2, eval_every=4)  # validations after rounds 4, 8 and 10 (the last)
    res = {"seconds_per_warmup_round": 1.0, "seconds_per_round": 2.0, "seconds_per_validation": 5.0,
           "test_seconds": 7.0}
    assert bench.projected_seconds(res, cfg) == 2 * 1.0 + 8 * 2.0 + 3 * 5.0 + 7.0  # 40 s


def seed_results(values, method="free", flags=(), shots=1):
    """{run name: results} for one SEED_RUNS entry, one accuracy per seed."""
    return {bench.run_name(method, list(flags) + bench.seed_flags(seed), shots):
            run(v, torch_threads=1, rounds=bench.target_rounds(method, list(flags))) for seed, v in zip(bench.SEEDS, values)}


def test_seed_summary_by_hand():
    seeds = {**seed_results((60.0, 62.0, 67.0)), **seed_results((61.0, 61.0, 61.0), "average"),
             **seed_results((40.0, 40.0, 40.0), "random"), **seed_results((80.0, 82.0, 87.0), "maml"),
             **seed_results((59.0, 63.0, 66.0), "free", ["--no-align"]),
             **seed_results((57.0, 58.0, 62.0), "free", ["--hard-labels"])}
    md = bench.seeds_md(seeds)
    # free: mean 63, sample std sqrt((9 + 1 + 16) / 2) = 3.61; average: 61, std 0
    assert "| free | 63.00 ± 3.61 (n = 3) | – | 10 / – | 39.13 / 52.58 |" in md
    assert "| average | 61.00 ± 0.00 (n = 3) | – |" in md
    assert "| free, 1-shot | 60.00 ± 0.50 | 62.00 ± 0.50 | 67.00 ± 0.50 | 1 |" in md
    # free - average per seed: -1, +1, +6 (mean +2.00)
    assert "- 1-shot, FREE − average: per seed -1.00, +1.00, +6.00; mean +2.00, positive on 2/3 seeds." in md
    # gap closed: (60-40)/(80-40) = 50%, (62-40)/(82-40) = 52.4%, (67-40)/(87-40) = 57.4%; mean 53%
    assert "share of the gap from random init to data-based MAML that FREE closes: 53% (mean over 3 seeds)" in md
    # free - (free --no-align): +1, -1, +1 (mean +0.33, std sqrt((4/9 + 16/9 + 4/9) / 2) = 1.15 > 0.33)
    assert ("FREE − `free --no-align` per seed +1.00, -1.00, +1.00; mean +0.33 (helps on the mean, std 1.15, within "
            "its spread across seeds; positive on 2/3 seeds)") in md
    # free - (free --hard-labels): +3, +4, +5 (mean +4.00, std 1.00 < 4.00)
    assert ("FREE − `free --hard-labels` per seed +3.00, +4.00, +5.00; mean +4.00 (helps on the mean, std 1.00, "
            "outside its spread across seeds; positive on 3/3 seeds)") in md
    assert "5-shot, FREE" not in md  # 5-shot not run: no summary
    assert "Replay accuracy" not in md  # no replay_acc recorded (bench.py report reads it from log.txt)
    for seed, a, b in ((0, 0.4, 0.6), (1, 0.5, 0.8)):  # on seeds 0 and 1 only: means 0.45 and 0.70
        seeds[bench.run_name("free", bench.seed_flags(seed), 1)]["replay_acc"] = a
        seeds[bench.run_name("free", ["--no-align"] + bench.seed_flags(seed), 1)]["replay_acc"] = b
    assert ("on 2/3 seeds). Replay accuracy on bank tasks, last 10 rounds, mean over seeds 0, 1: 0.700 against "
            "FREE's 0.450.") in bench.seeds_md(seeds)
    seeds[bench.run_name("maml", [], 1)]["rounds"] = bench.QUICK_ROUNDS - 20  # shorter than the preset: not counted
    md = bench.seeds_md(seeds)
    assert "| maml | 84.50 ± 3.54 (n = 2) |" in md and "closes: 55% (mean over 2 seeds)" in md


def test_unfinished_runs_are_read_from_their_logs_and_listed_until_they_finish(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = "zoo ...\nround    1 warm-up | rec 1s\nround   20 train   | kd 1.0\nround   20 val 55.00 ± 1.00 (best 55.00)\n"
    runs = {bench.run_name("free", ["--no-align"] + bench.seed_flags(2), 1): (log, None),  # interrupted at 20
            bench.run_name("maml", [], 1): (log, 60),  # a finished 60-round run being continued: still 20 in this log
            bench.run_name("free", [], 1): (log, bench.QUICK_ROUNDS),  # finished
            bench.run_name("average", [], 1): (log, None)}  # untrained: not a resumable run
    for name, (text, rounds) in runs.items():
        os.makedirs(os.path.join(bench.OUT, "runs", name))
        open(os.path.join(bench.OUT, "runs", name, "log.txt"), "w").write(text)
        if rounds is not None:
            json.dump(run(60.0, rounds=rounds), open(os.path.join(bench.OUT, "runs", name, "results.json"), "w"))
    results = {}
    bench.collect_unfinished(results)
    assert results["unfinished"] == {bench.run_name("free", ["--no-align", "--seed", "2"], 1): 20,
                                     bench.run_name("maml", [], 1): 20}
    md = bench.seeds_md({bench.run_name("free", [], 1): run(60.0, rounds=bench.QUICK_ROUNDS)}, None, results["unfinished"])
    assert (f"- Not finished when the report was written (`bench.py seeds` resumes them): `free --no-align` 1-shot "
            f"seed 2 at round 20 of {bench.QUICK_ROUNDS}; `maml` 1-shot seed 0 at round 20 of {bench.QUICK_ROUNDS}.") in md
    seeds = seed_results((70.0, 70.0, 70.0), "free", ["--no-align"])  # once finished, the stale entry is not listed
    assert "no-align` 1-shot seed 2" not in bench.seeds_md(seeds, None, results["unfinished"])


def test_report_collects_finished_runs_and_rewrites_only_the_readme_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, res in (("omniglot-1shot-free", run(61.0, rounds=bench.QUICK_ROUNDS)),
                      ("omniglot-1shot-average-seed-1", run(59.0, rounds=0))):
        os.makedirs(os.path.join(bench.OUT, "runs", name))
        json.dump(res, open(os.path.join(bench.OUT, "runs", name, "results.json"), "w"))
    os.makedirs(os.path.join(bench.OUT, "runs", "omniglot-1shot-random"))  # unfinished: no results.json
    R = bench.QUICK_ROUNDS  # replay accuracy of the last 10 rounds: rounds R-9..R only (R-10 is outside the window)
    log = "".join(f"round {r:4d} train   | kd 1.0 | replay_acc {a} | x4\n" for r, a in ((R - 10, 0.9), (R - 9, 0.3), (R, 0.5)))
    open(os.path.join(bench.OUT, "runs", "omniglot-1shot-free", "log.txt"), "w").write(log + f"round {R:4d} val 60.00 ± 1.00\n")
    start, end = bench.README_MARKERS
    open("README.md", "w").write(f"intro\n{start}\nold numbers\n{end}\noutro\n")
    bench.bench_report(None)
    results = json.load(open(os.path.join(bench.OUT, "results.json")))
    assert set(results["seeds"]) == {"omniglot-1shot-free", "omniglot-1shot-average-seed-1"}
    assert results["seeds"]["omniglot-1shot-free"]["replay_acc"] == pytest.approx((0.3 + 0.5) / 2)
    assert "replay_acc" not in results["seeds"]["omniglot-1shot-average-seed-1"]  # untrained: no replay, no log read
    readme = open("README.md").read()
    assert readme.startswith(f"intro\n{start}\n") and readme.endswith(f"{end}\noutro\n")
    assert "old numbers" not in readme and open(os.path.join(bench.OUT, "results.md")).read() in readme
    assert "| free | 61.00 (n = 1) | – |" in readme and "| free, 1-shot | 61.00 ± 0.50 | – | – | ? |" in readme
    assert "| average, 1-shot | – | 59.00 ± 0.50 | – | ? |" in readme


def test_two_bench_processes_recording_at_once_keep_each_others_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job_a, job_b = ("free", [], 1), ("average", [], 5)
    bench.save_results({"seeds": {bench.run_name(*job_b): run(50.0, rounds=0)}})  # an old run of B's row
    a, b = bench.load_results(), bench.load_results()  # both processes load results.json at their start
    bench.record(b, "seeds", job_b, run(51.0, rounds=0), "ran")  # B reruns its row
    bench.record(a, "seeds", job_a, run(60.0, rounds=bench.QUICK_ROUNDS), "ran")  # A records later, from its old copy
    on_disk = json.load(open(os.path.join(bench.OUT, "results.json")))["seeds"]
    assert {k: v["test_acc"] for k, v in on_disk.items()} == {bench.run_name(*job_a): 60.0, bench.run_name(*job_b): 51.0}
    assert a["seeds"] == on_disk  # A's copy is refreshed, so its later saves keep B's run too


def test_time_table_shows_the_round_split():
    r = run(60.0, shots=1, rounds=60, torch_threads=2, seconds_per_warmup_round=1.5, seconds_per_round=7.5,
            seconds_per_round_recovery=1.0, seconds_per_round_kd=0.25, seconds_per_round_replay=6.0,
            seconds_per_validation=20.0, test_seconds=65.0)
    md = bench.time_md({"time-omniglot-1shot-free": r})
    quick = free.parse_args(["--dataset", "omniglot", "--preset", "quick"])
    validations = quick.rounds // quick.eval_every  # every 20th round; the last round is one of them
    minutes = (quick.warmup * 1.5 + (quick.rounds - quick.warmup) * 7.5 + validations * 20.0 + 65.0) / 60
    assert f"| free | 1 | 60 | 10 | 2 | 1.50 | 7.50 | 1.00 / 0.25 / 6.00 | 20.0 | 65.0 | 60.00 ± 0.50 | {minutes:.0f} min |" in md
    assert f"| {quick.rounds} rounds alone, projected |" in md
    # by phase: 10 warm-up rounds of 1.5 s; 130 training rounds of 1.0 recovery, 0.25 KD, 6.0 replay and 0.25 else
    train = quick.rounds - quick.warmup
    phases = [15.0, train * 1.0, train * 0.25, train * 6.0, train * 0.25, validations * 20.0, 65.0]
    total = sum(phases)
    assert abs(total - minutes * 60) < 1e-6
    names = ["warm-up", "recovery", "KD + Eq. (3)", "replay", "rest of a round", "meta-validation", "meta-test"]
    shares = ", ".join(f"{n} {p:.0f} s ({100 * p / total:.0f}%)" for n, p in zip(names, phases))
    assert f"- free, 1-shot, a {quick.rounds}-round run alone, projected: {total:.0f} s = {shares}." in md
    r["seconds_per_round"] = 7.25  # nothing outside the three phases: no "rest of a round 0 s"
    assert "rest of a round" not in bench.time_md({"time-omniglot-1shot-free": r})
    fomaml = bench.time_md({bench.time_name("free", ["--first-order"], 1): r})  # a row is named by its flags
    assert "| free --first-order | 1 | 60 |" in fomaml and "- free --first-order, 1-shot, a" in fomaml


TINY = ["--n-teachers", "3", "--zoo-batch", "32", "--B", "2", "--nf", "8", "--meta-batch", "2", "--max-replay", "1",
        "--val-tasks", "4", "--test-tasks", "4", "--rounds", "3", "--warmup", "1", "--eval-every", "3",
        "--train-inner-steps", "1", "--test-inner-steps", "2"]


def test_gpu_benchmark_runs_on_the_cpu_with_tiny_counts(tmp_path, monkeypatch):
    """`bench.py gpu`'s whole path (paper preset, 1- and 5-shot, per-phase times, projection, report) on
    the CPU with tiny counts, so it is known to work before a GPU is at hand."""
    monkeypatch.chdir(tmp_path)
    bench.bench_gpu(argparse.Namespace(shots=[5]), device="cpu", extra=TINY)  # 1-shot takes the same path
    g = json.load(open(os.path.join(bench.OUT, "results.json")))["gpu"]
    assert g["card"].startswith("cpu") and set(g["runs"]) == {"5"}
    for r in g["runs"].values():
        assert all(r[k] > 0 for k in bench.GPU_FIELDS), r
        assert r["seconds_per_round"] >= r["seconds_per_round_recovery"] + r["seconds_per_round_replay"]
        assert "--preset paper" in r["command"] and r["projected_minutes"] > 0
    md = open(os.path.join(bench.OUT, "results.md")).read()
    assert "### GPU: cpu" in md and md.count(" min |") == 1


def test_report_says_plainly_when_no_gpu_run_exists():
    assert "No GPU run exists yet" in bench.report({})


def test_val_and_replay_curves_are_read_from_a_log(tmp_path):
    (tmp_path / "log.txt").write_text("round   19 train   | rec 1.0s | replay_acc 0.410 | x4\n"
                                      "round   20 val 57.74 ± 1.41 (best 57.74)\n"
                                      "resumed from last.pt at round 60\nround   80 val 61.05 ± 1.50 (best 61.05)\n")
    assert bench.log_curves(str(tmp_path)) == {"val_curve": [[20, 57.74, 1.41], [80, 61.05, 1.5]],
                                                "replay_curve": [[19, 0.41]]}


def test_results_json_puts_a_curve_on_one_line_and_reads_back_the_same():
    results = {"rounds": {"r": {"val_curve": [[20, 57.74, 1.41], [80, 61.05, 1.5]], "note": "a [ b ] c",
                                "seeds": [0, 1], "rows": [{"acc": [1, 2]}], "empty": []}}}
    text = bench.compact_json(results)
    assert json.loads(text) == results
    lines = text.splitlines()
    assert '   "val_curve": [[20, 57.74, 1.41], [80, 61.05, 1.5]],' in lines
    assert '   "seeds": [0, 1],' in lines and '     "acc": [1, 2]' in lines and '   "empty": []' in lines
    assert '   "note": "a [ b ] c",' in lines  # brackets inside a string are left alone


def test_continue_run_copies_a_finished_run_and_refuses_an_unfinished_one(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for f in ("config.json", "log.txt", "best.pt", "last.pt"):
        (src / f).write_text(f)
    with pytest.raises(bench.UserError, match="has not finished"):  # no results.json
        bench.continue_run(str(src), str(dst))
    assert not dst.exists()
    (src / "results.json").write_text("{}")
    bench.continue_run(str(src), str(dst))
    assert sorted(os.listdir(dst)) == ["best.pt", "config.json", "last.pt", "log.txt"]
    (dst / "last.pt").write_text("trained further")
    bench.continue_run(str(src), str(dst))  # already continued: left as it is
    assert (dst / "last.pt").read_text() == "trained further"


def test_rounds_table_by_hand():
    curves = {0: [[20, 50.0, 1.0], [120, 70.0, 1.0]], 1: [[20, 52.0, 1.0], [120, 66.0, 1.0]]}
    long = {bench.long_name(120, s): run(t, seed=s, rounds=120, val_curve=curves[s]) for s, t in ((0, 71.0), (1, 64.0))}
    long[bench.long_name(80, 0)] = run(60.0, seed=0, rounds=80, val_curve=curves[0][:1])
    long[bench.long_name(120, 0)]["replay_curve"] = [[r, 0.2 if r <= 110 else 0.5] for r in range(11, 121)]
    seeds = {bench.run_name("average", bench.seed_flags(s), 1): run(65.0, best_val_acc=v)
             for s, v in ((0, 63.0), (1, 64.5))}
    seeds[bench.run_name("free", [], 1)] = run(58.0, seed=0, rounds=bench.QUICK_ROUNDS)  # the quick preset's own run
    md = bench.rounds_md(long, seeds)
    q = bench.QUICK_ROUNDS  # above 120
    assert f"| FREE test, {q} rounds | 58.00 ± 0.50 | – | – |" in md
    assert "| replay_acc, rounds 111-120 | 0.500 | – | – |" in md and "| replay_acc, rounds 71-80 | 0.200 | – | – |" in md
    assert md.index("test, 80 rounds") < md.index("test, 120 rounds") < md.index(f"test, {q} rounds")
    assert "| FREE val, round 20 | 50.00 ± 1.00 | 52.00 ± 1.00 | – |" in md  # the longest runs' logs
    assert "| FREE val, round 120 | 70.00 ± 1.00 | 66.00 ± 1.00 | – |" in md
    assert "| average val | 63.00 | 64.50 | – |" in md
    assert "| FREE test, 80 rounds | 60.00 ± 0.50 | – | – |" in md
    assert "| FREE test, 120 rounds | 71.00 ± 0.50 | 64.00 ± 0.50 | – |" in md
    # FREE - average on test: 71 - 65 = +6, 64 - 65 = -1; mean +2.50
    assert "| FREE − average, test, 120 rounds | +6.00 | -1.00 | – |" in md
    # FREE over seeds at 120 rounds: 71 and 64, mean 67.50, sample std 4.95
    assert "- 120 rounds, FREE − average (test): mean +2.50, positive on 1/2 seeds; FREE 67.50 ± 4.95 (n = 2)." in md
    assert "- 80 rounds, FREE − average (test): mean -5.00, positive on 0/1 seeds; FREE 60.00 (n = 1)." in md
    assert "fewest rounds" not in md  # seed 1 at round 120: 66 - 64.5 = 1.5 < 3, and seed 2 has no run
    timed = {"seconds_per_warmup_round": 1.0, "seconds_per_round": 2.0, "seconds_per_validation": 5.0,
             "test_seconds": 7.0}
    # quick preset at 120 rounds: 10 warm-up rounds, 110 training rounds, validations at 20, 40, ..., 120, the test
    assert "Alone on this CPU: 4 min" in bench.rounds_md(long, seeds, timed)  # 10 + 220 + 6 * 5 + 7 = 267 s


def test_the_val_rule_names_the_fewest_rounds_ahead_of_average_by_the_margin_on_every_seed(monkeypatch):
    monkeypatch.setattr(bench, "SEEDS", (0, 1))
    # FREE val - average val: round 20: -13, -12.5; round 40: +4, +2.5; round 60: +7, +3.5 -> 60
    curves = {0: [[20, 50.0, 1.0], [40, 67.0, 1.0], [60, 70.0, 1.0]], 1: [[20, 52.0, 1.0], [40, 67.0, 1.0],
                                                                          [60, 68.0, 1.0]]}
    long = {bench.long_name(60, s): run(70.0, seed=s, rounds=60, val_curve=curves[s]) for s in (0, 1)}
    seeds = {bench.run_name("average", bench.seed_flags(s), 1): run(65.0, best_val_acc=v)
             for s, v in ((0, 63.0), (1, 64.5))}
    md = bench.rounds_md(long, seeds)
    assert (f"- Meta-validation: the fewest rounds at which FREE beats `average` by 3 points or more on every seed: "
            f"60 (the quick preset runs {bench.QUICK_ROUNDS}).") in md


def test_a_longer_run_continues_the_longest_finished_one_below_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / bench.OUT / "runs"
    for name, rounds in (("omniglot-1shot-free", 60), ("rounds120-omniglot-1shot-free", 120),
                         ("rounds160-omniglot-1shot-free", None), ("rounds120-omniglot-1shot-free-seed-1", 120)):
        (runs / name).mkdir(parents=True)
        (runs / name / "log.txt").write_text("round   20 val 50.00 ± 1.00 (best 50.00)\n")
        if rounds:  # finished
            (runs / name / "results.json").write_text(json.dumps(run(60.0, seed=0, rounds=rounds)))
    assert bench.longest_before(0, 200).endswith(os.path.join("runs", "rounds120-omniglot-1shot-free"))
    assert bench.longest_before(0, 120).endswith(os.path.join("runs", "omniglot-1shot-free"))  # not itself
    assert bench.longest_before(1, 200).endswith(os.path.join("runs", "rounds120-omniglot-1shot-free-seed-1"))
    assert bench.longest_before(0, 60) is None and bench.longest_before(2, 200) is None  # from round 0
    results = {}
    bench.collect_long(results)  # finished continuations only, with their validation curves
    assert set(results["rounds"]) == {"rounds120-omniglot-1shot-free", "rounds120-omniglot-1shot-free-seed-1"}
    assert results["rounds"]["rounds120-omniglot-1shot-free"]["val_curve"] == [[20, 50.0, 1.0]]


def test_a_finished_run_shorter_than_asked_is_continued_and_others_are_read_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_free(cmd, stdout, **kw):  # stands in for the free.py subprocess: records it, writes its results
        calls.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        rounds = int(cmd[cmd.index("--rounds") + 1]) if "--rounds" in cmd else bench.QUICK_ROUNDS
        (tmp_path / out / "results.json").write_text(json.dumps(run(70.0, rounds=rounds)))

    monkeypatch.setattr(bench.subprocess, "run", fake_free)
    args = argparse.Namespace(data_root="data", threads=1)
    for name, rounds in (("omniglot-1shot-free", 60), ("omniglot-1shot-maml", bench.QUICK_ROUNDS),
                         ("omniglot-1shot-average", 0)):
        (tmp_path / bench.OUT / "runs" / name).mkdir(parents=True)
        (tmp_path / bench.OUT / "runs" / name / "results.json").write_text(json.dumps(run(60.0, rounds=rounds)))
        (tmp_path / bench.OUT / "runs" / name / "last.pt").write_text("state")
    assert bench.run_one("maml", [], 1, args) == (run(60.0, rounds=bench.QUICK_ROUNDS), "cached")
    assert bench.run_one("average", [], 1, args) == (run(60.0, rounds=0), "cached")  # untrained: never continued
    assert calls == []
    res, how = bench.run_one("free", [], 1, args)  # 60 rounds < the quick preset's: continued in place
    assert (res["rounds"], how) == (bench.QUICK_ROUNDS, "continued from 60 rounds")
    assert calls[0][-1] == "--resume" and "--rounds" not in calls[0]  # the preset's rounds
    res, how = bench.run_one("free", ["--rounds", str(bench.QUICK_ROUNDS + 20)], 1, args, name="omniglot-1shot-free")
    assert (res["rounds"], how) == (bench.QUICK_ROUNDS + 20, f"continued from {bench.QUICK_ROUNDS} rounds")


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
    row = bench.cross_teacher_agreement([a, b], None, None, free.Config(way=2, n_per_class=2), ds)
    # (A, B, 7): B labels A's images 2, 3 of class 7 as 0, 1 -> 0.5; B on real 4, 5 -> 0, 0 -> 1.0
    # (B, A, 7): A labels B's images 8, 9 of class 7 as 1, 1 -> 1.0; A on real 4, 5 -> 1, 0 -> 0.5
    assert row == {"own": (0.75 + 1.0) / 2, "other": (0.5 + 1.0) / 2, "other_real": (1.0 + 0.5) / 2, "triples": 2}
    md = bench.bank_md({"0": dict(row, free_on_bank=0.4, free_on_real=0.7, maml_on_bank=0.35, maml_on_real=0.9,
                                  teachers_per_class=3.0)})
    assert "| teacher B sharing a class with A, on A's recovered images of it | 75.0% |" in md
    assert "| data-based MAML's best.pt, on real meta-train tasks | 90.0% |" in md


def test_kd_probe_evaluates_each_body_with_each_head_by_hand():
    # states tagged by value: body entries carry 1/2/3 (init/kd/free), head entries 10/20/30
    theta = {key: {"blocks.0.0.weight": torch.full((2, 2), float(i)), "head.weight": torch.full((2, 2), 10.0 * i),
                   "head.bias": torch.full((2,), 10.0 * i)} for i, key in enumerate(("init", "kd", "free"), 1)}
    state = bench.combine(theta["kd"], theta["init"])
    assert torch.equal(state["blocks.0.0.weight"], theta["kd"]["blocks.0.0.weight"])
    assert torch.equal(state["head.weight"], theta["init"]["head.weight"]) and state["head.bias"].eq(10.0).all()
    zero = bench.combine(theta["free"], None)
    assert zero["head.weight"].eq(0).all() and zero["head.bias"].eq(0).all() and zero["blocks.0.0.weight"].eq(3).all()
    assert theta["free"]["head.weight"].eq(30).all()  # combine copies nothing into its inputs

    def tag(s):  # body tag + head tag, e.g. 21 = KD-only body with the initial head
        return s["blocks.0.0.weight"][0, 0].item() * 10 + s["head.weight"][0, 0].item() / 10
    row = bench.swapped_accuracies(theta, tag)
    assert row == {"initial θ_0 (random init)": 11, "initial body, head zeroed": 10,
                   "initial body, KD-only run's head": 12, "KD-only run": 22, "KD-only body, head zeroed": 20,
                   "KD-only body, initial head": 21, "FREE": 33, "FREE's body, head zeroed": 30}
    md = bench.kd_md({"0": dict(row), "1": {k: v + 1.5 for k, v in row.items()}})
    assert "| KD-only body, initial head | 21.00 | 22.50 |" in md
    # body alone: 21 - 11 = +10 on both seeds; head alone: 12 - 11 = +1
    assert "body alone (KD-only body, initial head) − initial θ_0: per seed +10.00, +10.00; mean +10.00." in md
    assert "head alone (initial body, KD-only run's head) − initial θ_0: per seed +1.00, +1.00; mean +1.00." in md
    assert "body and head (KD-only run) − initial θ_0: per seed +11.00, +11.00; mean +11.00." in md
