"""bench.py's bookkeeping on hand-made run results (no training): the GPU projection, the run-to-run
summary, the threads column, and `report` collecting finished runs into results.json, results.md
and the README."""
import json
import os

import bench
import free


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


def test_seed_summary_by_hand():
    free_acc, avg_acc = (60.0, 62.0, 67.0), (61.0, 61.0, 61.0)  # free - average: -1, +1, +6
    seeds = {}
    for seed, f, a in zip(bench.SEEDS, free_acc, avg_acc):
        seeds[bench.run_name("free", bench.seed_flags(seed), 1)] = run(f)
        seeds[bench.run_name("average", bench.seed_flags(seed), 1)] = run(a)
    md = bench.seeds_md(seeds)
    # means 63, 61, 2; sample std of (60, 62, 67) and of (-1, 1, 6): sqrt((9 + 1 + 16) / 2) = 3.61
    assert ("1-shot, mean over seeds (std across seeds): free 63.00 (std 3.61), average 61.00 (std 0.00); "
            "free − average 2.00 (std 3.61), positive on 2/3 seeds.") in md
    assert "| 1 | 2 | 67.00 ± 0.50 | 61.00 ± 0.50 | +6.00 |" in md
    assert "| 5 | 1 | – | – | – |" in md and "5-shot, mean" not in md  # 5-shot not run: no summary


def test_threads_column_reads_each_run_and_marks_unrecorded_ones():
    acc = {"omniglot-1shot-free": run(60.0), "omniglot-5shot-free": run(80.0, torch_threads=1),
           "omniglot-1shot-random": run(40.0)}
    md = bench.accuracy_md(acc, {"run": "omniglot-1shot-free", "threads": 2})
    assert "| free | 60.00 ± 0.50 | 80.00 ± 0.50 | 10 / 10 | 2 / 1 |" in md  # 1-shot: from the quick record
    assert "| random | 40.00 ± 0.50 | – | 10 / – | ? / – |" in md
    assert "| average | – | – | – / – | – / – |" in md


def test_report_collects_finished_runs_and_rewrites_only_the_readme_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, res in (("omniglot-1shot-free", run(61.0)), ("omniglot-1shot-average-seed-1", run(59.0))):
        os.makedirs(os.path.join(bench.OUT, "runs", name))
        json.dump(res, open(os.path.join(bench.OUT, "runs", name, "results.json"), "w"))
    os.makedirs(os.path.join(bench.OUT, "runs", "omniglot-1shot-random"))  # unfinished: no results.json
    start, end = bench.README_MARKERS
    open("README.md", "w").write(f"intro\n{start}\nold numbers\n{end}\noutro\n")
    bench.bench_report(None)
    results = json.load(open(os.path.join(bench.OUT, "results.json")))
    assert set(results["accuracy"]) == {"omniglot-1shot-free"}
    assert set(results["seeds"]) == {"omniglot-1shot-free", "omniglot-1shot-average-seed-1"}  # seed 0: same run
    readme = open("README.md").read()
    assert readme.startswith(f"intro\n{start}\n") and readme.endswith(f"{end}\noutro\n")
    assert "old numbers" not in readme and open(os.path.join(bench.OUT, "results.md")).read() in readme
    assert "| free | 61.00 ± 0.50 | – |" in readme and "| 1 | 0 | 61.00 ± 0.50 | – | – |" in readme
    assert "| 1 | 1 | – | 59.00 ± 0.50 | – |" in readme
