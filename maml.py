"""BELL (Better gEneralisation via meta-Learner) and evaluation: the MAML inner loop and outer
loss, knowledge distillation, Eq. (3)'s implicit gradient alignment, and the meta-test protocol.

Paper: Wei et al., CVPR 2024, §3.3 and Eq. (3); MAML: Finn et al., ICML 2017.

Fast weights are plain dicts `{name: tensor}` evaluated with `torch.func.functional_call`; the
inner loop is a pure function (`inner_adapt`) that `torch.func.vmap` maps over the tasks of a
meta-batch or of a meta-test chunk. `first_order` is the single switch between MAML and FOMAML.

Differences from the authors' code:
- KD uses a true KL on log-probabilities (`log_target=True`); theirs feeds probabilities to F.kl_div.
- Eq. (3)'s outer step scales theta - theta_tilde by a documented `reptile_scale`; theirs by a bare 67.
- the meta-test reports the 95% CI over 600 tasks of a fixed seed, and model selection happens on the
  meta-validation split (theirs picks the best of many evaluations on the test split).
"""
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from models import elementary_batch_norm

INNER_LR = 0.01  # MAML inner SGD learning rate, train and test (authors' code default)
TRAIN_INNER_STEPS = 5  # MAML inner steps during replay (authors' code default)
TEST_INNER_STEPS = 10  # adaptation steps at meta-test (authors' code default)
ALPHA = 1e-3  # alpha, inner learning rate of Eq. (3) (supplement: 0.001)
TAU = 1.0  # tau, KD temperature (authors' code: 1, a plain softmax)
CI_Z = 1.96  # z-value of a two-sided 95% confidence interval


def accuracy(logits, y):
    """Fraction of rows whose argmax equals the label (MAML train accuracy, meta-test accuracy)."""
    return (logits.argmax(dim=-1) == y).float().mean()


def detached_params(model):
    """theta as a detached dict {name: tensor}: the clone theta_tilde = theta of Eq. (3), or frozen
    meta-learner weights for L_adv of Eq. (1) and for the meta-test."""
    return {k: v.detach() for k, v in model.named_parameters()}


def inner_adapt(model, params, x, y, steps=TRAIN_INNER_STEPS, lr=INNER_LR, first_order=False):
    """MAML inner loop (Finn et al. 2017, Eq. 1 there), repeated `steps` times:

        theta' <- theta' - lr * grad_theta' CE(f_theta'(x_s), y_s)

    With `first_order=True` the gradient is detached, so the outer gradient drops the Hessian
    term (FOMAML). Pure over `params`, so it runs under `torch.func.vmap`."""

    def support_loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    for _ in range(steps):
        g = grad(support_loss)(params)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        params = {k: params[k] - lr * g[k] for k in params}
    return params


def maml_task_loss(model, params, x_s, y_s, x_q, y_q, steps=TRAIN_INNER_STEPS, lr=INNER_LR,
                   first_order=False):
    """One task's MAML outer loss: L(f_{theta'}(x_q), y_q) with theta' = inner_adapt(theta, support).
    Returns (query loss, query accuracy)."""
    adapted = inner_adapt(model, params, x_s, y_s, steps, lr, first_order)
    logits = functional_call(model, adapted, (x_q,))
    return F.cross_entropy(logits, y_q), accuracy(logits, y_q)


def maml_meta_batch_loss(model, params, x_s, y_s, x_q, y_q, steps=TRAIN_INNER_STEPS, lr=INNER_LR,
                         first_order=False, vectorize=True):
    """MAML outer objective over a meta-batch of T tasks: (1/T) sum_t L(T_t; theta'_t).

    x_s [T, N*K, C, H, W], y_s [T, N*K], x_q [T, N*Q, C, H, W], y_q [T, N*Q]. With `vectorize`
    the per-task function is mapped with vmap; otherwise a plain loop (the naive reference)."""

    def task(xs, ys, xq, yq):
        return maml_task_loss(model, params, xs, ys, xq, yq, steps, lr, first_order)

    if vectorize:
        with elementary_batch_norm():  # F.batch_norm's second-order gradient under vmap is wrong (models.py)
            losses, accs = vmap(task)(x_s, y_s, x_q, y_q)
    else:
        out = [task(*t) for t in zip(x_s, y_s, x_q, y_q)]
        losses = torch.stack([o[0] for o in out])
        accs = torch.stack([o[1] for o in out])
    return losses.mean(), accs.mean()


def kd_loss(student_logits, teacher_logits, tau=TAU):
    """Knowledge distillation of BELL (paper §3.3):

        L_KD(T_i; theta) = tau^2 * KL( softmax(M_i(x)/tau) || softmax(f_theta(x)/tau) )

    averaged over the batch; a true KL between log-probabilities."""
    log_p_student = F.log_softmax(student_logits / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / tau, dim=-1)
    # authors' code feeds probabilities to F.kl_div; we give it log-probabilities on both sides
    return tau ** 2 * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def distill_loss(model, params, task, tau=TAU, hard_labels=False):
    """L(T_j; theta) on one recovered task (x, y, teacher_logits): KD by default, or cross-entropy
    with the recovered hard labels y (the `--hard-labels` ablation, supplement Table 2)."""
    x, y, teacher_logits = task
    logits = functional_call(model, params, (x,))
    if hard_labels:
        return F.cross_entropy(logits, y)
    return kd_loss(logits, teacher_logits, tau)


def reptile_scale(alpha, n_tasks, optimizer="sgd"):
    """The documented scale of Eq. (3)'s outer step, which turns theta - theta_tilde into the outer
    Adam's gradient (an Adam shared with MAML replay, as in the authors' code):

        sgd:  (theta - theta_tilde) / (alpha * B)  = the mean of the B task gradients along the path;
        adam: (theta - theta_tilde) / B            = the mean step, Reptile's outer gradient (Nichol et al. 2018).

    Adam moves every coordinate by about alpha per step whatever the gradient's size, so dividing
    by alpha as for SGD would hand the outer Adam a unit-size direction per coordinate that swamps
    the replay gradients in its second-moment estimate (measured on Omniglot: replay accuracy fell to
    chance, meta-validation 44.3 against 57.7 at round 20, seed 0). The authors' code multiplies by a
    bare 67 instead."""
    return 1.0 / (alpha * n_tasks) if optimizer == "sgd" else 1.0 / n_tasks


THETA_TILDE_OPTIMIZERS = ("adam", "sgd")  # who steps theta_tilde in Eq. (3): supplement/authors' Adam, or Lemma 1's SGD


def align_meta_gradient(model, params, tasks, alpha=ALPHA, tau=TAU, hard_labels=False, align=True, optimizer="adam"):
    """Implicit gradient alignment, Eq. (3):

        theta_tilde <- theta;  for j = 1..B:  theta_tilde <- theta_tilde - alpha * step(grad L_KD(T_j; theta_tilde))
        meta-gradient g = reptile_scale * (theta - theta_tilde)

    `optimizer` takes the steps: "adam" (the supplement: "the cloned meta-learner parameters are
    optimized ... with an inner loop learning rate set at 0.001"; the authors' code uses a fresh
    Adam each round) or "sgd" (step = the gradient itself: Lemma 1's setting). With SGD the
    sequential steps make g contain -alpha * grad(grad L_i . grad L_j) terms (Lemma 1 / Theorem 1),
    i.e. the update also raises the alignment of different tasks' gradients.
    With SGD the steps alpha * grad are summed as they are taken: equal to theta - theta_tilde in exact
    arithmetic, but free of the float32 cancellation of subtracting two parameters that differ by ~alpha * grad.
    `align=False` is the `--no-align` ablation: every task's step starts from theta with a fresh
    optimizer (independent KD steps), so for SGD g is the plain averaged KD gradient.
    Each task is (x, y, teacher_logits). Returns (g as a dict, mean task loss)."""
    if optimizer not in THETA_TILDE_OPTIMIZERS:
        raise ValueError(f"theta_tilde optimizer must be one of {THETA_TILDE_OPTIMIZERS}, got {optimizer!r}")
    theta = {k: v.detach() for k, v in params.items()}

    def fresh_clone():
        clone = {k: v.clone().requires_grad_() for k, v in theta.items()}  # theta_tilde = theta
        opt = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        return clone, opt(clone.values(), lr=alpha)

    theta_tilde, opt = fresh_clone()
    losses, total = [], {k: torch.zeros_like(v) for k, v in theta.items()}  # theta - theta_tilde, summed over paths
    for task in tasks:
        if not align:
            theta_tilde, opt = fresh_clone()  # independent: every step starts from theta
        loss = distill_loss(model, theta_tilde, task, tau, hard_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=list(theta_tilde.values()))
        if optimizer == "sgd":  # the step SGD is about to take, alpha * grad, summed exactly (docstring)
            total = {k: total[k] + alpha * theta_tilde[k].grad for k in theta}
        opt.step()
        losses.append(loss.detach())
        if optimizer == "adam" and not align:
            total = {k: total[k] + theta[k] - theta_tilde[k].detach() for k in theta}
    if optimizer == "adam" and align:
        total = {k: theta[k] - theta_tilde[k].detach() for k in theta}
    scale = reptile_scale(alpha, len(tasks), optimizer)
    return {k: scale * v for k, v in total.items()}, torch.stack(losses).mean()


def apply_meta_gradient(model, optimizer, meta_grad):
    """The outer step of Eq. (3): the outer Adam takes (theta - theta_tilde) * reptile_scale as theta's gradient."""
    optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.grad = meta_grad[name].clone()
    optimizer.step()


def adapt_and_score(model, params, x_s, y_s, x_q, y_q, steps=TEST_INNER_STEPS, lr=INNER_LR):
    """Meta-test protocol (paper §4) on one task: adapt `steps` SGD steps on the support set, return query accuracy."""
    adapted = inner_adapt(model, params, x_s, y_s, steps, lr, first_order=True)
    return accuracy(functional_call(model, adapted, (x_q,)), y_q)


def meta_test(model, params, x_s, y_s, x_q, y_q, steps=TEST_INNER_STEPS, lr=INNER_LR,
              vectorize=True):
    """Meta-test protocol (paper §4): query accuracy of each task in a chunk [T, ...] after test-time
    adaptation; returns [T]."""
    params = {k: v.detach() for k, v in params.items()}

    def task(xs, ys, xq, yq):
        return adapt_and_score(model, params, xs, ys, xq, yq, steps, lr)

    with torch.no_grad():  # torch.func.grad still differentiates inside; no outer graph is kept
        if vectorize:
            with elementary_batch_norm():
                return vmap(task)(x_s, y_s, x_q, y_q)
        return torch.stack([task(*t) for t in zip(x_s, y_s, x_q, y_q)])


def mean_ci95(accs):
    """Meta-test summary: mean accuracy and the 95% CI half-width 1.96 * std / sqrt(n), in percent.
    std is the population std (numpy's default), as in the few-shot literature's evaluation code."""
    a = torch.as_tensor(accs, dtype=torch.float64) * 100.0
    n = a.numel()
    std = a.std(unbiased=False) if n > 1 else torch.zeros((), dtype=torch.float64)
    return a.mean().item(), (CI_Z * std / math.sqrt(n)).item()
