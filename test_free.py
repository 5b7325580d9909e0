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
    # tau^2 * KL at temperature tau, checked against the definition
    s, tau = torch.randn(8, 5), 2.0
    p, q = F.softmax(t / tau, 1), F.softmax(s / tau, 1)
    expected = tau ** 2 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(maml.kd_loss(s, t, tau), expected)


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
    initial generator without meta-training (4 recoveries each, same Z seeds)."""
    k, n, lr, nf = 5, 10, 0.01, 8
    meta = recover.MetaGenerator(Generator(SIZE, NC, nf=nf), lr=lr)
    fresh = copy.deepcopy(meta.G)
    for _ in range(20):
        meta.meta_update([recover.recover_task(meta.G, t, WAY, k, n, lr, flip=False).meta_grad for t in tiny_zoo[:6]])

    def recover_unseen(G):
        torch.manual_seed(5)
        runs = [recover.recover_task(G, tiny_zoo[6], WAY, k, n, lr, flip=False, meta_grad=False) for _ in range(4)]
        return (sum(r.teacher_acc for r in runs) / 4,
                sum(F.cross_entropy(r.teacher_logits, r.y).item() for r in runs) / 4)

    (acc_meta, loss_meta), (acc_fresh, loss_fresh) = recover_unseen(meta.G), recover_unseen(fresh)
    assert acc_meta > acc_fresh + 0.08 and loss_meta < loss_fresh - 0.1, (acc_meta, acc_fresh, loss_meta, loss_fresh)


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
