"""Tests of FREE's equations (models.py, recover.py, maml.py): each asserts a property that a real
bug would break, with expected values derived by hand or against a naive reference. CPU only."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import maml
import recover
from models import BN_EPS, BatchStatNorm2d, Conv4, Generator, ResNet10, ResNet18, elementary_batch_norm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()), create_graph=True)])


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("size,nc", [(32, 3), (84, 3), (28, 1)])
def test_generator_follows_table1_layer_sequence_and_shapes(size, nc):
    G = Generator(image_size=size, nc=nc)
    assert G.fc.in_features == 256 and G.fc.out_features == 2 * 64 * (size // 4) ** 2
    kinds = [type(m).__name__ for m in G.net]
    assert kinds == ["BatchNorm2d", "Upsample", "Conv2d", "BatchNorm2d", "LeakyReLU", "Upsample",
                     "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d", "Sigmoid"]
    convs = [m for m in G.net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (128, 128, (3, 3), (1, 1), (1, 1)), (128, 64, (3, 3), (1, 1), (1, 1)), (64, nc, (3, 3), (1, 1), (1, 1))]
    assert all(m.negative_slope == 0.2 for m in G.net if isinstance(m, nn.LeakyReLU))
    x = G(torch.randn(4, 256))
    assert x.shape == (4, nc, size, size)
    assert x.min() > 0 and x.max() < 1


@pytest.mark.parametrize("make,size,nc", [(Conv4, 28, 1), (Conv4, 84, 3), (ResNet10, 32, 3), (ResNet18, 32, 3)])
def test_functional_call_matches_module_forward(make, size, nc):
    model = make(num_classes=5, in_channels=nc, image_size=size, mean=[0.3] * nc, std=[0.2] * nc)
    x = torch.rand(6, nc, size, size)
    for mode in (model.train, model.eval):
        mode()
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        torch.testing.assert_close(functional_call(model, params, (x,)), model(x))
    assert model(x).shape == (6, 5)


def test_conv4_meta_learner_uses_batch_statistics_in_eval_mode():
    m = Conv4(5, 1, 28, track_running_stats=False).eval()
    x = torch.rand(8, 1, 28, 28)
    # with batch statistics, a sample's output depends on the rest of the batch
    assert not torch.allclose(m(x)[:4], m(x[:4]))
    assert [k for k, _ in m.named_buffers()] == ["normalize.mean", "normalize.std"]  # no running stats
    # BatchStatNorm2d == nn.BatchNorm2d without running statistics (its formula: the test below)
    bn = nn.BatchNorm2d(32, track_running_stats=False)
    h = torch.randn(8, 32, 5, 5)
    torch.testing.assert_close(m.blocks[0][1](h), bn(h))


def test_batch_stat_norm_fused_and_elementary_match_the_formula_to_second_order():
    """y = gamma (x - mu_B) / sqrt(sigma_B^2 + eps) + beta, written here from the definition, against
    both of BatchStatNorm2d's forms: values, gradients, and the gradient of a gradient (MAML's outer step)."""
    g = torch.Generator().manual_seed(0)
    bn = BatchStatNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=g))
    x = torch.randn(4, 3, 5, 5, generator=g, requires_grad=True)
    v, u = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)

    def formula(x):
        mu = x.sum(dim=(0, 2, 3), keepdim=True) / (4 * 5 * 5)
        var = ((x - mu) ** 2).sum(dim=(0, 2, 3), keepdim=True) / (4 * 5 * 5)
        return bn.weight.view(1, 3, 1, 1) * (x - mu) / (var + BN_EPS) ** 0.5 + bn.bias.view(1, 3, 1, 1)

    def first_and_second_order(f):
        y = f(x)
        dx, = torch.autograd.grad((y * v).sum(), x, create_graph=True)
        return [y, dx, *torch.autograd.grad((dx * u).sum(), [x, bn.weight])]

    expected = first_and_second_order(formula)
    assert not BatchStatNorm2d.elementary
    fused = first_and_second_order(bn)
    with elementary_batch_norm():
        assert BatchStatNorm2d.elementary
        elementary = first_and_second_order(bn)
    assert not BatchStatNorm2d.elementary  # the switch is restored on exit
    for want, a, b in zip(expected, fused, elementary):
        torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- MAML


def test_one_inner_step_matches_hand_derivation():
    """Linear model W = 0, b = 0 on one sample x = [1, 2], y = 0, lr = 0.1.
    softmax = [1/2, 1/2], dCE/dlogits = p - e_y = [-1/2, 1/2];
    dW = (p - e_y) x^T = [[-1/2, -1], [1/2, 1]], db = [-1/2, 1/2];
    W' = -0.1 dW = [[0.05, 0.1], [-0.05, -0.1]], b' = [0.05, -0.05]."""
    model = nn.Linear(2, 2)
    params = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    out = maml.inner_adapt(model, params, torch.tensor([[1.0, 2.0]]), torch.tensor([0]), steps=1, lr=0.1)
    torch.testing.assert_close(out["weight"], torch.tensor([[0.05, 0.1], [-0.05, -0.1]]))
    torch.testing.assert_close(out["bias"], torch.tensor([0.05, -0.05]))


class TinyNet(nn.Module):
    """A small smooth network in float64 for derivative checks."""

    def __init__(self, d_in=3, d_h=4, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_h).double()
        self.fc2 = nn.Linear(d_h, d_out).double()

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_task(n=6, d_in=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def test_second_order_meta_gradient_matches_finite_differences():
    net = TinyNet()
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    (xs, ys), (xq, yq) = tiny_task(seed=1), tiny_task(seed=2)

    def outer(p):
        return maml.maml_task_loss(net, p, xs, ys, xq, yq, steps=2, lr=0.5, first_order=False)[0]

    analytic = torch.autograd.grad(outer(params), params["fc1.weight"])[0]
    eps = 1e-6
    for idx in [(0, 0), (1, 2), (3, 1)]:
        plus = {k: v.detach().clone() for k, v in params.items()}
        minus = {k: v.detach().clone() for k, v in params.items()}
        plus["fc1.weight"][idx] += eps
        minus["fc1.weight"][idx] -= eps
        fd = (outer(plus) - outer(minus)) / (2 * eps)
        assert abs(fd.item() - analytic[idx].item()) < 1e-7


def test_first_order_equals_second_order_minus_hessian_term():
    """One inner step theta' = theta - a g_s(theta):
    d/dtheta L_q(theta') = (I - a H_s) grad L_q(theta')  (second order)
    first order keeps only grad L_q(theta'), so  SO = FO - a H_s grad L_q(theta')."""
    net, a = TinyNet(), 0.3
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    (xs, ys), (xq, yq) = tiny_task(seed=3), tiny_task(seed=4)
    so = flat_grad(maml.maml_task_loss(net, params, xs, ys, xq, yq, 1, a, first_order=False)[0], params)
    fo = flat_grad(maml.maml_task_loss(net, params, xs, ys, xq, yq, 1, a, first_order=True)[0], params)
    adapted = maml.inner_adapt(net, params, xs, ys, 1, a)
    v = torch.autograd.grad(F.cross_entropy(functional_call(net, adapted, (xq,)), yq), list(adapted.values()))
    g_s = flat_grad(F.cross_entropy(functional_call(net, params, (xs,)), ys), params)
    hvp = torch.cat([h.reshape(-1) for h in torch.autograd.grad(g_s @ torch.cat([t.reshape(-1) for t in v]),
                                                                  list(params.values()))])
    torch.testing.assert_close(so, fo - a * hvp)
    assert (so - fo).abs().max() > 1e-4  # the Hessian term is not negligible here


def two_kd_tasks(seeds=(5, 6)):
    """Two recovered-task stand-ins (x, y, teacher_logits) for the TinyNet, float64."""
    tasks = []
    for s in seeds:
        x, y = tiny_task(seed=s)
        tasks.append((x, y, torch.randn(x.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(s))))
    return tasks


def kd_grad(net, p, task):
    """grad_theta L_KD(T; theta) at p (leaves that require grad), flat, with the graph kept (for
    Hessian-vector products)."""
    return flat_grad(maml.distill_loss(net, p, task), p)


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def task_grad(net, p, task):
    """grad_theta L(T; theta) at the point p, as a dict (no graph kept)."""
    p = {k: v.clone().requires_grad_() for k, v in p.items()}
    return dict(zip(p, torch.autograd.grad(maml.distill_loss(net, p, task), list(p.values()))))


def test_lemma1_error_is_second_order_in_alpha():
    """Lemma 1, through Eq. (3) as implemented (SGD steps on theta_tilde, tasks T_j then T_i):
    g = (theta - theta_tilde) / (2 alpha) = (grad L_j(theta) + grad L_i(theta - alpha grad L_j)) / 2, and
    grad L_i(theta - alpha grad L_j) = grad L_i - alpha H_i grad L_j + O(alpha^2).
    So r(alpha) = |2 g - g_j - (g_i - alpha H_i g_j)| is O(alpha^2): it must shrink about 4x when alpha halves.
    The -alpha H_i g_j term is what the sequential steps add to the plain mean gradient: over both orders it
    sums to -(alpha/2) grad(g_i . g_j), so the meta-update also raises the alignment of the two tasks'
    gradients (Theorem 1, next test)."""
    net = TinyNet()
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    T_j, T_i = two_kd_tasks()
    g_i, g_j = kd_grad(net, theta, T_i), kd_grad(net, theta, T_j)
    H_i_g_j = torch.cat([h.reshape(-1) for h in torch.autograd.grad(g_i @ g_j.detach(), list(theta.values()))])

    def remainder(alpha):
        g, _ = maml.align_meta_gradient(net, theta, [T_j, T_i], alpha=alpha, optimizer="sgd")
        return (2 * flat(g) - g_j.detach() - (g_i - alpha * H_i_g_j).detach()).norm().item()

    r = [remainder(a) for a in (0.1, 0.05, 0.025)]
    for big, small in zip(r, r[1:]):
        assert 3.3 < big / small < 4.7, r


def test_theorem1_both_orders_ascend_the_gradient_inner_product():
    """Theorem 1: averaged over the two task orders, Eq. (3) with SGD gives
    g(ij) + g(ji) = g_i + g_j - (alpha / 2) grad(g_i . g_j) + O(alpha^2),
    i.e. a descent step on it raises the alignment g_i . g_j. grad(g_i . g_j) is computed
    independently, by differentiating the inner product; the remainder must shrink ~4x as alpha halves."""
    net = TinyNet()
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    T_i, T_j = two_kd_tasks((3, 4))
    g_i, g_j = kd_grad(net, theta, T_i), kd_grad(net, theta, T_j)
    grad_dot = torch.cat([h.reshape(-1) for h in torch.autograd.grad(g_i @ g_j, list(theta.values()))])

    def remainder(alpha):
        g_ij, _ = maml.align_meta_gradient(net, theta, [T_i, T_j], alpha=alpha, optimizer="sgd")
        g_ji, _ = maml.align_meta_gradient(net, theta, [T_j, T_i], alpha=alpha, optimizer="sgd")
        return (flat(g_ij) + flat(g_ji) - (g_i + g_j - alpha / 2 * grad_dot).detach()).norm().item()

    r = [remainder(a) for a in (0.1, 0.05, 0.025)]
    assert r[0] > 1e-6  # the alignment term is really there to be matched
    for big, small in zip(r, r[1:]):
        assert 3.3 < big / small < 4.7, r


def test_eq3_meta_gradient_is_sequential_and_no_align_is_the_mean_gradient():
    """Two tasks, B = 2, SGD: Eq. (3) steps theta_1 = theta - a g_1(theta), theta_2 = theta_1 - a g_2(theta_1),
    so (theta - theta_2) / (2a) = (g_1(theta) + g_2(theta_1)) / 2; without alignment both steps start
    at theta: (g_1(theta) + g_2(theta)) / 2."""
    net, a = TinyNet(), 0.2
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    tasks = two_kd_tasks((7, 8))

    g1 = task_grad(net, theta, tasks[0])
    theta_1 = {k: theta[k] - a * g1[k] for k in theta}
    g2_seq, g2_ind = task_grad(net, theta_1, tasks[1]), task_grad(net, theta, tasks[1])
    aligned, _ = maml.align_meta_gradient(net, theta, tasks, alpha=a, optimizer="sgd")
    independent, _ = maml.align_meta_gradient(net, theta, tasks, alpha=a, align=False, optimizer="sgd")
    for k in theta:
        torch.testing.assert_close(aligned[k], (g1[k] + g2_seq[k]) / 2)
        torch.testing.assert_close(independent[k], (g1[k] + g2_ind[k]) / 2)
    assert any((aligned[k] - independent[k]).abs().max() > 1e-6 for k in theta)


def test_eq3_sgd_meta_gradient_keeps_float32_precision_at_the_papers_alpha():
    """At alpha = 1e-3 and |theta| ~ 1, theta - theta_tilde is ~1e-3 * |grad|: recovering the gradient from it
    in float32 would lose about log10(1 / alpha) digits (error ~ eps * |theta| / alpha ~ 1e-4). The float32
    meta-gradient must match the float64 one of the same sequential steps, (g_1(theta) + g_2(theta_1)) / 2,
    to float32 precision."""
    net64, a = TinyNet(), maml.ALPHA
    with torch.no_grad():
        for p in net64.parameters():
            p.add_(torch.sign(p))  # |theta| ~ 1, as in a trained network's larger weights
    theta64 = {k: v.detach().clone() for k, v in net64.named_parameters()}
    tasks64 = two_kd_tasks((7, 8))
    g1 = task_grad(net64, theta64, tasks64[0])
    theta_1 = {k: theta64[k] - a * g1[k] for k in theta64}
    g2 = task_grad(net64, theta_1, tasks64[1])

    net32 = copy.deepcopy(net64).float()
    theta32 = {k: v.float() for k, v in theta64.items()}
    tasks32 = [(x.float(), y, t.float()) for x, y, t in tasks64]
    aligned, _ = maml.align_meta_gradient(net32, theta32, tasks32, alpha=a, optimizer="sgd")
    for k in theta64:
        torch.testing.assert_close(aligned[k].double(), (g1[k] + g2[k]) / 2, rtol=1e-5, atol=1e-6)


def test_eq3_with_adam_follows_two_hand_written_adam_steps():
    """Eq. (3) with the supplement's Adam (betas 0.9, 0.999, eps 1e-8), B = 2, written out by hand:
    step 1: m = 0.1 g1, v = 0.001 g1^2, m_hat = g1, v_hat = g1^2 -> theta_1 = theta - a g1 / (|g1| + eps);
    step 2 (g2 at theta_1): m = 0.09 g1 + 0.1 g2, v = 0.000999 g1^2 + 0.001 g2^2,
    m_hat = m / (1 - 0.81), v_hat = v / (1 - 0.998001) -> theta_2 = theta_1 - a m_hat / (sqrt(v_hat) + eps);
    meta-gradient (theta - theta_2) / 2 (Reptile's mean step). Without alignment, each task takes its own first
    Adam step from theta."""
    net, a, eps = TinyNet(), 0.01, 1e-8
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    tasks = two_kd_tasks((7, 8))

    g1 = task_grad(net, theta, tasks[0])
    theta_1 = {k: theta[k] - a * g1[k] / (g1[k].abs() + eps) for k in theta}
    g2 = task_grad(net, theta_1, tasks[1])
    theta_2 = {}
    for k in theta:
        m_hat = (0.09 * g1[k] + 0.1 * g2[k]) / (1 - 0.9 ** 2)
        v_hat = (0.999 * 0.001 * g1[k] ** 2 + 0.001 * g2[k] ** 2) / (1 - 0.999 ** 2)
        theta_2[k] = theta_1[k] - a * m_hat / (v_hat.sqrt() + eps)
    aligned, _ = maml.align_meta_gradient(net, theta, tasks, alpha=a, optimizer="adam")
    g2_0 = task_grad(net, theta, tasks[1])
    independent, _ = maml.align_meta_gradient(net, theta, tasks, alpha=a, align=False, optimizer="adam")
    for k in theta:
        torch.testing.assert_close(aligned[k], (theta[k] - theta_2[k]) / 2)
        sign_steps = g1[k] / (g1[k].abs() + eps) + g2_0[k] / (g2_0[k].abs() + eps)
        torch.testing.assert_close(independent[k], a * sign_steps / 2)


def torch_optimizer_steps(model, theta, tasks, alpha, optimizer):
    """Naive reference of Eq. (3)'s inner walk: a clone of theta stepped through `tasks` by torch.optim.Adam or
    torch.optim.SGD (lr = alpha) with loss.backward(); returns (theta - theta_tilde, the task losses)."""
    clone = {k: v.clone().requires_grad_() for k, v in theta.items()}
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(clone.values(), lr=alpha)
    losses = []
    for task in tasks:
        opt.zero_grad()
        loss = maml.distill_loss(model, clone, task)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {k: theta[k] - clone[k].detach() for k in theta}, torch.stack(losses)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_eq3_follows_torch_optimizers_and_no_align_is_the_mean_of_single_task_steps(optimizer):
    """Eq. (3) on a Conv4 meta-learner, B = 3 tasks, float64, against torch.optim stepped by hand:
    aligned, g = reptile_scale(alpha, B) * (theta - theta_tilde_B) with one optimizer walking T_1, T_2, T_3;
    `--no-align`, g = (1/B) sum_j g({T_j}), the mean of the single-task meta-gradients (a fresh optimizer
    from theta per task). The returned loss is the mean of the losses met on the way."""
    model, alpha, B = Conv4(5, 1, 16, track_running_stats=False).double(), 0.05, 3
    theta = maml.detached_params(model)
    g = torch.Generator().manual_seed(0)
    tasks = [(torch.rand(10, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(5).repeat(2),
              torch.randn(10, 5, generator=g, dtype=torch.float64)) for _ in range(B)]
    scale = maml.reptile_scale(alpha, B, optimizer)
    moved, losses = torch_optimizer_steps(model, theta, tasks, alpha, optimizer)
    single = [torch_optimizer_steps(model, theta, [t], alpha, optimizer) for t in tasks]
    aligned, aligned_loss = maml.align_meta_gradient(model, theta, tasks, alpha=alpha, optimizer=optimizer)
    independent, independent_loss = maml.align_meta_gradient(model, theta, tasks, alpha=alpha, align=False,
                                                             optimizer=optimizer)
    # atol: conv biases before batch-statistics BN have a zero gradient up to round-off (~1e-16), which Adam
    # divides by |g| + eps = 1e-8; every other coordinate agrees to ~1e-16
    tol = dict(rtol=1e-10, atol=1e-10)
    for k in theta:
        torch.testing.assert_close(aligned[k], scale * moved[k], **tol)
        torch.testing.assert_close(independent[k], sum(scale * d[k] for d, _ in single), **tol)
    torch.testing.assert_close(aligned_loss, losses.mean())
    torch.testing.assert_close(independent_loss, torch.cat([l for _, l in single]).mean())
    assert max((aligned[k] - independent[k]).abs().max() for k in theta) > 1e-3 * max(
        aligned[k].abs().max() for k in theta)  # the sequence matters: aligned is not the independent mean


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("hard_labels,tau", [(True, 1.0), (False, 3.0)])
def test_eq3_passes_tau_and_hard_labels_to_every_step(optimizer, hard_labels, tau):
    """Supplement Table 2's hard labels and a KD temperature tau != 1 reach every step of Eq. (3)'s walk,
    for both optimizers: against torch.optim stepped by hand on the loss written out here,
    CE(f(x), Y) = -mean_n log p_f(Y_n | x_n), or tau^2 * mean_n sum_c p_M,c (log p_M,c - log p_f,c) at tau."""
    model, alpha, B = Conv4(5, 1, 16, track_running_stats=False).double(), 0.05, 2
    theta = maml.detached_params(model)
    g = torch.Generator().manual_seed(1)
    tasks = [(torch.rand(10, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(5).repeat(2),
              torch.randn(10, 5, generator=g, dtype=torch.float64)) for _ in range(B)]

    def loss_by_hand(p, task):
        x, y, teacher_logits = task
        logits = functional_call(model, p, (x,))
        if hard_labels:
            return -F.log_softmax(logits, 1)[torch.arange(len(y)), y].mean()
        p_m = F.softmax(teacher_logits / tau, 1)
        return tau ** 2 * (p_m * (p_m.log() - F.log_softmax(logits / tau, 1))).sum(1).mean()

    clone = {k: v.clone().requires_grad_() for k, v in theta.items()}
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(clone.values(), lr=alpha)
    for task in tasks:
        opt.zero_grad()
        loss_by_hand(clone, task).backward()
        opt.step()
    got, _ = maml.align_meta_gradient(model, theta, tasks, alpha=alpha, tau=tau, hard_labels=hard_labels,
                                      optimizer=optimizer)
    # atol: the zero-gradient conv biases (test_eq3_follows_torch_optimizers_...), at tau^2 = 9 times the loss
    for k in theta:
        torch.testing.assert_close(got[k], maml.reptile_scale(alpha, B, optimizer) * (theta[k] - clone[k].detach()),
                                   rtol=1e-10, atol=1e-8)


def test_eq3_defaults_are_kd_at_tau_1_with_adam_and_sgds_scale_is_one_over_alpha_b():
    """The defaults a caller gets: KD (not hard labels) at tau = TAU = 1, theta_tilde stepped by Adam (the
    supplement and the authors' code), for align_meta_gradient and each step function; reptile_scale's
    default is SGD's 1 / (alpha B); an unknown optimizer is refused by name."""
    model = Conv4(5, 1, 16, track_running_stats=False).double()
    theta = maml.detached_params(model)
    g = torch.Generator().manual_seed(2)
    tasks = [(torch.rand(10, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(5).repeat(2),
              torch.randn(10, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
    bare, _ = maml.align_meta_gradient(model, theta, tasks)
    explicit, _ = maml.align_meta_gradient(model, theta, tasks, alpha=maml.ALPHA, tau=1.0, hard_labels=False,
                                           align=True, optimizer="adam")
    hard, _ = maml.align_meta_gradient(model, theta, tasks, hard_labels=True)
    for k in theta:
        torch.testing.assert_close(bare[k], explicit[k], rtol=0, atol=0)
    assert max((bare[k] - hard[k]).abs().max() for k in theta) > 0  # hard labels would be told apart
    for step in (maml.theta_tilde_adam, maml.theta_tilde_sgd):
        (moved, losses), (moved_kd, losses_kd) = step(model, theta, tasks), step(model, theta, tasks, tau=1.0,
                                                                                 hard_labels=False)
        (_, losses_ce) = step(model, theta, tasks, hard_labels=True)
        torch.testing.assert_close(losses, losses_kd, rtol=0, atol=0)
        assert not torch.allclose(losses, losses_ce)
    loss_kd, _ = maml.task_loss_and_grad(model, theta, tasks[0])
    torch.testing.assert_close(loss_kd, maml.kd_loss(functional_call(model, theta, (tasks[0][0],)), tasks[0][2]))
    assert maml.reptile_scale(0.1, 4) == pytest.approx(1 / (0.1 * 4))
    with pytest.raises(ValueError, match="must be one of"):
        maml.align_meta_gradient(model, theta, tasks, optimizer="rmsprop")


def test_maml_defaults_are_second_order():
    """MAML (Finn et al. 2017) is second order by default: the outer gradient of maml_meta_batch_loss,
    maml_task_loss and inner_adapt called without `first_order` equals first_order=False's and differs
    from FOMAML's (which drops the Hessian term)."""
    model = Conv4(5, 1, 16, track_running_stats=False).double()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    x_s, x_q = (torch.rand(1, 5 * n, 1, 16, 16, generator=g, dtype=torch.float64) for n in (1, 3))
    y_s, y_q = torch.arange(5)[None], torch.arange(5).repeat_interleave(3)[None]

    def outer_grad(loss_of):
        return flat_grad(loss_of(), params)

    calls = {
        "meta_batch": lambda **kw: maml.maml_meta_batch_loss(model, params, x_s, y_s, x_q, y_q, steps=2, **kw)[0],
        "task": lambda **kw: maml.maml_task_loss(model, params, x_s[0], y_s[0], x_q[0], y_q[0], steps=2, **kw)[0],
        "inner": lambda **kw: F.cross_entropy(functional_call(model, maml.inner_adapt(
            model, params, x_s[0], y_s[0], steps=2, **kw), (x_q[0],)), y_q[0])}
    for name, call in calls.items():
        default, second, first = (outer_grad(lambda: call(**kw)) for kw in ({}, {"first_order": False},
                                                                           {"first_order": True}))
        torch.testing.assert_close(default, second, rtol=0, atol=0, msg=name)
        assert (default - first).abs().max() > 1e-8, name


def test_apply_meta_gradient_hands_the_outer_optimizer_the_meta_gradient():
    """The outer step of Eq. (3): with SGD at lr 1 the parameters move by exactly -g (a copy of g: changing
    g afterwards leaves the step's gradient alone)."""
    model = Conv4(5, 1, 16, track_running_stats=False)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = {k: torch.randn_like(v) for k, v in before.items()}
    maml.apply_meta_gradient(model, torch.optim.SGD(model.parameters(), lr=1.0), g)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[k] - g[k], rtol=0, atol=1e-6)
        g[k].add_(1.0)
        assert not torch.equal(p.grad, g[k])


def test_vmapped_meta_batch_matches_per_task_loop():
    """One Conv4 meta-learner (one set of parameters) and one meta-batch of T = 3 learnable 5-way tasks: the
    vmap and loop paths of map_tasks must give the same MAML outer loss, accuracy and outer gradient (second
    and first order), equal to the mean of maml_task_loss called task by task, and the same meta-test
    accuracies, equal to adapt_and_score task by task. float32; the gradient tolerance is 1e-4 of the
    gradient's largest entry (measured differences: ~3e-6 of it, at 1 and at 2 threads)."""
    model = Conv4(5, 1, 16, track_running_stats=False)
    params = dict(model.named_parameters())
    T, g = 3, torch.Generator().manual_seed(0)
    prototypes = torch.rand(T, 5, 1, 16, 16, generator=g)  # one pattern per class and task
    x_s = (prototypes.repeat_interleave(2, 1) + 0.3 * torch.randn(T, 10, 1, 16, 16, generator=g)).clamp(0, 1)
    x_q = (prototypes.repeat_interleave(3, 1) + 0.3 * torch.randn(T, 15, 1, 16, 16, generator=g)).clamp(0, 1)
    y_s, y_q = torch.arange(5).repeat_interleave(2).expand(T, -1), torch.arange(5).repeat_interleave(3).expand(T, -1)
    tasks = list(zip(x_s, y_s, x_q, y_q))
    for first_order in (False, True):
        out = {}
        for vec in (True, False):
            loss, acc = maml.maml_meta_batch_loss(model, params, x_s, y_s, x_q, y_q, steps=2,
                                                  first_order=first_order, vectorize=vec)
            out[vec] = (loss, acc, torch.autograd.grad(loss, list(params.values())))
        per_task = [maml.maml_task_loss(model, params, *t, steps=2, first_order=first_order) for t in tasks]
        ref_loss = torch.stack([l for l, _ in per_task]).mean()
        ref_acc = torch.stack([a for _, a in per_task]).mean()
        ref_grad = torch.autograd.grad(ref_loss, list(params.values()))
        atol = 1e-4 * max(r.abs().max().item() for r in ref_grad)
        for vec in (True, False):
            loss, acc, grads = out[vec]
            torch.testing.assert_close(loss, ref_loss)
            torch.testing.assert_close(acc, ref_acc)
            for a, r in zip(grads, ref_grad):
                torch.testing.assert_close(a, r, rtol=1e-4, atol=atol)
    ref_test = torch.stack([maml.adapt_and_score(model, maml.detached_params(model), *t, steps=3) for t in tasks])
    assert len(set(ref_test.tolist())) > 1  # the tasks score differently: a mix-up of tasks would show
    for vec in (True, False):
        torch.testing.assert_close(maml.meta_test(model, params, x_s, y_s, x_q, y_q, steps=3, vectorize=vec), ref_test)


# ---------------------------------------------------------------- KD and L_adv


def test_kd_loss_zero_iff_the_logits_equal_the_teachers():
    t = torch.randn(8, 5)
    assert maml.kd_loss(t.clone(), t).abs().item() < 1e-6
    assert maml.kd_loss(torch.randn(8, 5), t).item() > 1e-3
    # tau^2 * KL at temperature tau, checked against the definition (tau = 3: tau * 2 would not pass for tau ** 2)
    s, tau = torch.randn(8, 5), 3.0
    p, q = F.softmax(t / tau, 1), F.softmax(s / tau, 1)
    expected = tau ** 2 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(maml.kd_loss(s, t, tau), expected)


def test_distill_loss_is_kd_at_tau_or_ce_on_the_recovered_labels():
    """L(T_j; theta) of BELL: KD at the given temperature, or (supplement Table 2's hard labels) the
    cross-entropy with the recovered labels Y, -mean_n log p_f(Y_n | x_n), written out here."""
    model = Conv4(5, 1, 16, track_running_stats=False).double()
    params = maml.detached_params(model)
    g = torch.Generator().manual_seed(4)
    x, y, t = torch.rand(10, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(5).repeat(2), \
        torch.randn(10, 5, generator=g, dtype=torch.float64)
    logits = functional_call(model, params, (x,))
    ce = -F.log_softmax(logits, 1)[torch.arange(10), y].mean()
    torch.testing.assert_close(maml.distill_loss(model, params, (x, y, t), hard_labels=True), ce)
    p_m = F.softmax(t / 3.0, 1)
    kd3 = 9.0 * (p_m * (p_m.log() - F.log_softmax(logits / 3.0, 1))).sum(1).mean()
    torch.testing.assert_close(maml.distill_loss(model, params, (x, y, t), tau=3.0), kd3)


def test_accuracy_is_the_fraction_of_rows_whose_argmax_is_the_label():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0]])  # argmax per row: 0, 1, 2
    assert maml.accuracy(logits, torch.tensor([0, 1, 1])).item() == pytest.approx(2 / 3)
    assert maml.accuracy(logits, torch.tensor([0, 1, 2])).item() == 1.0


def test_kd_gradient_matches_finite_differences():
    t = torch.randn(4, 5, dtype=torch.float64)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s_: maml.kd_loss(s_, t, 1.5), (s,))


def test_adversarial_mask_keeps_only_agreeing_samples():
    """Rows 0 and 2 agree (argmax 0 and 1); row 1 disagrees and must not contribute.
    L_adv = -(KL_0 + KL_2) / 3 (the mean runs over all n = 3 samples)."""
    teacher = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    learner = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    p, q = F.softmax(teacher, 1), F.softmax(learner, 1)
    kl = (p * (p.log() - q.log())).sum(1)
    torch.testing.assert_close(recover.adversarial_loss(teacher, learner), -(kl[0] + kl[2]) / 3)
    # changing the disagreeing row's meta-learner logits must not change the loss
    learner2 = learner.clone()
    learner2[1] = torch.tensor([-5.0, 5.0])
    torch.testing.assert_close(recover.adversarial_loss(teacher, learner2), -(kl[0] + kl[2]) / 3)


def test_augment_is_a_shift_within_padding_and_keeps_gradients():
    """A(.): every output is the zero-padded input cropped at some offset in [0, 2 pad] (and maybe mirrored);
    over 200 images the offsets really vary and about half are mirrored; gradients reach the input."""
    pad, n, H = 2, 200, 8
    x = torch.rand(n, 1, H, H, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    out = recover.augment(x, pad=pad, flip=True, generator=g)
    assert out.shape == x.shape
    padded = F.pad(x.detach(), [pad] * 4)
    offsets, flips = set(), 0
    for i in range(n):
        found = [(di, dj, f) for di in range(2 * pad + 1) for dj in range(2 * pad + 1) for f in (False, True)
                 if torch.equal(out[i].detach(), (lambda c: c.flip(2) if f else c)(padded[i, :, di:di + H, dj:dj + H]))]
        assert found, f"image {i} is not a crop of its padded input"
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) > 10  # not a fixed crop (a no-op is the single offset (pad, pad))
    assert 60 < flips < 140  # mirrored with probability 1/2
    no_flip = recover.augment(x, pad=pad, flip=False, generator=g)
    assert not torch.equal(no_flip, x)
    out.sum().backward()
    assert x.grad is not None and x.grad.max() <= 1.0
    assert torch.allclose(recover.augment(x, pad=0, flip=False), x)


# ---------------------------------------------------------------- recovery (FIVE)


SIZE, NC, WAY, NF_TINY = 16, 1, 5, 16


def train_tiny_teacher(classes, prototypes, steps=40):
    """A Conv4 teacher on `classes` of a pool of fixed random 16x16 patterns plus noise."""
    model = Conv4(WAY, NC, SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    y = torch.arange(WAY).repeat_interleave(16)
    for _ in range(steps):
        x = (prototypes[classes][y] + 0.15 * torch.randn(len(y), NC, SIZE, SIZE)).clamp(0, 1)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_zoo():
    torch.manual_seed(1)
    prototypes = (torch.rand(20, NC, SIZE, SIZE) > 0.5).float()
    return [train_tiny_teacher(torch.randperm(20)[:WAY], prototypes) for _ in range(7)]


def test_k_recovery_steps_raise_teacher_accuracy(tiny_zoo):
    G = Generator(SIZE, NC, nf=NF_TINY)
    before = recover.recover_task(G, tiny_zoo[0], WAY, steps=0, n_per_class=10, flip=False, meta_grad=False)
    after = recover.recover_task(G, tiny_zoo[0], WAY, steps=30, n_per_class=10, lr=0.01, flip=False)
    assert after.teacher_acc > before.teacher_acc + 0.3
    assert after.x.shape == (50, NC, SIZE, SIZE) and after.teacher_logits.shape == (50, WAY)
    assert len(after.meta_grad) == len(list(G.parameters()))


def test_recovery_leaves_the_teachers_batchnorm_statistics_unchanged(tiny_zoo):
    """Recovery only reads the teacher: its BatchNorm running statistics (and weights) stay as trained,
    with L_adv on (a meta-learner present) and without."""
    teacher = tiny_zoo[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert any("running_mean" in k for k in before)
    learner = Conv4(WAY, NC, SIZE, track_running_stats=False)
    for s in (None, (learner, maml.detached_params(learner))):
        recover.recover_task(Generator(SIZE, NC, nf=NF_TINY), teacher, WAY, steps=3, n_per_class=4, flip=False,
                             meta_learner=s)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_recover_task_returns_the_kth_steps_images_and_gradient(tiny_zoo):
    """k evaluations of Eq. (1): k - 1 Adam steps, then the k-th gradient is the meta-gradient at the
    images returned (no extra pass). Checked against a hand-written loop with the same random draws."""
    G, teacher, k, n, lr = Generator(SIZE, NC, nf=NF_TINY), tiny_zoo[1], 3, 4, 0.01
    torch.manual_seed(11)
    r = recover.recover_task(G, teacher, WAY, steps=k, n_per_class=n, lr=lr, flip=False)
    torch.manual_seed(11)
    G2 = copy.deepcopy(G)
    Z = torch.randn(WAY * n, G2.d_z, requires_grad=True)
    Y = recover.labels_Y(WAY, n, "cpu")
    opt = torch.optim.Adam(list(G2.parameters()) + [Z], lr=lr, betas=recover.GEN_BETAS)
    for _ in range(k - 1):
        opt.zero_grad()
        recover.inversion_loss(teacher, G2(Z), Y, flip=False).backward()
        opt.step()
    x = G2(Z)
    grads = torch.autograd.grad(recover.inversion_loss(teacher, x, Y, flip=False), list(G2.parameters()))
    torch.testing.assert_close(r.x, x.detach())
    for a, b in zip(r.meta_grad, grads):
        torch.testing.assert_close(a, b)


def test_recovery_with_a_seeded_generator_depends_on_its_seed_alone(tiny_zoo):
    """With a CPU torch.Generator, Z and every augmentation draw of Eq. (1) come from it: two recoveries with
    generators of the same seed give identical images and meta-gradients whatever the global RNG's state
    (reseeded differently before each), and another seed gives other images. The same for the from-scratch
    baseline, whose fresh generator's initialisation also comes from the seeded stream."""
    G, teacher = Generator(SIZE, NC, nf=NF_TINY), tiny_zoo[2]
    learner = Conv4(WAY, NC, SIZE, track_running_stats=False)
    kwargs = dict(steps=3, n_per_class=4, lr=0.01, flip=True, meta_learner=(learner, maml.detached_params(learner)))

    def seeded(global_seed, seed):
        torch.manual_seed(global_seed)
        return recover.recover_task(G, teacher, WAY, generator=torch.Generator().manual_seed(seed), **kwargs)

    a, b, c = seeded(1, 7), seeded(2, 7), seeded(1, 8)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    for ga, gb in zip(a.meta_grad, b.meta_grad):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert not torch.allclose(a.x, c.x)

    def scratch(global_seed, seed):
        torch.manual_seed(global_seed)
        return recover.recover_from_scratch(teacher, WAY, steps=2, image_size=SIZE, nc=NC, nf=NF_TINY, n_per_class=2,
                                            generator=torch.Generator().manual_seed(seed)).x

    torch.testing.assert_close(scratch(1, 7), scratch(2, 7), rtol=0, atol=0)
    assert not torch.allclose(scratch(1, 7), scratch(1, 8))


def test_meta_generator_recovers_unseen_teacher_better_than_fresh_generator(tiny_zoo):
    """The FIVE claim, small: after 20 meta-updates over 6 teachers, k = 5 evaluations of Eq. (1) from theta_G
    on an unseen teacher reach a lower Eq. (1) loss and a higher accuracy than k = 5 from the same
    initial generator without meta-training (16 recoveries each, same Z seeds; the margins hold at 1 and 2
    torch threads, whose float rounding differs)."""
    k, n, lr, nf = 5, 10, 0.01, 8
    meta = recover.MetaGenerator(Generator(SIZE, NC, nf=nf), lr=lr)
    fresh = copy.deepcopy(meta.G)
    for _ in range(20):
        meta.meta_update([recover.recover_task(meta.G, t, WAY, k, n, lr, flip=False).meta_grad for t in tiny_zoo[:6]])

    def recover_unseen(G):
        torch.manual_seed(5)
        runs = [recover.recover_task(G, tiny_zoo[6], WAY, k, n, lr, flip=False, meta_grad=False) for _ in range(16)]
        return (sum(r.teacher_acc for r in runs) / len(runs),
                sum(F.cross_entropy(r.teacher_logits, r.y).item() for r in runs) / len(runs))

    (acc_meta, loss_meta), (acc_fresh, loss_fresh) = recover_unseen(meta.G), recover_unseen(fresh)
    assert acc_meta > acc_fresh + 0.05 and loss_meta < loss_fresh - 0.1, (acc_meta, acc_fresh, loss_meta, loss_fresh)


def test_meta_update_gives_the_optimizer_the_mean_of_the_teachers_meta_gradients():
    """meta_update must step theta_G with (1/B) sum_i grad L_G(T_i; theta_G'_i). Adam's step does not see the
    gradient's scale (a sum would pass), so an SGD with lr = 1 is swapped in: theta_G must move by exactly
    -(g_1 + g_2 + g_3) / 3 for three unequal gradients (the last or the first teacher alone, or the sum, move
    it elsewhere)."""
    G = Generator(SIZE, NC, nf=NF_TINY)
    meta = recover.MetaGenerator(G)
    meta.opt = torch.optim.SGD(G.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g) for p in G.parameters()] for _ in range(3)]
    before = [p.detach().clone() for p in G.parameters()]
    meta.meta_update(grads)
    for j, (p, b) in enumerate(zip(G.parameters(), before)):
        torch.testing.assert_close(p.detach(), b - (grads[0][j] + grads[1][j] + grads[2][j]) / 3)


def test_meta_update_moves_theta_G_with_persistent_adam_state():
    G = Generator(SIZE, NC, nf=NF_TINY)
    meta = recover.MetaGenerator(G)
    before = [p.detach().clone() for p in G.parameters()]
    grads = [[torch.ones_like(p) for p in G.parameters()], [3 * torch.ones_like(p) for p in G.parameters()]]
    meta.meta_update(grads)
    meta.meta_update(grads)
    state = meta.opt.state[next(iter(G.parameters()))]
    assert state["step"].item() == 2  # one optimiser across updates
    # Adam's first step moves every coordinate by lr * sign(mean grad) (= +1 here): theta decreases
    assert all((p < b).all() for p, b in zip(G.parameters(), before))


# ---------------------------------------------------------------- memory bank


def test_memory_bank_fifo_cap_and_global_class_ids():
    bank = recover.MemoryBank(cap=30)
    y = torch.arange(2).repeat_interleave(20)
    bank.add(torch.full((40, 1, 4, 4), 0.2), y, classes=[7, 3])
    bank.add(torch.full((40, 1, 4, 4), 0.8), y, classes=[7, 9])
    assert sorted(bank.images) == [3, 7, 9]
    assert bank.images[7].shape[0] == 30 and bank.images[3].shape[0] == 20
    # FIFO: of class 7's 40 images the 10 oldest (value 0.2) were dropped, newest 20 are 0.8
    assert (bank.images[7][:10] == recover.to_uint8(torch.tensor(0.2))).all()
    assert (bank.images[7][10:] == recover.to_uint8(torch.tensor(0.8))).all()
    assert len(bank) == 30 + 20 + 20


def test_memory_bank_tasks_have_relative_labels_and_mix_teachers():
    bank = recover.MemoryBank()
    y = torch.arange(5).repeat_interleave(20)
    for teacher, classes in enumerate([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14], [20, 21, 22, 23, 24]]):
        # encode the teacher in the pixel value, the class in a second pixel
        x = torch.zeros(100, 1, 2, 2)
        x[:, 0, 0, 0] = teacher / 10
        x[:, 0, 0, 1] = torch.tensor(classes, dtype=torch.float)[y] / 100
        bank.add(x, y, classes)
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = bank.sample_tasks(50, 5, 1, 15, g)
    assert x_s.shape == (50, 5, 1, 2, 2) and x_q.shape == (50, 75, 1, 2, 2)
    assert y_s[0].tolist() == [0, 1, 2, 3, 4] and y_q[0].tolist() == [i for i in range(5) for _ in range(15)]
    # support and query of a relative label are the same global class
    cls_s = (x_s[:, :, 0, 0, 1] * 100).round()
    cls_q = (x_q[:, :, 0, 0, 1] * 100).round().view(50, 5, 15)
    assert (cls_q == cls_s[:, :, None]).all()
    teachers_per_task = [len(set((x_s[t, :, 0, 0, 0] * 10).round().tolist())) for t in range(50)]
    assert max(teachers_per_task) > 1  # cross-task replay mixes teachers


def test_memory_bank_task_support_and_query_images_are_disjoint():
    """Every stored image is unique (its index is written into its pixels); within a task no support
    image may reappear among the queries (sampling without replacement within a class)."""
    bank = recover.MemoryBank()
    y = torch.arange(5).repeat_interleave(20)
    idx = torch.arange(100, dtype=torch.float)
    x = torch.stack([idx // 16, idx % 16], 1).view(100, 1, 1, 2) / 255  # exact in uint8
    bank.add(x, y, [0, 1, 2, 3, 4])
    x_s, _, x_q, _ = bank.sample_tasks(40, 5, 5, 15, torch.Generator().manual_seed(0))
    for s_, q_ in zip(x_s, x_q):
        ids_s = {tuple(v.tolist()) for v in s_.flatten(1)}
        ids_q = {tuple(v.tolist()) for v in q_.flatten(1)}
        assert len(ids_s) == 25 and len(ids_q) == 75 and not ids_s & ids_q


# ---------------------------------------------------------------- evaluation


def test_mean_ci95_is_1_96_std_over_sqrt_n():
    accs = torch.tensor([0.2, 0.4, 0.6, 0.8])
    mean, ci = maml.mean_ci95(accs)
    # population std of [20, 40, 60, 80] = sqrt(500) = 22.36; 1.96 * 22.36 / 2 = 21.91
    assert mean == pytest.approx(50.0)
    assert ci == pytest.approx(1.96 * math.sqrt(500) / 2)


def test_mean_ci95_in_float64_for_one_two_and_four_tasks():
    """The summary is computed in float64 (a float32 mean of 600 accuracies drifts in the 7th digit); one task
    has a zero-width interval; two tasks [0, 1]: mean 50, population std 50, CI 1.96 * 50 / sqrt(2)."""
    accs = torch.tensor([0.2, 0.4, 0.6, 0.8])  # float32, as the meta-test returns them
    mean, _ = maml.mean_ci95(accs)
    assert mean == pytest.approx(sum(float(a) * 100 for a in accs) / 4, rel=1e-12)
    assert maml.mean_ci95(torch.tensor([0.7], dtype=torch.float64)) == (pytest.approx(70.0), 0.0)
    mean2, ci2 = maml.mean_ci95([0.0, 1.0])
    assert mean2 == 50.0 and ci2 == pytest.approx(1.96 * 50 / math.sqrt(2))


def test_meta_test_adapts_with_the_given_learning_rate():
    """The meta-test protocol (paper §4) on one task: `steps` SGD steps at `lr` on the support set, then the
    query accuracy; against the steps taken by hand with autograd, at an lr far from the default."""
    torch.manual_seed(5)
    model = Conv4(5, 1, 16, track_running_stats=False)
    params = maml.detached_params(model)
    x_s, x_q = torch.rand(1, 5, 1, 16, 16), torch.rand(1, 15, 1, 16, 16)
    y_s, y_q = torch.arange(5)[None], torch.arange(5).repeat_interleave(3)[None]

    def by_hand(lr, steps=3):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(functional_call(model, p, (x_s[0],)), y_s[0]), list(p.values()))
            p = {k: (v - lr * gk).detach().requires_grad_() for (k, v), gk in zip(p.items(), grads)}
        return maml.accuracy(functional_call(model, p, (x_q[0],)), y_q[0]).item()

    lr = 2.0
    assert by_hand(lr) != by_hand(maml.INNER_LR)  # the test can tell the lr apart
    for vectorize in (False, True):
        got = maml.meta_test(model, params, x_s, y_s, x_q, y_q, steps=3, lr=lr, vectorize=vectorize)
        assert got.tolist() == [pytest.approx(by_hand(lr))]


# ---------------------------------------------------------------- found by the mutation sweep (models.py, recover.py)

import types  # noqa: E402

import numpy as np  # noqa: E402

import models  # noqa: E402


def naive_batch_norm(h, bn):
    """y = gamma (h - mu_B) / sqrt(sigma_B^2 + eps) + beta, statistics over (batch, H, W), from the definition."""
    mu = h.mean(dim=(0, 2, 3), keepdim=True)
    var = ((h - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return bn.weight.view(1, -1, 1, 1) * (h - mu) / torch.sqrt(var + BN_EPS) + bn.bias.view(1, -1, 1, 1)


def naive_basic_block(h, block, stride, projection):
    """He et al.'s basic block from F ops with `block`'s weights: relu(BN(conv3x3(relu(BN(conv3x3_s(h)))))
    + shortcut(h)), shortcut = BN(conv1x1_s(h)) if `projection` else h; no conv has a bias."""
    out = F.relu(naive_batch_norm(F.conv2d(h, block.conv1.weight, stride=stride, padding=1), block.bn1))
    out = naive_batch_norm(F.conv2d(out, block.conv2.weight, padding=1), block.bn2)
    if projection:
        h = naive_batch_norm(F.conv2d(h, block.shortcut[0].weight, stride=stride), block.shortcut[1])
    return F.relu(out + h)


def test_normalize_is_x_minus_mean_over_std_per_channel_in_float32():
    """Normalize (the teacher's input normalisation inside A(.) of Eq. (1)), by hand: mean = [0.25, 0.5],
    std = [0.5, 0.25] (exact in binary); a pixel 0.75 gives (0.75 - 0.25) / 0.5 = 1 in channel 0 and
    (0.75 - 0.5) / 0.25 = 1 in channel 1, a pixel 0 gives -0.5 and -2. Conv4 and the ResNets use the statistics
    they are given, and statistics in float64 (numpy) still give float32 buffers, so the float32 network runs."""
    x = torch.tensor([0.75, 0.0]).expand(1, 2, 1, 2)  # [1, 2, 1, 2]
    want = torch.tensor([[[[1.0, -0.5]], [[1.0, -2.0]]]])
    mean, std = np.array([0.25, 0.5]), np.array([0.5, 0.25])
    for m in (models.Normalize(mean, std), Conv4(in_channels=2, image_size=16, mean=mean, std=std).normalize,
              ResNet10(in_channels=2, mean=mean, std=std).normalize):
        assert m.mean.dtype == m.std.dtype == torch.float32
        assert torch.equal(m(x), want)
    assert Conv4(in_channels=2, image_size=16, mean=mean, std=std)(torch.rand(2, 2, 16, 16)).dtype == torch.float32


def test_batch_stat_norm_honours_a_non_default_eps_in_both_forms():
    """y = gamma (x - mu_B) / sqrt(sigma_B^2 + eps) + beta with the module's eps = 0.5 (not PyTorch's 1e-5): one
    channel x = [0, 2] has mu_B = 1, sigma_B^2 = 1, so y = [-1, 1] / sqrt(1.5), fused and elementary."""
    bn = BatchStatNorm2d(1, eps=0.5)
    x = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)
    want = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1) / math.sqrt(1.5)
    torch.testing.assert_close(bn(x), want)
    with elementary_batch_norm():
        torch.testing.assert_close(bn(x), want)


def test_conv4_matches_a_naive_forward_of_four_conv_bn_relu_pool_blocks():
    """Conv4 (paper §4) from F ops with the module's weights: normalise, then four times conv 3x3 (padding 1)
    -> batch-statistics BN -> ReLU -> max-pool 2x2, flatten, linear head; 20x20 -> 10 -> 5 -> 2 -> 1, so
    feature_dim = hidden. For both BatchNorm kinds (a teacher in train mode, the meta-learner)."""
    mean, std = [0.4, 0.6], [0.2, 0.3]
    x = torch.rand(4, 2, 20, 20)
    for track in (True, False):
        m = Conv4(num_classes=3, in_channels=2, image_size=20, mean=mean, std=std, hidden=6,
                  track_running_stats=track).train()
        h = (x - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1)
        for conv, bn, *_ in m.blocks:
            h = F.max_pool2d(F.relu(naive_batch_norm(F.conv2d(h, conv.weight, conv.bias, padding=1), bn)), 2)
        assert m.feature_dim == 6 and h.shape == (4, 6, 1, 1)
        torch.testing.assert_close(m.features(x), h.flatten(1))
        torch.testing.assert_close(m(x), F.linear(h.flatten(1), m.head.weight, m.head.bias))


def test_conv4_teacher_in_eval_mode_uses_running_statistics_in_every_block():
    """A teacher (track_running_stats=True) in eval mode normalises with running statistics in all four blocks:
    each sample's logits are independent of the rest of the batch (batch statistics in any block couple them)."""
    m = Conv4(5, 1, 16).eval()
    x = torch.rand(6, 1, 16, 16)
    torch.testing.assert_close(m(x)[:2], m(x[:2]))
    assert [k for k, _ in m.named_buffers() if k.endswith("running_mean")] == [
        f"blocks.{i}.1.running_mean" for i in range(4)]


def test_basic_block_projects_the_shortcut_when_stride_or_width_change():
    """Basic block (He et al. 2016) against the naive one: identity shortcut only for stride 1 and c_in = c_out;
    a width change alone, a stride alone, or both get the 1x1-conv + BN projection."""
    x = torch.rand(2, 4, 6, 6)
    for c_out, stride, projection in [(4, 1, False), (8, 1, True), (4, 2, True), (8, 2, True)]:
        block = models.BasicBlock(4, c_out, stride).train()
        assert (len(block.shortcut) > 0) == projection
        torch.testing.assert_close(block(x), naive_basic_block(x, block, stride, projection))


@pytest.mark.parametrize("make,blocks_per_stage", [(ResNet10, 1), (ResNet18, 2)])
def test_resnet_matches_a_naive_forward_with_the_papers_widths_strides_and_shortcuts(make, blocks_per_stage):
    """Few-shot ResNet (paper §4) from F ops with the module's weights: normalise; stem conv 3x3 (stride 1,
    padding 1, no bias) -> BN -> ReLU to 64 channels; stages of 64/128/256/512 channels whose first block has
    stride 2 (stages 2-4) and a projection shortcut, all other blocks stride 1 with identity; global average pool
    (feature_dim 512); linear head. A 16x16 input is 16, 16, 8, 4, 2 pixels wide after stem and stages."""
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    m = make(num_classes=4, in_channels=3, image_size=16, mean=mean, std=std).train()
    x = torch.rand(3, 3, 16, 16)
    h = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    h = F.relu(naive_batch_norm(F.conv2d(h, m.stem[0].weight, padding=1), m.stem[1]))
    assert h.shape == (3, 64, 16, 16)
    plan = [(width, 2 if (i > 0 and b == 0) else 1, 16 >> i)
            for i, width in enumerate((64, 128, 256, 512)) for b in range(blocks_per_stage)]
    assert len(m.layers) == len(plan)
    for block, (width, stride, size) in zip(m.layers, plan):
        h = naive_basic_block(h, block, stride, projection=stride == 2)
        assert h.shape == (3, width, size, size)
    feats = h.mean(dim=(2, 3))  # [3, 512]
    assert m.feature_dim == 512
    torch.testing.assert_close(m.features(x), feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m(x), F.linear(feats, m.head.weight, m.head.bias), rtol=1e-4, atol=1e-5)


def test_resnet_parameter_counts_are_those_of_the_standard_cifar_resnets():
    """No conv has a bias (each feeds a BN), 3x3 stem and block convs, 1x1 projections: counted layer by layer,
    ResNet-18 with a 5-way head has 11,171,397 parameters (the well-known 11,173,962 of the 10-way CIFAR
    ResNet-18, less 5 * 512 + 5 head weights) and ResNet-10 (one block per stage) 4,900,677."""
    def conv(c_in, c_out, k):
        return c_in * c_out * k * k

    def bn(c):
        return 2 * c

    def block(c_in, c_out):
        n = conv(c_in, c_out, 3) + bn(c_out) + conv(c_out, c_out, 3) + bn(c_out)
        return n + (conv(c_in, c_out, 1) + bn(c_out) if c_in != c_out else 0)

    stem, head = conv(3, 64, 3) + bn(64), 512 * 5 + 5
    r10 = stem + block(64, 64) + block(64, 128) + block(128, 256) + block(256, 512) + head
    r18 = r10 + block(64, 64) + block(128, 128) + block(256, 256) + block(512, 512)
    assert (r10, r18) == (4_900_677, 11_171_397)
    for make, want in ((ResNet10, r10), (ResNet18, r18)):
        assert sum(p.numel() for p in make().parameters()) == want


def test_constructor_defaults_are_the_papers_5_way_32x32_rgb_setting():
    """Defaults a user gets without arguments: 5-way on 32x32 RGB (paper §4, CIFAR-FS), Conv4 with 32 filters, the
    few-shot ResNet-18, the generator of supplement Table 1 (d_z = 256, nf = 64), and an identity normalisation
    (mean 0, std 1)."""
    x = torch.rand(2, 3, 32, 32)
    c = Conv4()
    assert c.arch == dict(num_classes=5, in_channels=3, image_size=32, mean=[0.0] * 3, std=[1.0] * 3, hidden=32,
                          track_running_stats=True)
    assert c.feature_dim == 32 * 2 * 2 and c(x).shape == (2, 5)
    r = models.ResNet()
    assert r.arch == dict(depth="resnet18", num_classes=5, in_channels=3, image_size=32, mean=[0.0] * 3,
                          std=[1.0] * 3)
    assert len(r.layers) == 8 and r.stem[0].in_channels == 3 and r.head.out_features == 5
    for m in (c, r):
        assert torch.equal(m.normalize(x), x)
    G = Generator()
    assert G.arch == dict(image_size=32, nc=3, d_z=256, nf=64)
    assert G(torch.randn(2, 256)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("arch,kwargs", [
    ("conv4", dict(num_classes=3, in_channels=1, image_size=20, mean=[0.4], std=[0.3], hidden=8,
                   track_running_stats=False)),
    ("conv4", dict(num_classes=4, in_channels=2, image_size=16, mean=[0.4, 0.5], std=[0.3, 0.2], hidden=8,
                   track_running_stats=True)),
    ("resnet10", dict(num_classes=3, in_channels=1, image_size=16, mean=[0.4], std=[0.3])),
    ("resnet18", dict(num_classes=4, in_channels=2, image_size=16, mean=[0.4, 0.5], std=[0.3, 0.2])),
])
def test_arch_kwargs_rebuild_the_same_network_through_build_model(arch, kwargs):
    """zoo.py saves `model.arch` and rebuilds with build_model(name, **arch): `arch` holds exactly the keyword
    arguments given (plus the ResNet depth), ResNet10/ResNet18 pass them on, and the rebuilt network loads the state
    dict strictly and computes the same logits."""
    m = models.build_model(arch, **kwargs)
    if arch == "conv4":
        assert type(m) is Conv4 and m.arch == kwargs
    else:
        assert type(m) is models.ResNet and m.arch == dict(depth=arch, **kwargs)
        assert len(m.layers) == {"resnet10": 4, "resnet18": 8}[arch]
        assert {"resnet10": ResNet10, "resnet18": ResNet18}[arch](**kwargs).arch == m.arch
    rebuilt = models.build_model(arch, **m.arch)
    rebuilt.load_state_dict(m.state_dict())
    x = torch.rand(3, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    torch.testing.assert_close(rebuilt.train()(x), m.train()(x))


def test_unknown_architecture_and_bad_generator_size_errors_say_what_was_expected():
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg'; expected one of \('conv4', 'resnet10', "
                                         r"'resnet18'\)"):
        models.build_model("vgg")
    with pytest.raises(ValueError, match="divisible by 4.*got 30"):
        Generator(image_size=30)


def test_generator_batchnorm_uses_batch_statistics_in_eval_mode_too():
    """Supplement Table 1's BNs keep no running statistics: the generator has no buffers, and eval mode gives the
    same images as train mode (batch statistics in both). Its `arch` rebuilds it."""
    G = Generator(SIZE, NC, d_z=12, nf=8)
    z = torch.randn(6, 12)
    assert len(list(G.buffers())) == 0
    x_train = G.train()(z)
    torch.testing.assert_close(G.eval()(z), x_train)
    assert G.arch == dict(image_size=SIZE, nc=NC, d_z=12, nf=8)
    rebuilt = Generator(**G.arch)
    rebuilt.load_state_dict(G.state_dict())
    torch.testing.assert_close(rebuilt(z), x_train)


def test_to_uint8_clamps_to_0_1_and_rounds_to_255_levels():
    """The memory bank's quantisation (what a PNG round trip does): clamp to [0, 1], times 255, round (half to
    even), uint8: -0.5 -> 0, 0.2 -> 51, 0.5 -> 127.5 -> 128, 0.6 -> 153, 1.5 -> 255."""
    x = torch.tensor([-0.5, 0.0, 0.2, 0.5, 0.6, 1.0, 1.5])
    q = recover.to_uint8(x)
    assert q.dtype == torch.uint8  # torch.equal alone would accept the same values in float
    assert torch.equal(q, torch.tensor([0, 0, 51, 128, 153, 255, 255], dtype=torch.uint8))


def test_augment_defaults_are_pad_4_and_the_flip():
    """A(.)'s defaults are the authors' RandomCrop(padding 4) + horizontal flip (free.py relies on pad's)."""
    x = torch.rand(16, 1, 6, 6)

    def g():
        return torch.Generator().manual_seed(0)

    assert torch.equal(recover.augment(x, generator=g()), recover.augment(x, 4, True, generator=g()))
    assert not torch.equal(recover.augment(x, generator=g()), recover.augment(x, 4, False, generator=g()))


def test_inversion_loss_is_ce_plus_lambda_adv_times_l_adv_with_the_papers_defaults():
    """Eq. (1) against a naive reference: L_G = CE(M(A(x)), Y) + lambda_adv * L_adv with
    L_adv = -mean_n KL(p_M || p_f) written from the definition. The meta-learner f is the teacher with halved
    weights, so every sample agrees (same argmax) and KL > 0. Defaults: A(.) with pad 4 and the flip, lambda_adv = 1
    (the same draws replayed from an equally seeded generator); lambda_adv = 0.5 halves the L_adv term."""
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    learner = copy.deepcopy(teacher)
    params = {k: 0.5 * v.detach() for k, v in teacher.named_parameters()}
    x, y = torch.rand(8, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def naive(lam):
        xa = recover.augment(x, 4, True, torch.Generator().manual_seed(3))
        t, f = teacher(xa), functional_call(learner, params, (xa,))
        assert (t.argmax(1) == f.argmax(1)).all()
        p, q = F.softmax(t, 1), F.softmax(f, 1)
        kl = (p * (p.log() - q.log())).sum(1).mean()
        ce = -F.log_softmax(t, 1)[torch.arange(8), y].mean()
        assert kl > 1e-3
        return ce - lam * kl

    got = recover.inversion_loss(teacher, x, y, (learner, params), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, naive(1.0))
    got = recover.inversion_loss(teacher, x, y, (learner, params), lambda_adv=0.5, pad=4, flip=True,
                                 generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, naive(0.5))


def test_recover_task_evaluates_eq1_with_l_adv_and_the_papers_a_at_every_step(tiny_zoo):
    """recover_task with a meta-learner and its defaults (A(.) with pad 4 and flip, lambda_adv = 1) against a hand
    loop over inversion_loss with those values written out, one seeded generator drawing Z and then every A(.):
    k = 2, so one Adam step (betas 0.5, 0.999) on (theta_G', Z), then the images and meta-gradient of the second
    evaluation. The meta-learner is the teacher with a halved head (it agrees, so L_adv != 0): without it the
    meta-gradient differs."""
    teacher = tiny_zoo[3]
    learner = copy.deepcopy(teacher)
    ml = (learner, {k: v.detach() * (0.5 if k.startswith("head") else 1.0) for k, v in learner.named_parameters()})
    G, n, lr = Generator(SIZE, NC, nf=8), 2, 0.01
    r = recover.recover_task(G, teacher, WAY, steps=2, n_per_class=n, lr=lr, meta_learner=ml,
                             generator=torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    G2 = copy.deepcopy(G)
    Z = torch.randn(WAY * n, G2.d_z, generator=g).requires_grad_()
    Y = torch.arange(WAY).repeat_interleave(n)
    theta = list(G2.parameters())
    opt = torch.optim.Adam(theta + [Z], lr=lr, betas=(0.5, 0.999))
    loss = recover.inversion_loss(teacher, G2(Z), Y, ml, lambda_adv=1.0, pad=4, flip=True, generator=g)
    for p, gp in zip(theta + [Z], torch.autograd.grad(loss, theta + [Z])):
        p.grad = gp
    opt.step()
    x = G2(Z)
    grads = torch.autograd.grad(recover.inversion_loss(teacher, x, Y, ml, lambda_adv=1.0, pad=4, flip=True,
                                                       generator=g), theta)
    torch.testing.assert_close(r.x, x.detach())
    for a, b in zip(r.meta_grad, grads):
        torch.testing.assert_close(a, b)
    plain = recover.recover_task(G, teacher, WAY, steps=2, n_per_class=n, lr=lr,
                                 generator=torch.Generator().manual_seed(3))
    assert any(not torch.allclose(a, b) for a, b in zip(plain.meta_grad, r.meta_grad))


def test_recovery_writes_no_gradient_into_the_teacher(tiny_zoo):
    """Eq. (1) is minimised over (theta_G', Z) alone: even a teacher whose parameters require grad ends a recovery
    without a .grad (nothing accumulates into M_i)."""
    teacher = copy.deepcopy(tiny_zoo[4]).requires_grad_(True)
    recover.recover_task(Generator(SIZE, NC, nf=8), teacher, WAY, steps=3, n_per_class=2, flip=False)
    assert all(p.grad is None for p in teacher.parameters())


def test_recovery_seconds_exclude_the_after_step_callback_which_sees_each_evaluation(tiny_zoo, monkeypatch):
    """`seconds` is the elapsed time less the time in after_step (experiments/probes.py traces with it), and
    after_step gets (step, images) of each of the k evaluations. A fake clock ticks 1 per reading and the
    callback advances it by 100: t0 = 1000; per step t_cb = c, then c + 101 after the callback (traced += 101);
    for k = 3 the final reading is 1000 + 1 + 3 * 102 = 1307 and traced = 303, so seconds = 1307 - 1000 - 303 = 4
    exactly."""
    clock = [1000.0]

    def perf_counter():
        clock[0] += 1.0
        return clock[0] - 1.0

    seen = []

    def after_step(step, x):
        seen.append((step, x))
        clock[0] += 100.0

    monkeypatch.setattr(recover, "time", types.SimpleNamespace(perf_counter=perf_counter))
    r = recover.recover_task(Generator(SIZE, NC, nf=8), tiny_zoo[4], WAY, steps=3, n_per_class=2, lr=0.01,
                             flip=False, after_step=after_step)
    assert r.seconds == 4.0
    assert [s for s, _ in seen] == [1, 2, 3]
    assert torch.equal(seen[-1][1], r.x) and not torch.equal(seen[0][1], r.x)


def test_scratch_baseline_is_a_fresh_generator_recovered_for_steps_without_meta_gradient(tiny_zoo):
    """recover_from_scratch = Generator(image_size, nc, nf) initialised from one 62-bit seed drawn from `generator`,
    then `steps` evaluations of Eq. (1) by recover_task without a meta-gradient, the process's RNG left as it was;
    without a generator, Generator(...) from the global RNG, then recover_task."""
    teacher, kw = tiny_zoo[5], dict(n_per_class=2, flip=False)
    seen, state = [], torch.get_rng_state()
    r = recover.recover_from_scratch(teacher, WAY, steps=2, image_size=SIZE, nc=NC, nf=8,
                                     generator=torch.Generator().manual_seed(4),
                                     after_step=lambda s, x: seen.append(s), **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert seen == [1, 2] and r.meta_grad is None
    g = torch.Generator().manual_seed(4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 62, (), generator=g)))
        G = Generator(SIZE, NC, nf=8)
    ref = recover.recover_task(G, teacher, WAY, steps=2, meta_grad=False, generator=g, **kw)
    assert torch.equal(r.x, ref.x)

    torch.manual_seed(6)
    r = recover.recover_from_scratch(teacher, WAY, steps=2, image_size=SIZE, nc=NC, nf=8, **kw)
    torch.manual_seed(6)
    ref = recover.recover_task(Generator(SIZE, NC, nf=8), teacher, WAY, steps=2, meta_grad=False, **kw)
    assert torch.equal(r.x, ref.x)


def test_scratch_baseline_defaults_to_32x32_rgb_images():
    """recover_from_scratch's image_size / nc defaults match the 32x32 RGB teachers of the default setting."""
    r = recover.recover_from_scratch(Conv4(WAY, 3, 32).eval(), WAY, steps=1, nf=8, n_per_class=1, flip=False)
    assert r.x.shape == (WAY, 3, 32, 32)


def test_meta_generator_state_dict_round_trip_restores_theta_G_and_adam():
    """Resuming (free.py --resume) continues the same run: loading into a MetaGenerator over a differently
    initialised generator gives identical theta_G, and the next meta-update (which depends on Adam's moments and
    step count) gives identical theta_G again."""
    g = torch.Generator().manual_seed(0)

    def grads_for(G):
        return [[torch.randn(p.shape, generator=g) for p in G.parameters()] for _ in range(2)]

    meta = recover.MetaGenerator(Generator(SIZE, NC, nf=8))
    for _ in range(2):
        meta.meta_update(grads_for(meta.G))
    torch.manual_seed(9)
    other = recover.MetaGenerator(Generator(SIZE, NC, nf=8))
    other.load_state_dict(copy.deepcopy(meta.state_dict()))
    for a, b in zip(meta.G.parameters(), other.G.parameters()):
        assert torch.equal(a, b)
    grads = grads_for(meta.G)
    meta.meta_update(grads)
    other.meta_update(grads)
    for a, b in zip(meta.G.parameters(), other.G.parameters()):
        assert torch.equal(a, b)


def test_memory_bank_state_dict_round_trip_restores_images_cap_and_samples():
    """A reloaded memory bank holds the same images under the same class ids, applies the same FIFO cap to new
    images, and draws the same replay tasks from an equally seeded generator."""
    bank = recover.MemoryBank(cap=12)
    y = torch.arange(3).repeat_interleave(10)
    bank.add(torch.rand(30, 1, 2, 2), y, classes=[4, 8, 15])
    bank.add(torch.rand(30, 1, 2, 2), y, classes=[8, 16, 23])
    restored = recover.MemoryBank(cap=1000)
    restored.load_state_dict(copy.deepcopy(bank.state_dict()))
    assert restored.cap == 12 and restored.classes() == bank.classes() == [4, 8, 15, 16, 23]
    assert all(torch.equal(restored.images[c], bank.images[c]) for c in bank.images)
    a = bank.sample_tasks(3, 4, 2, 3, torch.Generator().manual_seed(1))
    b = restored.sample_tasks(3, 4, 2, 3, torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    more = torch.rand(10, 1, 2, 2)
    for m in (bank, restored):
        m.add(more, torch.zeros(10, dtype=torch.long), classes=[4])
    assert restored.images[4].shape[0] == 12 and torch.equal(restored.images[4], bank.images[4])


def test_memory_bank_pool_is_the_classes_with_shot_plus_query_images():
    """A class enters the replay pool with >= shot + query images (for classes(), one image is enough); a
    `way`-way task is possible with exactly `way` such classes and not with one fewer, and sampling then says why."""
    bank = recover.MemoryBank()
    for c, n in zip([0, 1, 2, 3, 4, 9], [6, 6, 6, 6, 5, 1]):
        bank.add(torch.rand(n, 1, 2, 2), torch.zeros(n, dtype=torch.long), classes=[c])
    assert bank.classes() == [0, 1, 2, 3, 4, 9] and bank.classes(min_images=6) == [0, 1, 2, 3]
    assert bank.can_sample(4, 1, 5) and not bank.can_sample(5, 1, 5) and bank.can_sample(5, 1, 4)
    with pytest.raises(ValueError, match="memory bank has 4 classes with >= 6 images; a 5-way task needs 5"):
        bank.sample_tasks(1, 5, 1, 5, torch.Generator().manual_seed(0))


def test_memory_bank_samples_whole_classes_of_unequal_size_exactly_from_its_generator():
    """Classes of 6..10 images (unequal sizes, so each class's offset in the flat bank matters); each image stores
    its class and its index as exact uint8 levels, plus a white pixel. In every task each relative label's
    shot + query images are distinct images of one stored class, the labels' classes are distinct, the pixels read
    back exactly (uint8 / 255: white is 1.0), and the draw depends on the generator alone, not on the global RNG."""
    sizes = [6, 7, 8, 9, 10]
    bank = recover.MemoryBank()
    for c, n in enumerate(sizes):
        x = torch.stack([torch.full((n,), 10.0 * (c + 1)), torch.arange(n, dtype=torch.float),
                         torch.full((n,), 255.0)], 1) / 255  # [n, 3]: class level, index, white
        bank.add(x.view(n, 1, 1, 3), torch.zeros(n, dtype=torch.long), classes=[c])

    def draw(global_seed):
        torch.manual_seed(global_seed)
        return bank.sample_tasks(30, 5, 2, 3, torch.Generator().manual_seed(0))

    x_s, y_s, x_q, y_q = tasks = draw(1)
    assert all(torch.equal(u, v) for u, v in zip(draw(2), tasks))
    for x in (x_s, x_q):
        assert torch.equal(x, (x * 255).round() / 255) and (x[..., 2] == 1.0).all()
    orders = set()
    for t in range(30):
        classes = []
        for j in range(5):
            levels = torch.cat([x_s[t, 2 * j:2 * j + 2], x_q[t, 3 * j:3 * j + 3]]).view(5, 3) * 255
            cls = set((levels[:, 0].round() / 10 - 1).tolist())
            idx = set(levels[:, 1].round().tolist())
            assert len(cls) == 1
            c = int(cls.pop())
            assert len(idx) == 5 and max(idx) < sizes[c]
            classes.append(c)
        assert sorted(classes) == [0, 1, 2, 3, 4]
        orders.add(tuple(classes))
    assert len(orders) > 1


# ---------------------------------------------------------------- device placement, without a GPU


class MetaValues(torch.overrides.TorchFunctionMode):
    """PyTorch's `meta` device computes shapes without data, and refuses most operations that mix it with CPU
    tensors: a run on `meta` fails wherever a tensor is made without the run's device, as it would on CUDA. The
    few host reads a run makes have no value on `meta`: .item(), .tolist() and .cpu() read zeros here, and a
    check such as `if torch.isfinite(loss).all()` passes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu) and args[0].is_meta:
            zeros = torch.zeros(args[0].shape, dtype=args[0].dtype)
            return zeros if func is torch.Tensor.cpu else func(zeros)
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True
        return func(*args, **kwargs)


@pytest.fixture
def on_meta():
    """The `meta` device, with host reads of its tensors as MetaValues says; masks on `meta` keep every row
    (their shape depends on data that `meta` does not have)."""
    import torch.fx.experimental._config as fx_config
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True), MetaValues():
        yield torch.device("meta")


def test_every_equation_keeps_its_tensors_on_the_run_device(on_meta):
    """Eq. (1) with L_adv, FIVE's meta-update, the memory bank, a MAML meta-batch, Eq. (3) and the meta-test,
    with every model on `meta`: every result is on `meta`, and any tensor made on the CPU would have raised."""
    dev, g = on_meta, torch.Generator().manual_seed(0)
    teacher = Conv4(5, 3, 16, [0.5] * 3, [0.25] * 3).to(dev).eval().requires_grad_(False)
    learner = Conv4(5, 3, 16, [0.5] * 3, [0.25] * 3, track_running_stats=False).to(dev)
    meta_gen = recover.MetaGenerator(Generator(16, 3, nf=4).to(dev))
    tasks = [recover.recover_task(meta_gen.G, teacher, 5, steps=2, n_per_class=2, generator=g,
                                  meta_learner=(learner, maml.detached_params(learner))) for _ in range(2)]
    tasks.append(recover.recover_from_scratch(teacher, 5, steps=1, image_size=16, nf=4, n_per_class=2, generator=g))
    meta_gen.meta_update([r.meta_grad for r in tasks[:2]])
    assert all(t.device == dev for r in tasks for t in (r.x, r.y, r.teacher_logits))
    assert all(p.device == dev for p in meta_gen.G.parameters())
    bank = recover.MemoryBank(device=dev)
    for r in tasks:
        bank.add(r.x, r.y, [0, 1, 2, 3, 4])
    resumed = recover.MemoryBank(device=dev)  # a resumed run's bank: its state as torch.load gives it, on the CPU
    state = bank.state_dict()
    resumed.load_state_dict(dict(state, images={c: x.cpu() for c, x in state["images"].items()}))
    assert all(x.device == dev for x in resumed.images.values())
    batch = bank.sample_tasks(2, 5, 1, 1, g)
    loss, acc = maml.maml_meta_batch_loss(learner, dict(learner.named_parameters()), *batch, 1, 0.01, False, False)
    loss.backward()
    kd_tasks = [(recover.augment(r.x, generator=g), r.y, r.teacher_logits) for r in tasks]
    for optimizer in maml.THETA_TILDE_OPTIMIZERS:
        meta_grad, kd = maml.align_meta_gradient(learner, maml.detached_params(learner), kd_tasks, optimizer=optimizer)
        maml.apply_meta_gradient(learner, torch.optim.Adam(learner.parameters()), meta_grad)
    accs = maml.meta_test(learner, maml.detached_params(learner), *batch, steps=2)
    assert all(t.device == dev for t in (*batch, loss, acc, kd, accs, *learner.parameters()))
