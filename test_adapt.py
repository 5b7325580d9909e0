"""Tests of adapt.py: a meta-learner checkpoint adapted to a user's support folder, predicting a query folder.

CPU only, tiny: a hand-made best.pt of a random 16x16 grey Conv4 (way 3, 2 test inner steps, inner lr 0.01)
and folders of small PNGs in the tests' temporary folders. The meta-test reference is maml.meta_test itself.
"""
import csv
import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.func import functional_call

import adapt
import data
import free
import maml
from models import Conv4

WAY, SIZE, STEPS, LR = 3, 16, 2, 0.01  # the hand-made checkpoint's way, image size and meta-test settings
CLASSES = ("ant", "bee", "cat")  # support classes of the 3-way task (sorted: labels 0, 1, 2)


def make_checkpoint(path, **extra):
    """A best.pt as free.py's Run.save_best writes it: {"model", "arch", "config"} (plus `extra` keys)."""
    torch.manual_seed(0)
    model = Conv4(num_classes=WAY, in_channels=1, image_size=SIZE, mean=[0.5], std=[0.25], hidden=8,
                  track_running_stats=False)
    config = dataclasses.asdict(free.Config(dataset="folder", way=WAY, test_inner_steps=STEPS, inner_lr=LR))
    torch.save({"model": model.state_dict(), "arch": model.arch, "config": config, **extra}, path)
    return path


def write_png(path, k, seed, side=SIZE + 4):
    """A grey PNG of class k: a bright bar at a class-specific row band, plus noise (not the model's size)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (side, side))
    pixels[k * side // 3:(k + 1) * side // 3] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def write_classes(root, classes, per_class, seed=0):
    for i, name in enumerate(classes):
        for j in range(per_class):
            write_png(root / name / f"{j}.png", i, seed + 100 * i + j)
    return root


@pytest.fixture
def task(tmp_path):
    """(checkpoint, support folder: 3 classes x 2 images, labelled query folder: 3 classes x 3 images)."""
    return (make_checkpoint(tmp_path / "best.pt"), write_classes(tmp_path / "support", CLASSES, 2),
            write_classes(tmp_path / "query", CLASSES, 3, seed=50))


def folder_tensors(root):
    """The task tensors of root/<class>/*.png, built here from data.read_image: x float in [0, 1], y int64."""
    x, y = [], []
    for k, c in enumerate(sorted(p.name for p in root.iterdir())):
        for p in sorted((root / c).iterdir()):
            x.append(data.read_image(p, SIZE, 1).float() / 255)
            y.append(k)
    return torch.stack(x), torch.tensor(y)


def checkpoint_model(path):
    ckpt = torch.load(path, weights_only=True)
    model = Conv4(**ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    return model


def test_prototype_head_is_twice_the_class_means_and_minus_their_squared_norms():
    """2-D features; class 0: (1,2), (3,4) -> mu_0 = (2,3), W_0 = (4,6), b_0 = -(4+9) = -13;
    class 1: (0,-1) -> W_1 = (0,-2), b_1 = -1; class 2: (2,0), (2,2), (2,-2) -> mu_2 = (2,0), W_2 = (4,0), b_2 = -4.
    For f = (1,1): W f + b = (-3, -3, 0) = -||f - mu_c||^2 + ||f||^2 = (-5+2, -5+2, -2+2)."""
    features = torch.tensor([[1., 2.], [2., 0.], [0., -1.], [3., 4.], [2., 2.], [2., -2.]])
    y = torch.tensor([0, 2, 1, 0, 2, 2])
    weight, bias = adapt.prototype_head(features, y, 3)
    torch.testing.assert_close(weight, torch.tensor([[4., 6.], [0., -2.], [4., 0.]]))
    torch.testing.assert_close(bias, torch.tensor([-13., -1., -4.]))
    torch.testing.assert_close(weight @ torch.tensor([1., 1.]) + bias, torch.tensor([-3., -3., 0.]))


def test_learned_head_accuracy_and_probabilities_are_the_meta_tests_on_the_same_task(task):
    ckpt, support, query = task
    result = adapt.adapt(ckpt, support, query)
    assert (result.head, result.steps, result.classes, result.n_support) == ("learned", STEPS, list(CLASSES), 6)
    assert result.files[:2] == ["ant/0.png", "ant/1.png"] and result.truth == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x_s, y_s = folder_tensors(support)
    x_q, y_q = folder_tensors(query)
    model = checkpoint_model(ckpt)
    theta = maml.detached_params(model)
    accs = maml.meta_test(model, theta, x_s[None], y_s[None], x_q[None], y_q[None], STEPS, LR, vectorize=False)
    assert result.accuracy == accs[0].item()
    with torch.no_grad():
        adapted = maml.inner_adapt(model, theta, x_s, y_s, STEPS, LR, first_order=True)
        expected = torch.softmax(functional_call(model, adapted, (x_q,)), dim=1)
    torch.testing.assert_close(result.probabilities, expected)
    unadapted = adapt.adapt(ckpt, support, query, steps=0)  # the steps are taken: they change the predictions
    assert not torch.allclose(unadapted.probabilities, result.probabilities)
    forced = adapt.adapt(ckpt, support, query, head="prototype")
    assert forced.head == "prototype" and not torch.allclose(forced.probabilities, result.probabilities)


def test_other_class_count_adapts_a_prototype_head_and_writes_the_csv(task, tmp_path):
    ckpt, _, _ = task
    support = write_classes(tmp_path / "two", ("bee", "cat"), 3)
    query = tmp_path / "loose"
    for j in range(4):
        write_png(query / f"q{j}.png", j % 2, 900 + j)
    result = adapt.adapt(ckpt, support, query)
    assert result.head == "prototype" and result.probabilities.shape == (4, 2) and result.accuracy is None
    # no steps: the prototype head alone predicts the nearest class mean of the features (batch statistics)
    model = checkpoint_model(ckpt)
    x_s, y_s = folder_tensors(support)
    x_q = torch.stack([data.read_image(query / f"q{j}.png", SIZE, 1).float() / 255 for j in range(4)])
    with torch.no_grad():
        f_s, f_q = model.features(x_s), model.features(x_q)
    mu = torch.stack([f_s[y_s == c].mean(0) for c in range(2)])
    nearest = torch.cdist(f_q, mu).argmin(dim=1)
    assert torch.equal(adapt.adapt(ckpt, support, query, steps=0).predicted, nearest)

    out = tmp_path / "p.csv"
    assert adapt.cli(["--checkpoint", str(ckpt), "--support", str(support), "--query", str(query),
                      "--out", str(out), "--device", "cpu"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["file", "predicted", "probability", "bee", "cat"]
    assert [r[0] for r in rows[1:]] == ["q0.png", "q1.png", "q2.png", "q3.png"]
    for r, p in zip(rows[1:], result.probabilities):
        probs = [float(v) for v in r[3:]]
        assert abs(sum(probs) - 1) <= 2 * 0.5e-4 and all(len(v.split(".")[1]) == 4 for v in r[2:])
        assert r[1] == ("bee", "cat")[int(p.argmax())] and float(r[2]) == max(probs)


def test_cli_writes_predictions_csv_here_and_prints_one_line_with_the_accuracy(task, tmp_path, capsys, monkeypatch):
    ckpt, support, query = task
    monkeypatch.chdir(tmp_path)
    assert adapt.cli(["--checkpoint", str(ckpt), "--support", str(support), "--query", str(query),
                      "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    accuracy = adapt.adapt(ckpt, support, query).accuracy
    assert err == "" and out.count("\n") == 1
    assert out.startswith(f"adapt: 3 classes, 6 support images, 9 query images, {STEPS} steps, learned head, cpu")
    assert f"accuracy {100 * accuracy:.2f}% ({round(9 * accuracy)}/9)" in out and "predictions.csv" in out
    rows = list(csv.reader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 10 and rows[0][3:] == list(CLASSES) and rows[1][0] == "ant/0.png"


def last_pt(path):
    torch.save({"round": 3, "model": Conv4(num_classes=WAY).state_dict(), "config": {}}, path)


def bad(what, spoil, words, head=None, steps=None):
    return pytest.param(spoil, words, head, steps, id=what)


BAD_INPUTS = [  # spoil(checkpoint, support, query) -> the error line's words
    bad("missing checkpoint", lambda c, s, q: c.unlink(), "--checkpoint .*: no such file"),
    bad("unreadable checkpoint", lambda c, s, q: c.write_bytes(b"not a checkpoint"), "--checkpoint .* is unreadable"),
    bad("last.pt", lambda c, s, q: last_pt(c), r"training state \(last.pt\).*pass the run's best.pt"),
    bad("old checkpoint", lambda c, s, q: torch.save({"model": {}, "arch": {}}, c), "older free.py"),
    bad("missing support", lambda c, s, q: s.rename(s.with_name("gone")), "--support .*: no such folder"),
    bad("one support class", lambda c, s, q: [(s / n).rename(s / "ant" / n) for n in ("bee", "cat")],
        "holds 1 class folder .*at least 2 classes"),
    bad("empty support class", lambda c, s, q: (s / "dog").mkdir(), "class folder .*dog of --support holds no images"),
    bad("empty query", lambda c, s, q: [p.unlink() for p in q.rglob("*.png")] + [d.rmdir() for d in q.iterdir()],
        "--query .* holds no images"),
    bad("unreadable image", lambda c, s, q: (q / "bee" / "1.png").write_bytes(b"no png"),
        "cannot read image .*bee/1.png"),
    bad("unknown query class", lambda c, s, q: (q / "cat").rename(q / "cow"), r"\['cow'\] are not support classes"),
    bad("learned head, other way", lambda c, s, q: write_classes(s, ["dog"], 1), "--head learned: .* 3 classes",
        head="learned"),
    bad("negative steps", lambda c, s, q: None, "--steps -1: expected at least 0", steps=-1),
]


@pytest.mark.parametrize("spoil, words, head, steps", BAD_INPUTS)
def test_each_bad_input_is_one_error_line_and_exit_status_1(task, tmp_path, capsys, spoil, words, head, steps):
    ckpt, support, query = task
    spoil(ckpt, support, query)
    out = tmp_path / "p.csv"
    argv = ["--checkpoint", str(ckpt), "--support", str(support), "--query", str(query), "--out", str(out),
            "--device", "cpu"] + (["--head", head] if head else [])
    argv += ["--steps", str(steps)] if steps is not None else []
    assert adapt.cli(argv) == 1
    stdout, err = capsys.readouterr()
    assert stdout == "" and err.startswith("error: ") and err.count("\n") == 1
    assert re.search(words, err), err
    assert not out.exists()


def test_a_bad_flag_is_one_error_line_and_exit_status_2(task, capsys):
    ckpt, support, _ = task
    assert adapt.cli(["--checkpoint", str(ckpt), "--support", str(support)]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: ") and "--query" in err and err.count("\n") == 1
