"""End-to-end tests of free.py on the `synthetic` data set with the smoke preset (CPU, seconds each):
every method and ablation runs and writes its results, a resumed run equals an uninterrupted one,
the NaN guard fires, Ctrl-C leaves a resumable checkpoint, and a mismatched --resume is refused."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import free
import maml
import recover
from data import load_dataset

RESULT_KEYS = {"dataset", "way", "shots", "method", "ablations", "teacher_arch", "preset", "seed", "device",
               "rounds", "torch_version", "torch_threads", "resumes", "test_acc", "test_ci95", "best_val_acc",
               "recovery_seconds_total", "recovery_seconds_per_task", "wall_seconds", "seconds_per_validation",
               "test_seconds"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zoo"))  # one smoke zoo shared by every run here


def run(out, cache, *extra):
    argv = ["--dataset", "synthetic", "--preset", "smoke", "--device", "cpu", "--out", str(out),
            "--cache", cache, "--data-root", str(out), *extra]
    return free.main(argv)


@pytest.mark.parametrize("extra", [
    ["--method", "free"], ["--method", "random"], ["--method", "average"], ["--method", "maml"],
    ["--no-meta-generator"], ["--no-align"], ["--hard-labels"], ["--shots", "5", "--first-order"],
    ["--max-replay", "0"], ["--no-kd"]])
def test_every_method_and_ablation_completes_and_writes_results(tmp_path, cache, extra):
    res = run(tmp_path, cache, *extra)
    on_disk = json.load(open(tmp_path / "results.json"))
    assert RESULT_KEYS <= set(on_disk) and on_disk == json.loads(json.dumps(res))
    assert 0 <= res["test_acc"] <= 100 and res["test_ci95"] >= 0
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert set(best) == {"model", "arch", "config"}
    model = free.Conv4(**best["arch"])
    model.load_state_dict(best["model"])
    assert json.load(open(tmp_path / "config.json"))["preset"] == "smoke"
    log = open(tmp_path / "log.txt").read()
    replayed = res["method"] in free.TRAINED and "--max-replay" not in extra
    # MAML replay ran (from the memory bank, or real data for maml), or did not with --max-replay 0
    assert ("replay_acc" in log) == replayed
    distilled = res["method"] == "free" and "--no-kd" not in extra  # KD + Eq. (3) ran, or did not with --no-kd
    assert ("| kd " in log) == distilled
    assert res["best_val_acc"] is not None  # every method has a meta-validation accuracy to compare on
    if res["method"] == "free":
        assert (tmp_path / "recovered.png").exists() and res["recovery_seconds_total"] > 0
        assert torch.load(tmp_path / "last.pt", weights_only=True)["round"] == 3


def test_l_adv_is_off_in_warm_up_and_on_after(tmp_path, cache, monkeypatch):
    """Warm-up rounds train the meta-generator with CE alone; L_adv of Eq. (1) enters after them."""
    calls, per_round = [], []
    adversarial_loss, step = recover.adversarial_loss, free.Trainer.step
    monkeypatch.setattr(recover, "adversarial_loss", lambda t, s: calls.append(1) or adversarial_loss(t, s))

    def counted_step(self):
        before = len(calls)
        row = step(self)
        per_round.append((row["phase"], len(calls) - before))
        return row

    monkeypatch.setattr(free.Trainer, "step", counted_step)
    run(tmp_path, cache, "--rounds", "3", "--warmup", "2")
    assert per_round[:2] == [("warm-up", 0), ("warm-up", 0)]
    assert per_round[2][0] == "train" and per_round[2][1] > 0


def test_resume_gives_the_same_parameters_and_results(tmp_path, cache):
    straight = run(tmp_path / "a", cache, "--rounds", "4")
    first = run(tmp_path / "b", cache, "--rounds", "2")
    assert first["rounds"] == 2
    # wall time counts every process: pretend the first one had taken PRIOR seconds
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    ckpt["stats"]["wall_seconds"] = PRIOR = 1000.0
    torch.save(ckpt, tmp_path / "b" / "last.pt")
    t0 = time.perf_counter()
    resumed = run(tmp_path / "b", cache, "--rounds", "4", "--resume")
    assert PRIOR < resumed["wall_seconds"] <= PRIOR + time.perf_counter() - t0
    assert (straight["resumes"], first["resumes"], resumed["resumes"]) == (0, 0, 1)
    for key in ("test_acc", "test_ci95", "best_val_acc", "rounds"):
        assert straight[key] == resumed[key], key
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for part in ("model", "meta_gen"):
        flat_a, flat_b = flatten(a[part]), flatten(b[part])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            torch.testing.assert_close(flat_a[k], flat_b[k], rtol=0, atol=0)


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
    return out


def test_nan_loss_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(maml, "kd_loss", lambda student, teacher, tau=1.0: student.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match=r"round 2: the KD loss"):
        run(tmp_path, cache)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["round"] == 1  # warm-up round, before the NaN


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path, cache, monkeypatch):
    step = free.Trainer.step

    def step_then_interrupt(self):
        row = step(self)
        if self.round == 1:  # the round in progress is the second
            signal.raise_signal(signal.SIGINT)
        return row

    monkeypatch.setattr(free.Trainer, "step", step_then_interrupt)
    assert run(tmp_path, cache) is None
    assert torch.load(tmp_path / "last.pt", weights_only=True)["round"] == 2
    monkeypatch.setattr(free.Trainer, "step", step)
    assert run(tmp_path, cache, "--resume")["rounds"] == 3


def test_resume_refuses_a_different_configuration(tmp_path, cache):
    run(tmp_path, cache, "--rounds", "2")
    with pytest.raises(free.UserError, match="different configuration.*shots"):
        run(tmp_path, cache, "--shots", "5", "--resume")
    with pytest.raises(free.UserError, match="already holds a run"):
        run(tmp_path, cache)
    assert os.path.exists(tmp_path / "last.pt")


def test_resume_reads_a_setting_added_later_as_the_behaviour_the_run_had(tmp_path):
    """A config.json written before a setting existed resumes when the setting has the value that
    reproduces the saved run (free.ADDED_SETTINGS), and is refused for any other value or setting."""
    cfg = free.parse_args(["--dataset", "synthetic", "--preset", "smoke", "--out", str(tmp_path), "--resume"])
    (tmp_path / "last.pt").write_bytes(b"")
    saved = free.dataclasses.asdict(cfg)
    for key in (*free.ADDED_SETTINGS, "bank_filter"):
        del saved[key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(free.UserError, match=r"differing settings: bank_filter \(saved None, now 'all'\)\. "):
        free.check_resume(cfg, str(tmp_path))  # a setting missing from ADDED_SETTINGS still differs
    saved["bank_filter"] = cfg.bank_filter
    (tmp_path / "config.json").write_text(json.dumps(saved))
    free.check_resume(cfg, str(tmp_path))  # no_kd missing: the run had KD, as --no-kd off has
    with pytest.raises(free.UserError, match=r"no_kd \(saved False, now True\)"):
        free.check_resume(free.dataclasses.replace(cfg, no_kd=True), str(tmp_path))


def test_multi_domain_meta_test_reports_each_domain_and_their_mean(tmp_path, monkeypatch):
    """With test classes from two domains, the meta-test runs test_tasks tasks per domain, each
    from that domain's classes only, and reports their mean (the `mix` protocol: 3 x 600)."""
    ds = load_dataset("synthetic", str(tmp_path), image_size=16)
    ds.domain_of_class = ["a" if c % 2 else "b" for c in range(len(ds.class_names))]
    cfg = free.parse_args(["--preset", "smoke", "--dataset", "synthetic"])
    model = free.new_meta_learner(ds, cfg, torch.device("cpu"))
    seen = []
    sample = free.sample_tasks

    def spy(split, n, way, shot, query, g, classes=None):
        seen.append(classes)
        return sample(split, n, way, shot, query, g, classes)

    monkeypatch.setattr(free, "sample_tasks", spy)
    test = free.meta_test(cfg, ds, model, maml.detached_params(model), torch.device("cpu"))
    assert set(test["per_domain"]) == {"a", "b"}
    assert sorted(len(c) for c in seen) == [5, 5] and {c[0] % 2 for c in seen} == {0, 1}
    assert all(len({x % 2 for x in c}) == 1 for c in seen)  # each domain's tasks use its classes only
    accs = [v[0] for v in test["per_domain"].values()]
    assert test["test_acc"][0] == pytest.approx(sum(accs) / 2)


# ---------------------------------------------------------------- user errors at the entry point


def foreign_run(out):
    """A --out folder holding a run of another configuration (what check_resume reads)."""
    out.mkdir()
    (out / "last.pt").write_bytes(b"")
    (out / "config.json").write_text(json.dumps(dict(free.dataclasses.asdict(free.Config()), way=7)))


def damaged_run(out):
    """A --out folder of this configuration whose last.pt is not a checkpoint."""
    foreign_run(out)
    cfg = free.parse_args(["--dataset", "synthetic", "--preset", "smoke", "--out", "run", "--cache", "cache", "--resume"])
    (out / "config.json").write_text(json.dumps(free.dataclasses.asdict(cfg)))
    (out / "last.pt").write_bytes(b"not a checkpoint")


USER_ERRORS = {  # case: (extra free.py arguments, setup of the folder, what the one line must say)
    "corrupt data": (["--dataset", "omniglot", "--data-root", "d"],
                     lambda p: (p / "d").mkdir() or (p / "d" / "images_background.zip").write_bytes(b"no zip"),
                     "is not a readable zip"),
    "missing files": (["--dataset", "miniimagenet", "--data-root", "d"], None, "mini-imagenet-cache-train.pkl"),
    "unreachable mirror": (["--dataset", "cifarfs", "--data-root", "d", "--mirror", "http://127.0.0.1:9/"], None,
                           "could not download http://127.0.0.1:9/cifar-100-python.tar.gz"),
    "way too large": (["--dataset", "synthetic", "--way", "50"], None, "--way 50"),
    "zero teachers": (["--dataset", "synthetic", "--n-teachers", "0"], None, "--n-teachers 0"),
    "maml without replay": (["--dataset", "synthetic", "--method", "maml", "--max-replay", "0"], None,
                            "--max-replay 0: expected at least 1 for --method maml"),
    "shots too large": (["--dataset", "synthetic", "--shots", "5", "--query", "100"], None, "lower --shots"),
    "resume of a missing run": (["--dataset", "synthetic", "--resume"], None, "no last.pt"),
    "resume of a foreign run": (["--dataset", "synthetic", "--resume"], lambda p: foreign_run(p / "run"),
                                "belongs to a different configuration"),
    "cuda without cuda": (["--dataset", "synthetic", "--device", "cuda"], None, "no CUDA device"),
    "resume of a damaged run": (["--dataset", "synthetic", "--resume"], lambda p: damaged_run(p / "run"), "unreadable"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line_and_a_failed_start_writes_no_run(tmp_path, case):
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    extra, setup, says = USER_ERRORS[case]
    if setup:
        setup(tmp_path)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "free.py"), "--preset", "smoke",
           "--out", "run", "--cache", "cache", *extra]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    if not case.startswith("resume of a"):
        assert not (tmp_path / "run").exists()  # nothing half-made: the same command runs once the cause is fixed


def test_the_same_command_runs_after_a_failed_start(tmp_path, cache):
    with pytest.raises(free.UserError, match="--way 50"):
        run(tmp_path / "r", cache, "--way", "50")
    assert not (tmp_path / "r").exists()
    assert run(tmp_path / "r", cache)["rounds"] == 3


def logged_losses(out):
    """Every kd / replay_loss value of log.txt, in order."""
    return [float(v) for line in open(out / "log.txt") for v in re.findall(r"(?:kd|replay_loss) (-?[\d.]+)", line)]


def test_vmapped_run_matches_the_per_task_loop(tmp_path, cache, monkeypatch):
    """The CUDA code path on the CPU: a whole smoke run (warm-up, then a training round with KD, Eq. (3)
    and replay, validation, meta-test) with --vmap on, i.e. replay meta-batches and meta-test chunks
    mapped with torch.func.vmap, logs the same losses and reaches the same accuracies as --vmap off.
    One training round: float32 rounding differences between the paths (1e-4 relative, see
    test_free.test_vmapped_meta_batch_matches_per_task_loop) would grow round after round through Adam."""
    seen, use_vmap = [], free.use_vmap
    monkeypatch.setattr(free, "use_vmap", lambda cfg, device: seen.append(use_vmap(cfg, device)) or seen[-1])
    on = run(tmp_path / "on", cache, "--vmap", "on", "--rounds", "2")
    off = run(tmp_path / "off", cache, "--vmap", "off", "--rounds", "2")
    assert True in seen and False in seen  # both paths really ran
    l_on, l_off = logged_losses(tmp_path / "on"), logged_losses(tmp_path / "off")
    assert len(l_on) == len(l_off) == 2  # KD and replay of the training round
    assert l_on == pytest.approx(l_off, abs=2e-4)  # logged with 4 decimals
    smoke = free.PRESETS["smoke"]
    queries = min(smoke["val_tasks"], smoke["test_tasks"]) * free.Config.way * free.Config.query  # 450
    for key in ("best_val_acc", "test_acc"):  # equal, up to one query whose argmax the rounding flips
        assert on[key] == pytest.approx(off[key], abs=100 / queries + 1e-6), key
