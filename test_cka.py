"""Tests of cka.py: the properties of linear CKA (Kornblith et al. 2019; supplement Figure 1), the CKA
matrix of models, how a probe is fitted to a teacher of another input format, the heatmap writers
of supplement Figure 1, and the command: every bad flag value ends in one `error: ...` line before
any work, Ctrl-C in one line and status 130. CPU, deterministic; the command tests run cka.py as a
subprocess (about 1.5 s each, mostly importing torch)."""
import copy
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cka
import data
from cka import (BAR_PX, CELL_PX, COLOURS, LABEL_PX, OTHER_DATASETS, SHADES, TITLE_PX, cka_matrix,
                 files_present, fit_to_model, heatmap_size, linear_cka, model_features,
                 synthetic_like, text_heatmap, write_csv, write_heatmap_png)
from data import UserError
from models import Conv4

N, P, Q = 50, 12, 7  # inputs, feature widths of X and Y


def features(seed, n=N, p=P):
    """Random, correlated-across-columns feature matrix [n, p] (float64 numpy)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, p)) @ rng.standard_normal((p, p))


def random_orthogonal(p, seed):
    """Q of a QR decomposition of a Gaussian matrix: Q^T Q = I."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((p, p)))
    return q


def hsic_cka_reference(X, Y):
    """Direct evaluation of the HSIC form, no centring trick:
    HSIC(K, L) = tr(K H L H) / (n-1)^2, K = X X^T, L = Y Y^T, H = I - 11^T / n;
    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(A, B):
        return np.trace(A @ H @ B @ H) / (n - 1) ** 2

    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def test_cka_of_a_matrix_with_itself_is_one():
    X = features(0)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.tensor(X, dtype=torch.float32), torch.tensor(X)) == pytest.approx(1.0)


def test_cka_is_invariant_to_orthogonal_transform_of_either_side():
    X, Y = features(0), features(1, p=Q)
    base = linear_cka(X, Y)
    assert linear_cka(X @ random_orthogonal(P, 2), Y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(X, Y @ random_orthogonal(Q, 3)) == pytest.approx(base, abs=1e-12)


def test_cka_is_invariant_to_isotropic_scaling_of_either_side():
    X, Y = features(0), features(1, p=Q)
    base = linear_cka(X, Y)
    assert linear_cka(3.7 * X, Y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(X, 0.01 * Y) == pytest.approx(base, abs=1e-12)


def test_cka_handles_different_widths_and_is_symmetric():
    X, Y = features(0), features(1, p=Q)
    value = linear_cka(X, Y)
    assert 0.0 < value < 1.0
    assert linear_cka(Y, X) == pytest.approx(value, abs=1e-12)


def test_cka_matches_direct_hsic_formula():
    X, Y = features(4), features(5, p=Q) + 0.5 * features(4)[:, :Q]
    assert linear_cka(X, Y) == pytest.approx(hsic_cka_reference(X, Y), abs=1e-10)
    assert linear_cka(torch.tensor(X), Y) == pytest.approx(hsic_cka_reference(X, Y), abs=1e-10)


def test_cka_is_not_invariant_to_general_invertible_transform():
    """CCA-like (whitened) similarities are invariant to any invertible A; linear CKA is not."""
    X, Y = features(0), features(1, p=Q)
    A = np.diag(np.linspace(0.1, 10.0, P)) @ random_orthogonal(P, 6)  # invertible, not orthogonal
    assert abs(np.linalg.det(A)) > 1e-6
    assert abs(linear_cka(X @ A, Y) - linear_cka(X, Y)) > 1e-3


def test_cka_rejects_mismatched_inputs_and_constant_features():
    with pytest.raises(ValueError, match="same n"):
        linear_cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones((5, 2)), features(0, n=5))


def test_cka_matrix_is_symmetric_with_unit_diagonal_and_copy_gives_one():
    torch.manual_seed(0)
    kw = dict(in_channels=1, image_size=16, hidden=8)
    m = Conv4(**kw)
    other = Conv4(**kw)
    m.train()  # cka_matrix must evaluate in eval mode and restore the mode
    probe = torch.rand(24, 1, 16, 16)
    K = cka_matrix([m, copy.deepcopy(m), other], probe, batch_size=10)
    assert K.shape == (3, 3)
    np.testing.assert_allclose(np.diag(K), 1.0, atol=1e-12)
    np.testing.assert_allclose(K, K.T, atol=0)
    assert K[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert K[0, 2] < 1.0 - 1e-6
    assert m.training


def test_cka_matrix_of_a_grey_probe_equals_that_of_the_same_probe_in_colour():
    """A grey 16x16 teacher and a colour 32x32 teacher: the grey probe P and P with its channel
    repeated three times are the same images, so the CKA matrices agree (the grey teacher sees
    mean(P, P, P) = P, the colour one resize(P) on every channel either way)."""
    torch.manual_seed(0)
    grey, colour = Conv4(in_channels=1, image_size=16, hidden=8), Conv4(image_size=32, hidden=8)
    probe = torch.rand(20, 1, 16, 16)
    K = cka_matrix([grey, colour], probe)
    K_colour = cka_matrix([grey, colour], probe.repeat(1, 3, 1, 1))
    assert K.shape == (2, 2) and 0.0 < K[0, 1] < 1.0
    np.testing.assert_allclose(K, K_colour, atol=1e-6)


def stub_model(channels, size):
    """What fit_to_model reads of a model: its `arch` input format."""
    return SimpleNamespace(arch=dict(in_channels=channels, image_size=size))


def test_fit_to_model_gives_constant_grey_and_colour_images_the_same_input_and_features():
    """A constant grey 16x16 image and the same constant as a colour 32x32 image are the same
    picture to a model expecting 3x32x32: identical model inputs, hence identical CKA features.
    0.5 and the bilinear weights of a 2x upsampling (1/4, 3/4) are exact in binary, so equality
    is exact."""
    torch.manual_seed(0)
    model = Conv4(image_size=32, hidden=8)  # expects [B, 3, 32, 32]
    grey, colour = torch.full((4, 1, 16, 16), 0.5), torch.full((4, 3, 32, 32), 0.5)
    x_grey, x_colour = fit_to_model(grey, model), fit_to_model(colour, model)
    assert x_grey.shape == x_colour.shape == (4, 3, 32, 32)
    assert torch.equal(x_grey, x_colour)
    assert torch.equal(model_features(model, grey), model_features(model, colour))


def test_fit_to_model_repeats_grey_on_every_channel_after_resizing():
    """Each channel of a grey image fitted to a colour model is the grey image itself (same size)
    or the grey image resized as a grey model of that size would see it (other size)."""
    x = torch.rand(2, 1, 16, 16)
    same_size = fit_to_model(x, stub_model(3, 16))
    assert same_size.shape == (2, 3, 16, 16)
    for c in range(3):
        assert torch.equal(same_size[:, c], x[:, 0])
    resized = fit_to_model(x, stub_model(3, 32))
    grey_resized = fit_to_model(x, stub_model(1, 32))  # [2, 1, 32, 32]
    assert resized.shape == (2, 3, 32, 32) and grey_resized.shape == (2, 1, 32, 32)
    for c in range(3):
        assert torch.equal(resized[:, c], grey_resized[:, 0])


def test_fit_to_model_resizes_bilinearly_with_half_pixel_centres():
    """Upsampling the 2x2 image with rows [0, 1] to 4x4 (bilinear, align_corners=False): output
    column j samples source x = (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1],
    so every row is [0, 0.25, 0.75, 1] (align_corners=True would give thirds, nearest 0 0 1 1)."""
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    out = fit_to_model(x, stub_model(1, 4))
    expected = torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4)
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("probe_format, model_format", [
    ((1, 28), (3, 32)),  # Omniglot probe, CIFAR-FS teacher (panel b)
    ((3, 32), (1, 28)),  # colour probe, Omniglot teacher
    ((3, 84), (1, 28)),  # miniImageNet / CUB probe, Omniglot teacher
    ((1, 28), (1, 84)),  # grey probe, 84x84 grey teacher
    ((3, 84), (3, 32)),  # miniImageNet probe, CIFAR-FS teacher
], ids=lambda f: f"{f[0]}x{f[1]}")
def test_fit_to_model_output_is_the_models_input_format(probe_format, model_format):
    (c, s), (cm, sm) = probe_format, model_format
    model = Conv4(in_channels=cm, image_size=sm, hidden=4)
    out = fit_to_model(torch.rand(3, c, s, s), model)
    assert out.shape == (3, cm, sm, sm)
    assert model.features(out).shape == (3, model.feature_dim)


def test_fit_to_model_is_a_no_op_for_the_models_format_and_averages_colour_to_grey():
    x = torch.rand(2, 3, 32, 32)
    assert fit_to_model(x, Conv4(image_size=32, hidden=4)) is x
    rgb = torch.tensor([0.25, 0.5, 0.75]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    assert torch.equal(fit_to_model(rgb, stub_model(1, 8)), torch.full((2, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match="2-channel"):
        fit_to_model(torch.rand(2, 2, 8, 8), stub_model(3, 8))


def test_heatmap_png_has_expected_size_and_colours(tmp_path):
    labels = ["conv4-0", "conv4-1", "resnet10-0", "resnet18-0"]
    M = np.array([[1.0, 0.5, 0.2, 0.0], [0.5, 1.0, 0.3, 0.1], [0.2, 0.3, 1.0, 0.4],
                  [0.0, 0.1, 0.4, 1.0]])
    path = tmp_path / "cka.png"
    size = write_heatmap_png(M, labels, path, title="test")
    img = Image.open(path)
    assert img.size == size == heatmap_size(4)
    assert img.size[0] >= 4 * CELL_PX + BAR_PX and img.size[1] >= 4 * CELL_PX
    pixels = np.asarray(img.convert("RGB"))
    x0, y0, half = LABEL_PX, TITLE_PX + LABEL_PX, CELL_PX // 2  # grid corner, cell centre offset
    assert tuple(pixels[y0 + half, x0 + half]) == COLOURS[-1]  # (0, 0): value 1, top colour
    assert tuple(pixels[y0 + half, x0 + 3 * CELL_PX + half]) == COLOURS[0]  # (0, 3): value 0


def test_text_heatmap_and_csv_carry_labels_and_values(tmp_path):
    labels = ["a", "bb"]
    M = np.array([[1.0, 0.0], [0.0, 1.0]])
    text = text_heatmap(M, labels)
    assert SHADES[-1] * 2 + SHADES[0] * 2 in text and " a |" in text and "bb |" in text
    write_csv(M, labels, tmp_path / "m.csv")
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0] == ",a,bb" and rows[1] == "a,1.0000,0.0000"


def test_panel_b_synthetic_matches_probe_format_and_absent_files_are_skipped(tmp_path, monkeypatch):
    """Panel (b): synthetic teachers are built at the probe data set's size and channels
    (Omniglot: grey), under their own name; data sets whose files are absent are not loaded."""
    monkeypatch.setattr(data, "SYNTHETIC_CLASSES", {"train": 5, "val": 5, "test": 5})  # speed
    monkeypatch.setattr(data, "SYNTHETIC_PER_CLASS", 4)
    grey = SimpleNamespace(image_size=16, channels=1)
    syn = synthetic_like(grey, seed=0)
    assert syn.channels == 1 and syn.image_size == 16 and syn.name != "synthetic"
    assert syn.splits["train"].images.shape[1:] == (1, 16, 16)
    assert not any(files_present(name, tmp_path) for name in OTHER_DATASETS)


# ----------------------------------------------------------------------------- the command
SCRIPT = Path(__file__).resolve().parent / "cka.py"
# a valid command (cwd: a fresh folder): synthetic data needs no file; --out and --cache keep
# their defaults, cka_out and cache in the cwd, so a test sees any folder made
GOOD = ["--dataset", "synthetic", "--data-root", "data", "--preset", "smoke", "--device", "cpu"]
A_FILE = "afile"  # a plain file the tests make in the cwd, where a folder is expected
HAS_PROC = Path("/proc").is_dir()  # /proc/x: a folder no one can make (Linux)
# one bad value per flag of cka.py: flag -> (value, text the error line must carry besides both)
BAD_VALUES = {
    "--dataset": ("nosuch", "omniglot"),  # the valid names are listed
    "--data-root": (A_FILE, "expected a folder"),
    "--out": ("/proc/x", "can be written"),
    "--preset": ("nosuch", "smoke"),
    "--teachers": ("0", "at least 1"),
    "--seed": ("-1", "from 0 to"),
    "--device": ("nosuch", "cpu"),
    "--cache": (f"{A_FILE}/cache", "found a file"),
    "--zoo": ("nosuch", "found no zoo.json"),
}
WORKERS = 2  # cka.py processes at a time in the walk (each spends ~1.3 s importing torch)
TIMEOUT_S = 60  # a run that should stop at once but works on (a smoke run) is killed after this


def run_cka(args, cwd):
    """`python cka.py args` in cwd, on one thread, output unbuffered."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc):
    """(exit status, stdout, stderr) of proc, killed after TIMEOUT_S."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n(killed after {TIMEOUT_S} s)"
    return proc.returncode, out, err


def fresh_cwd(tmp_path_factory, name):
    cwd = tmp_path_factory.mktemp(name)
    (cwd / A_FILE).write_text("not a folder")
    return cwd


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every BAD_VALUES case as `python cka.py GOOD flag value` in its own fresh folder, WORKERS at
    a time: {flag: (exit status, stdout, stderr, the folder's entries afterwards)}."""
    def run(flag):
        if flag == "--out" and not HAS_PROC:
            return flag, None
        cwd = fresh_cwd(tmp_path_factory, flag.strip("-"))
        returncode, out, err = finish(run_cka(GOOD + [flag, BAD_VALUES[flag][0]], cwd))
        return flag, (returncode, out, err, sorted(os.listdir(cwd)))

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(pool.map(run, BAD_VALUES))


def test_every_flag_has_help_text_and_a_bad_value_in_the_walk():
    actions = [a for a in cka.make_parser()._actions if "--help" not in a.option_strings]
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    assert set(BAD_VALUES) == {a.option_strings[-1] for a in actions}


@pytest.mark.parametrize("flag", BAD_VALUES)
def test_bad_value_of_a_flag_is_one_error_line_before_any_work(bad_runs, flag):
    if bad_runs[flag] is None:
        pytest.skip("no /proc here")
    returncode, out, err, left = bad_runs[flag]
    value, says = BAD_VALUES[flag]
    lines = err.splitlines()
    assert returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert flag in lines[0] and value in lines[0] and says in lines[0], lines[0]
    assert out == "" and left == [A_FILE]  # no output folder, no cache, no data root


@pytest.mark.parametrize("argv, says", [
    (["--dataset", "synthetic"], "the following arguments are required: --data-root"),
    (GOOD + ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (GOOD + ["--teachers", "two"], "argument --teachers: invalid int value: 'two'"),
    (GOOD + ["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
], ids=["no-data-root", "unknown-flag", "teachers-not-int", "seed-not-int"])
def test_argparse_errors_are_one_error_line_with_status_2(capsys, argv, says):
    """argparse's own errors take the house format too: one `error: ...` line, no usage block."""
    with pytest.raises(SystemExit) as e:
        cka.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err == f"error: {says}; see python {cka.make_parser().prog} --help\n"


def in_process(tmp_path, monkeypatch, *extra):
    """cka.main's checks of GOOD + extra, in this process, with cwd tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / A_FILE).write_text("not a folder")
    cka.check_args(cka.parse_args(GOOD + list(extra)))


def test_good_flags_pass_the_checks_and_create_nothing(tmp_path, monkeypatch):
    """The positive control of the walk: there, only the flag under test is bad."""
    in_process(tmp_path, monkeypatch, "--out", "new/out", "--cache", "new/cache", "--teachers", "1",
               "--seed", str(cka.SEED_MAX))
    assert os.listdir(tmp_path) == [A_FILE]


@pytest.mark.parametrize("flag, value, says", [
    ("--teachers", "-3", "at least 1"),
    ("--seed", str(cka.SEED_MAX + 1), "from 0 to"),
    ("--out", A_FILE, "found a file"),
    ("--out", f"{A_FILE}/sub/out", "found a file"),
    ("--out", "", "empty"),
    ("--cache", "", "empty"),
    ("--data-root", f"{A_FILE}/data", "found a file"),
    pytest.param("--cache", "/proc/x", "can be written",
                 marks=pytest.mark.skipif(not HAS_PROC, reason="no /proc here")),
])
def test_more_bad_values_raise_user_errors_naming_the_flag(tmp_path, monkeypatch, flag, value,
                                                           says):
    with pytest.raises(UserError, match=says) as e:
        in_process(tmp_path, monkeypatch, flag, value)
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == [A_FILE]


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid here")
def test_device_cuda_without_cuda_is_a_user_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--device cuda"):
        cka.main(GOOD + ["--device", "cuda"])
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_the_zoo_prints_one_line_and_exits_130(tmp_path):
    """SIGINT once the probe is drawn (the smoke zoo is training): one line, status 130, no
    traceback, no temp file of zoo.py's atomic writes left behind."""
    # a child inherits an ignored SIGINT (pytest run as a background job); a handled one it does not
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = run_cka(GOOD, tmp_path)
    finally:
        signal.signal(signal.SIGINT, old)
    for line in proc.stdout:
        if line.startswith("probe:"):
            break
    else:
        pytest.fail(f"cka.py ended before drawing the probe: {proc.communicate()[1]}")
    proc.send_signal(signal.SIGINT)
    returncode, _, err = finish(proc)
    assert returncode == 130 and err.splitlines() == [cka.INTERRUPTED], err
    assert not list(tmp_path.rglob("*.part"))


def test_zoo_flag_draws_one_heatmap_of_your_own_teachers_logits(tmp_path, monkeypatch):
    """cka.py --zoo DIR: the teachers of DIR (TorchScript, their own input format) on the probe, their logits
    standing in for the penultimate features they do not show: CKA 1 on the diagonal, one CSV and PNG."""
    import json
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo").mkdir()
    entries = []
    for i in range(2):
        torch.manual_seed(i)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 6))
        torch.jit.save(torch.jit.script(net), str(tmp_path / "zoo" / f"t{i}.pt"))
        entries.append({"file": f"t{i}.pt", "classes": [f"mine{i}_{c}" for c in range(6)],
                        "input": {"size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3}})
    (tmp_path / "zoo" / "zoo.json").write_text(json.dumps({"teachers": entries}))
    cka.main(GOOD + ["--zoo", "zoo", "--out", "o"])
    rows = (tmp_path / "o" / "cka_zoo.csv").read_text().splitlines()
    assert rows[0] == ",t0.pt,t1.pt" and rows[1].startswith("t0.pt,1.0000,") and rows[2].endswith(",1.0000")
    assert (tmp_path / "o" / "cka_zoo.png").is_file() and not (tmp_path / "o" / "cka_a.csv").exists()
