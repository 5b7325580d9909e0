"""End-to-end tests of free.py on the `synthetic` data set with the smoke preset (CPU, seconds each):
every method and ablation runs and writes its results, a resumed run equals an uninterrupted one,
the NaN guard fires, Ctrl-C leaves a resumable checkpoint, and a mismatched --resume is refused."""
import dataclasses
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
import settings
import workers
from data import load_dataset
from test_free import on_meta  # noqa: F401  (a fixture)
from run import user_teachers
from zoo import Teacher, new_teacher_model

RESULT_KEYS = {"dataset", "way", "shots", "method", "ablations", "teacher_arch", "preset", "seed", "device",
               "workers", "rounds", "torch_version", "torch_threads", "resumes", "test_acc", "test_ci95", "best_val_acc",
               "wall_seconds"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zoo"))  # one smoke zoo shared by every run here


def free_run(out, cache, *extra):
    argv = ["--dataset", "synthetic", "--preset", "smoke", "--device", "cpu", "--out", str(out),
            "--cache", cache, "--data-root", str(out), *extra]
    return free.main(argv)


@pytest.mark.parametrize("extra", [
    ["--method", "free"], ["--method", "random"], ["--method", "average"], ["--method", "maml"],
    ["--no-meta-generator"], ["--no-align"], ["--hard-labels"], ["--shots", "5", "--first-order"],
    ["--max-replay", "0"], ["--no-kd"]])
def test_every_method_and_ablation_completes_and_writes_results(tmp_path, cache, extra):
    res = free_run(tmp_path, cache, *extra)
    on_disk = json.load(open(tmp_path / "results.json"))
    assert RESULT_KEYS <= set(on_disk) and on_disk == json.loads(json.dumps(res))
    assert 0 <= res["test_acc"] <= 100 and res["test_ci95"] >= 0
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert set(best) == {"model", "arch", "config"}
    model = free.Conv4(**best["arch"])
    model.load_state_dict(best["model"])
    assert json.load(open(tmp_path / "config.json"))["preset"] == "smoke"
    records = metrics(tmp_path)
    rounds = [r for r in records if r["event"] == "round"]
    replayed = res["method"] in settings.TRAINED and "--max-replay" not in extra
    # MAML replay ran (from the memory bank, or real data for maml), or did not with --max-replay 0
    assert any("replay_acc" in r for r in rounds) == replayed
    distilled = res["method"] == "free" and "--no-kd" not in extra  # KD + Eq. (3) ran, or did not with --no-kd
    assert any("kd_loss" in r for r in rounds) == distilled
    assert res["best_val_acc"] is not None  # every method has a meta-validation accuracy to compare on
    assert [r["event"] for r in records if r["event"] in ("val", "test")][-1] == "test"
    assert records[-1]["acc"] == res["test_acc"]
    if res["method"] in settings.TRAINED:
        # maml and --no-meta-generator have no meta-generator to warm up: they start after FREE's warm-up
        warms_up = res["method"] == "free" and "--no-meta-generator" not in extra
        first = 1 if warms_up else free.PRESETS["smoke"]["warmup"] + 1
        assert [r["round"] for r in rounds] == list(range(first, 4))
        assert all(r["seconds"]["round"] > 0 for r in rounds)
    if res["method"] == "free":
        assert (tmp_path / "recovered.png").exists() and all(r["seconds"]["recovery"] > 0 for r in rounds)
        assert torch.load(tmp_path / "last.pt", weights_only=True)["round"] == 3


def metrics(out):
    """The run's metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


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
    free_run(tmp_path, cache, "--rounds", "3", "--warmup", "2")
    assert per_round[:2] == [("warm-up", 0), ("warm-up", 0)]
    assert per_round[2][0] == "train" and per_round[2][1] > 0


def test_resume_gives_the_same_parameters_and_results(tmp_path, cache):
    """A 3-round run continued to 4 rounds equals a 4-round run: its validation after round 3 (its last, off the
    every-2-rounds schedule of the smoke preset) is undone, as a 4-round run never makes it."""
    straight = free_run(tmp_path / "a", cache, "--rounds", "4")
    first = free_run(tmp_path / "b", cache, "--rounds", "3")
    assert first["rounds"] == 3 and [r["round"] for r in metrics(tmp_path / "b") if r["event"] == "val"] == [2, 3]
    # wall time counts every process: pretend the first one had taken PRIOR seconds
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    ckpt["wall_seconds"] = PRIOR = 1000.0
    torch.save(ckpt, tmp_path / "b" / "last.pt")
    t0 = time.perf_counter()
    resumed = free_run(tmp_path / "b", cache, "--rounds", "4", "--resume")
    assert PRIOR < resumed["wall_seconds"] <= PRIOR + time.perf_counter() - t0
    assert (straight["resumes"], first["resumes"], resumed["resumes"]) == (0, 0, 1)
    for key in ("test_acc", "test_ci95", "best_val_acc", "rounds"):
        assert straight[key] == resumed[key], key
    # metrics.jsonl of the resumed run is one history: the records of the straight run, round for round
    drop = ("seconds", "elapsed")
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "b") if r["event"] != "zoo"] == \
        [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "a") if r["event"] != "zoo"]
    assert [r for r in metrics(tmp_path / "b") if r["event"] == "round"][-1]["elapsed"] > PRIOR
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    best_a, best_b = (torch.load(tmp_path / r / "best.pt", weights_only=True) for r in "ab")
    for part, (x, y) in (("model", (a, b)), ("meta_gen", (a, b)), ("best_state", (a, b)), ("model", (best_a, best_b))):
        flat_a, flat_b = flatten(x[part]), flatten(y[part])
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
    monkeypatch.setattr(maml, "kd_loss", lambda logits, teacher, tau=1.0: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match=r"round 2: the KD loss"):
        free_run(tmp_path, cache)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["round"] == 1  # warm-up round, before the NaN


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path, cache, monkeypatch):
    step = free.Trainer.step

    def step_then_interrupt(self):
        row = step(self)
        if self.round == 1:  # the round in progress is the second
            signal.raise_signal(signal.SIGINT)
        return row

    monkeypatch.setattr(free.Trainer, "step", step_then_interrupt)
    assert free.cli(["--dataset", "synthetic", "--preset", "smoke", "--device", "cpu", "--out", str(tmp_path),
                     "--cache", cache, "--data-root", str(tmp_path)]) == 130
    assert torch.load(tmp_path / "last.pt", weights_only=True)["round"] == 2
    monkeypatch.setattr(free.Trainer, "step", step)
    assert free_run(tmp_path, cache, "--resume")["rounds"] == 3


def test_resume_refuses_a_different_configuration(tmp_path, cache):
    free_run(tmp_path, cache, "--rounds", "2")
    with pytest.raises(free.UserError, match="different configuration.*shots"):
        free_run(tmp_path, cache, "--shots", "5", "--resume")
    with pytest.raises(free.UserError, match="already holds a run"):
        free_run(tmp_path, cache)
    assert os.path.exists(tmp_path / "last.pt")


def test_resume_starts_a_missing_run_and_reports_a_finished_one(tmp_path, cache, monkeypatch):
    """--resume on an empty --out starts the run; on a finished run of as many rounds it returns the
    results without any work (so a sweep's commands can be rerun as they are)."""
    first = free_run(tmp_path, cache, "--resume")
    assert first["rounds"] == 3 and first["resumes"] == 0
    monkeypatch.setattr(free.Trainer, "step", lambda self: pytest.fail("a finished run trained again"))
    monkeypatch.setattr(free, "load_dataset", lambda *a, **k: pytest.fail("a finished run loaded its data"))
    assert free_run(tmp_path, cache, "--resume") == first


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


@pytest.mark.parametrize("extra", [[], ["--no-meta-generator"], ["--method", "maml"]])
def test_a_round_and_an_evaluation_keep_every_tensor_on_the_run_device(tmp_path, on_meta, extra):
    """free.py's Trainer and evaluate on the `meta` device (test_free.MetaValues): the warm-up round, a training
    round (FIVE, memory bank, KD with Eq. (3), replay) and a meta-validation, with no tensor left on the CPU."""
    ds = load_dataset("synthetic", str(tmp_path), image_size=16)
    cfg = free.parse_args(["--preset", "smoke", "--dataset", "synthetic", "--rounds", "3", *extra])
    teachers = [Teacher(new_teacher_model(ds, "conv4", cfg.way).to(on_meta).eval().requires_grad_(False),
                        ds.splits["train"].classes[5 * i:5 * i + 5], "conv4", 1.0, i) for i in range(cfg.B)]
    trainer = free.Trainer(cfg, ds, teachers, on_meta)
    while trainer.round < cfg.warmup + 1:
        trainer.step()
        trainer.round += 1
    model = trainer.model
    assert all(p.device == on_meta for p in (*model.parameters(), *trainer.meta_gen.G.parameters()))
    free.evaluate(cfg, model, maml.detached_params(model), ds.splits["val"], 2, free.VAL_TASK_SEED, on_meta)


# ---------------------------------------------------------------- user errors at the entry point


def foreign_run(out):
    """A --out folder holding a run of another configuration (what check_resume reads)."""
    out.mkdir()
    (out / "last.pt").write_bytes(b"")
    (out / "config.json").write_text(json.dumps(dict(dataclasses.asdict(free.Config()), way=7)))


def damaged_run(out):
    """A --out folder of this configuration whose last.pt is not a checkpoint."""
    foreign_run(out)
    cfg = free.parse_args(["--dataset", "synthetic", "--preset", "smoke", "--out", "run", "--cache", "cache", "--resume"])
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
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
    "resume of a foreign run": (["--dataset", "synthetic", "--resume"], lambda p: foreign_run(p / "run"),
                                "belongs to a different configuration"),
    "cuda without cuda": (["--dataset", "synthetic", "--device", "cuda"], None, "no CUDA device"),
    "resume of a damaged run": (["--dataset", "synthetic", "--resume"], lambda p: damaged_run(p / "run"), "unreadable"),
    "image size off the generator's": (["--dataset", "synthetic", "--image-size", "30"], None, "a multiple of 4"),
    "zoo without zoo.json": (["--dataset", "synthetic", "--zoo", "z"], lambda p: (p / "z").mkdir(),
                             "expected zoo.json in it"),
    "zoo entry without classes": (["--dataset", "synthetic", "--zoo", "z"], lambda p: zoo_folder(p / "z", [
        {"file": "t.pt", "input": {"size": 32, "channels": 3, "mean": [0] * 3, "std": [1] * 3}}]),
        "teacher 0 (t.pt): classes: expected this field"),
    "zoo teacher file missing": (["--dataset", "synthetic", "--zoo", "z"], lambda p: zoo_folder(p / "z", [
        {"file": "t.pt", "classes": list("abcde"), "input": {"size": 32, "channels": 3, "mean": [0] * 3,
                                                              "std": [1] * 3}}]), "teacher 0 (t.pt): file:"),
    "folder without val/": (["--dataset", "folder", "--data-root", "f"], lambda p: image_folders(p / "f", ["train"]),
                            "val"),
    "folder unreadable image": (["--dataset", "folder", "--data-root", "f"], lambda p: image_folders(
        p / "f", ["train", "val", "test"]) or (p / "f" / "val" / "val-c1" / "3.png").write_bytes(b"no png"),
        "cannot read image f/val/val-c1/3.png"),
    "folder too few classes": (["--dataset", "folder", "--data-root", "f"], lambda p: image_folders(
        p / "f", ["train", "val", "test"], classes=4), "--way 5: the val split of folder-"),
    "folder class too small": (["--dataset", "folder", "--data-root", "f", "--query", "20"],
                               lambda p: image_folders(p / "f", ["train", "val", "test"]), "class 'val-c0' of the val split"),
}


def zoo_folder(folder, entries):
    folder.mkdir()
    (folder / "zoo.json").write_text(json.dumps({"teachers": entries}))


def image_folders(root, splits, classes=5, per_class=8, size=12):
    """root/<split>/<split>-c<i>/<j>.png: small grey PNGs of a different shade per class."""
    from PIL import Image
    for s in splits:
        for c in range(classes):
            (root / s / f"{s}-c{c}").mkdir(parents=True)
            for j in range(per_class):
                Image.new("L", (size, size), 20 * c + j).save(root / s / f"{s}-c{c}" / f"{j}.png")


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line_and_a_failed_start_writes_no_run(tmp_path, case, capsys, monkeypatch):
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    extra, setup, says = USER_ERRORS[case]
    if setup:
        setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    status = free.cli(["--preset", "smoke", "--out", "run", "--cache", "cache", *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    if not case.startswith("resume of a"):
        assert not (tmp_path / "run").exists()  # nothing half-made: the same command runs once the cause is fixed


def test_free_py_exits_with_status_1_and_one_line_on_a_user_error(tmp_path):
    """The command itself (not only cli()): one `error:` line on stderr, exit status 1, no run folder."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "free.py"), "--dataset",
           "synthetic", "--preset", "smoke", "--out", "run", "--way", "50"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: --way 50"), done.stderr
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_torch_is_imported_is_one_line_and_status_130(tmp_path):
    """Ctrl-C during `import torch` (seen from outside: libtorch mapped into the process, the import still running)
    ends free.py with one line and the status of every other phase, not a traceback."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "free.py"), "--dataset",
           "synthetic", "--preset", "smoke", "--out", "run"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    maps, t0 = f"/proc/{p.pid}/maps", time.perf_counter()
    while "libtorch" not in open(maps).read():
        assert time.perf_counter() - t0 < 60 and p.poll() is None, "free.py never loaded torch"
        time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and err.strip().splitlines() == ["interrupted while starting: nothing was written"], err
    assert not (tmp_path / "run").exists()


def test_the_same_command_runs_after_a_failed_start(tmp_path, cache):
    with pytest.raises(free.UserError, match="--way 50"):
        free_run(tmp_path / "r", cache, "--way", "50")
    assert not (tmp_path / "r").exists()
    assert free_run(tmp_path / "r", cache)["rounds"] == 3


# every Config field with a value that must be refused before any work: (flag value(s), what the line says)
BAD_SETTINGS = {**{name: ([str(least - 1)], f"expected at least {least}") for name, least in settings.AT_LEAST.items()},
                **{name: (["0"], "expected a finite number > 0") for name in settings.POSITIVE},
                **{name: (["-1"], "expected a finite number >= 0") for name in settings.NON_NEGATIVE},
                "alpha": (["nan"], "expected a finite number > 0"),
                "out": (["/proc/x"], "is a kernel file system"), "data_root": (["/proc/x"], "is a kernel file system"),
                "cache": (["/proc/x"], "is a kernel file system"), "mirror": (["ftp://x"], "an http:// or https://"),
                "export_zoo": (["/proc/x"], "is a kernel file system"),
                "zoo": (["z", "--method", "maml"], "only free and average read teachers"),
                "B": (["4", "--n-teachers", "3"], "lower --B"), "warmup": (["3", "--rounds", "3"], "--rounds > --warmup"),
                "meta_batch": (["1", "--workers", "2"], "at most --meta-batch workers"),
                "zoo_epochs": (["0"], "expected at least 1"),
                **{name: (["nosuch"], "invalid choice") for name in ("dataset", "method", "theta_tilde_opt", "bank_filter",
                                                                      "teacher_arch", "preset", "device", "vmap")},
                "shots": (["2"], "invalid choice")}
NO_BAD_VALUE = {f.name for f in dataclasses.fields(free.Config) if f.type is bool}  # a switch is on or off


@pytest.mark.parametrize("name", sorted(BAD_SETTINGS))
def test_every_bad_setting_is_one_error_line_before_any_work(tmp_path, name, capsys, monkeypatch):
    """A walk over every Config field (the assert below keeps it complete): a bad value ends in one
    `error:` line naming the flag, exit status 1 (2 for argparse's own checks), and no run folder."""
    assert set(BAD_SETTINGS) | NO_BAD_VALUE == {f.name for f in dataclasses.fields(free.Config)}
    monkeypatch.setattr(free, "load_dataset", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(workers, "available", lambda device_type: 2)  # --workers 2 fits, as on this CPU
    value, says = BAD_SETTINGS[name]
    out = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--preset", "smoke", "--out", str(out), "--cache", str(tmp_path / "c"),
            "--data-root", str(tmp_path / "d"), settings.flag(name), *value]
    try:
        status = free.cli(argv)
    except SystemExit as e:  # argparse's choices and types
        status = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert status in (1, 2) and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert settings.flag(name) in lines[0] or status == 2
    assert not out.exists()


def test_workers_beyond_the_cores_are_refused(tmp_path, capsys):
    have = workers.available("cpu")
    status = free.cli(["--dataset", "synthetic", "--preset", "smoke", "--device", "cpu", "--meta-batch", "64",
                       "--workers", str(have + 1), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 1 and f"this machine has {have} CPU cores" in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- Ctrl-C in every phase


def interrupt_once(monkeypatch, module, name):
    """Replace module.name by a version that sends this process SIGINT (as Ctrl-C does) once its first call is done."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(module, name, wrapped)


def cli_run(out, cache, *extra):
    return free.cli(["--dataset", "synthetic", "--preset", "smoke", "--device", "cpu", "--out", str(out),
                     "--cache", cache, "--data-root", str(out), *extra])


def test_ctrl_c_in_zoo_training_keeps_the_trained_teachers(tmp_path, capsys, monkeypatch):
    import zoo
    interrupt_once(monkeypatch, zoo, "atomic_write")  # once the first teacher is saved
    cache = str(tmp_path / "cache")
    assert cli_run(tmp_path / "r", cache) == 130
    assert "interrupted: the cached teachers" in capsys.readouterr().err
    saved = list((tmp_path / "cache").rglob("teacher_*.pt"))
    assert len(saved) == 1
    trained = []
    monkeypatch.setattr(zoo, "fit_teacher", lambda *a, real=zoo.fit_teacher: trained.append(a) or real(*a))
    assert cli_run(tmp_path / "r", cache) == 0  # the same command: only the two missing teachers train
    assert len(trained) == 2


def test_ctrl_c_in_validation_finishes_it_saves_and_resumes(tmp_path, cache, monkeypatch):
    interrupt_once(monkeypatch, free.maml, "meta_test")  # in the round-2 meta-validation
    assert cli_run(tmp_path, cache) == 130
    assert torch.load(tmp_path / "last.pt", weights_only=True)["round"] == 2
    assert [r["round"] for r in metrics(tmp_path) if r["event"] == "val"] == [2]  # the validation was finished
    monkeypatch.undo()
    assert cli_run(tmp_path, cache, "--resume") == 0
    assert [r["round"] for r in metrics(tmp_path) if r["event"] == "val"] == [2, 3]


def test_ctrl_c_in_the_meta_test_keeps_the_trained_run(tmp_path, cache, monkeypatch):
    interrupt_once(monkeypatch, free, "meta_test")
    assert cli_run(tmp_path, cache) == 130
    assert torch.load(tmp_path / "last.pt", weights_only=True)["round"] == 3
    monkeypatch.setattr(free.Trainer, "step", lambda self: pytest.fail("a trained run trained again"))
    assert cli_run(tmp_path, cache, "--resume") == 0
    assert metrics(tmp_path)[-1]["event"] == "test"


# ---------------------------------------------------------------- workers


def test_two_workers_compute_what_one_process_computes(tmp_path):
    """--workers 2 (two processes, gloo, one thread each) against one process on one thread: the same
    losses round by round up to float summation order, the same accuracies up to a query whose argmax
    the rounding flips; then a resumed 2-worker run carries on. The workers train the zoo (each its share),
    and its record counts every teacher trained."""
    cache = str(tmp_path / "zoo")
    two = free_run(tmp_path / "two", cache, "--workers", "2")
    n = free.PRESETS["smoke"]["n_teachers"]
    assert [(r["trained"], r["cached"]) for r in metrics(tmp_path / "two") if r["event"] == "zoo"] == [(n, 0)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = free_run(tmp_path / "one", cache)
    finally:
        torch.set_num_threads(threads)
    assert two["workers"] == 2 and one["workers"] == 1
    pick = ("rec_acc", "kd_loss", "replay_loss", "replay_acc", "replay_batches", "bank")
    a = [{k: r[k] for k in pick if k in r} for r in metrics(tmp_path / "one") if r["event"] == "round"]
    b = [{k: r[k] for k in pick if k in r} for r in metrics(tmp_path / "two") if r["event"] == "round"]
    assert len(a) == len(b) == 3 and "kd_loss" not in a[0] and "kd_loss" in a[1]  # the warm-up round has no KD
    for ra, rb in zip(a, b):
        assert rb.keys() == ra.keys()  # the same fields each round, then the same values up to summation order
        assert rb == pytest.approx(ra, rel=1e-4, abs=1e-5)
    smoke = free.PRESETS["smoke"]
    queries = min(smoke["val_tasks"], smoke["test_tasks"]) * free.Config.way * free.Config.query
    for key in ("best_val_acc", "test_acc"):
        assert two[key] == pytest.approx(one[key], abs=100 / queries + 1e-6), key
    more = free_run(tmp_path / "two", cache, "--workers", "2", "--rounds", "4", "--resume")
    assert more["rounds"] == 4 and more["resumes"] == 1


# ---------------------------------------------------------------- your own teachers (--zoo, --export-zoo)


def comparable(records):
    """metrics.jsonl without what differs between two equal runs: times, and the zoo's record."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in records if r["event"] != "zoo"]


def assert_same_records(a, b, rel, abs_, flips=None):
    """The same events with the same fields; numbers equal up to rel / abs_ (an accuracy named in `flips` up to
    its value: the share of one image whose argmax the float summation order flips), everything else exactly."""
    assert [r.keys() for r in a] == [r.keys() for r in b]
    flips = flips or {}
    for ra, rb in zip(a, b):
        numbers = [k for k, v in ra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for k in numbers:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=max(abs_, flips.get(k, 0))), (k, ra)
        assert {k: rb[k] for k in ra if k not in numbers} == {k: ra[k] for k in ra if k not in numbers}


def test_a_run_from_the_exported_zoo_computes_what_the_built_in_run_computes(tmp_path, cache):
    """--export-zoo writes the built-in zoo as zoo.json + torch.export programs; FREE from --zoo of it repeats
    the run from the built-in zoo, record for record, up to float rounding."""
    built_in = free_run(tmp_path / "built-in", cache)
    assert free.main(["--dataset", "synthetic", "--preset", "smoke", "--cache", cache, "--data-root",
                      str(tmp_path / "built-in"), "--export-zoo", str(tmp_path / "zoo")])["teachers"] == 3
    assert not (tmp_path / "zoo" / "last.pt").exists() and (tmp_path / "zoo" / "zoo.json").is_file()
    exported = free_run(tmp_path / "exported", cache, "--zoo", str(tmp_path / "zoo"))
    assert_same_records(comparable(metrics(tmp_path / "built-in")), comparable(metrics(tmp_path / "exported")),
                        rel=1e-4, abs_=1e-5)
    assert exported["test_acc"] == pytest.approx(built_in["test_acc"], abs=1e-6)
    zoo_record = [r for r in metrics(tmp_path / "exported") if r["event"] == "zoo"][0]
    assert (zoo_record["trained"], zoo_record["cached"], zoo_record["held_out_acc"]) == (0, 3, None)
    averaged = [free_run(tmp_path / f"average-{name}", cache, "--method", "average", *extra)
                for name, extra in (("built-in", ()), ("exported", ("--zoo", str(tmp_path / "zoo"))))]
    assert averaged[1]["test_acc"] == pytest.approx(averaged[0]["test_acc"], abs=1e-6)  # the same weights averaged
    with open(tmp_path / "zoo" / "zoo.json", "a") as f:
        f.write("\n")  # the zoo's files are part of the run's identity: even this is another zoo
    with pytest.raises(free.UserError, match="teachers in --zoo .* changed since the run started"):
        free_run(tmp_path / "exported", cache, "--zoo", str(tmp_path / "zoo"), "--rounds", "4", "--resume")


class TenClassNet(torch.nn.Module):
    """A classifier that models.py does not have: two strided convolutions, global pooling, 10 classes."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


def foreign_zoo(folder, names, n=3):
    """n TorchScript 10-class teachers expecting 24x24 grey images with their own mean/std, in zoo.json."""
    folder.mkdir()
    entries = []
    for i in range(n):
        torch.manual_seed(i)
        torch.jit.save(torch.jit.script(TenClassNet().eval()), str(folder / f"net{i}.pt"))
        entries.append({"file": f"net{i}.pt", "classes": names[5 * i:5 * i + 10],
                        "input": {"size": 24, "channels": 1, "mean": [0.4], "std": [0.3]}})
    (folder / "zoo.json").write_text(json.dumps({"teachers": entries}))


def test_foreign_ten_class_teachers_serve_five_way_tasks_the_same_on_one_and_two_workers(tmp_path):
    """Three 10-class TorchScript teachers of an architecture of their own (24x24 grey, own normalisation) in
    a 32x32 colour run: each recovery sees 5 of a teacher's classes, drawn from the task's stream; the logits
    it sees are the teacher's at those classes, the memory bank holds them under their global ids, and FREE
    runs to its meta-test with the same draws and records on 1 and 2 workers."""
    ds = load_dataset("synthetic", str(tmp_path))
    names = [ds.class_names[c] for c in ds.splits["train"].classes][:20]  # shared names: one class of the bank
    foreign_zoo(tmp_path / "zoo", names)
    cfg = free.parse_args(["--dataset", "synthetic", "--preset", "smoke", "--zoo", str(tmp_path / "zoo")])
    teachers = user_teachers(cfg, ds, torch.device("cpu"))
    trainer = free.Trainer(cfg, ds, teachers, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32)
    for seen in trainer.sample_teachers():
        whole = teachers[seen.index]
        columns = [whole.classes.index(c) for c in seen.classes]
        assert len(columns) == 5 and columns == sorted(columns) and seen.class_names == [names[whole.classes[c]]
                                                                                         for c in columns]
        torch.testing.assert_close(seen.model(x), whole.model(x)[:, columns])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the runs differ by the workers' summation order alone
    try:
        one = free_run(tmp_path / "one", str(tmp_path / "cache"), "--zoo", str(tmp_path / "zoo"))
    finally:
        torch.set_num_threads(threads)
    two = free_run(tmp_path / "two", str(tmp_path / "cache"), "--zoo", str(tmp_path / "zoo"), "--workers", "2")
    banks = [torch.load(tmp_path / r / "last.pt", weights_only=True)["bank"]["images"] for r in ("one", "two")]
    assert sorted(banks[0]) == sorted(banks[1]) and set(banks[0]) <= {c for t in teachers for c in t.classes}
    rounds = [[r for r in comparable(metrics(tmp_path / run)) if r["event"] == "round"] for run in ("one", "two")]
    smoke = free.PRESETS["smoke"]
    assert_same_records(*rounds, rel=1e-3, abs_=1e-4, flips={  # one image of a round's batch or recovery
        "replay_acc": 1 / (smoke["meta_batch"] * cfg.way * cfg.query) + 1e-6, "rec_acc": 1 / cfg.n_per_class / cfg.way})
    assert metrics(tmp_path / "two")[-1]["event"] == "test"
    assert one["rounds"] == two["rounds"] == 3


def test_a_run_on_your_own_images_then_adapt_labels_new_images_as_the_meta_test_would(tmp_path, cache, capsys):
    """--dataset folder end to end, then `free.py adapt` of its best.pt on the test classes laid out as folders:
    N = way gives maml.meta_test's accuracy on the same task; N = 3 runs from a prototype head."""
    import adapt
    from data import read_image
    image_folders(tmp_path / "f", ["train", "val", "test"], per_class=6, size=16)
    free_run(tmp_path / "run", cache, "--dataset", "folder", "--data-root", str(tmp_path / "f"), "--query", "3")
    support, query = tmp_path / "support", tmp_path / "query"
    for c in range(5):
        for j in range(6):
            where = (support if j == 0 else query) / f"test-c{c}"
            where.mkdir(parents=True, exist_ok=True)
            (where / f"{j}.png").write_bytes((tmp_path / "f" / "test" / f"test-c{c}" / f"{j}.png").read_bytes())
    best = str(tmp_path / "run" / "best.pt")
    assert free.cli(["adapt", "--checkpoint", best, "--support", str(support), "--query", str(query), "--out",
                     str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("adapt: 5 classes, 5 support images, 25 query images, 2 steps, learned head")
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "file,predicted,probability," + ",".join(f"test-c{c}" for c in range(5)) and len(rows) == 26
    ckpt = torch.load(best, weights_only=True)
    model = free.Conv4(**ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    x = lambda files: torch.stack([read_image(p, 16, 1) for p in files]).float()[None] / 255  # [1, n, 1, 16, 16]
    x_s = x([support / f"test-c{c}" / "0.png" for c in range(5)])
    x_q = x([query / f"test-c{c}" / f"{j}.png" for c in range(5) for j in range(1, 6)])
    y_s, y_q = torch.arange(5)[None], torch.arange(5).repeat_interleave(5)[None]
    want = maml.meta_test(model, maml.detached_params(model), x_s, y_s, x_q, y_q, steps=2).item()
    assert f"accuracy {100 * want:.2f}%" in line
    for c in (3, 4):
        for split in (support, query):
            for f in (split / f"test-c{c}").iterdir():
                f.unlink()
            (split / f"test-c{c}").rmdir()
    result = adapt.adapt(best, support, query)
    assert result.head == "prototype" and result.classes == ["test-c0", "test-c1", "test-c2"]
    assert result.probabilities.shape == (15, 3) and 0 <= result.accuracy <= 1
