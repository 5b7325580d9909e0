"""Tests of cka.py: the properties of linear CKA (Kornblith et al. 2019; supplement Figure 1), the CKA
matrix of models, and the heatmap writers of supplement Figure 1. CPU, fast, deterministic."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
from cka import (BAR_PX, CELL_PX, COLOURS, LABEL_PX, OTHER_DATASETS, SHADES, TITLE_PX, cka_matrix,
                 files_present, heatmap_size, linear_cka, synthetic_like, text_heatmap, write_csv,
                 write_heatmap_png)
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


def test_cka_matrix_fits_probe_to_models_of_other_input_formats():
    torch.manual_seed(0)
    grey, colour = Conv4(in_channels=1, image_size=16, hidden=8), Conv4(image_size=32, hidden=8)
    K = cka_matrix([grey, colour], torch.rand(20, 1, 16, 16))
    assert K.shape == (2, 2) and 0.0 < K[0, 1] <= 1.0


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
