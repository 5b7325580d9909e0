"""BELL (Better gEneralisation via meta-Learner) and evaluation: the MAML inner loop and outer
loss, knowledge distillation, Eq. (3)'s implicit gradient alignment, and the meta-test protocol.

Paper: Wei et al., CVPR 2024, §3.3 and Eq. (3); MAML: Finn et al., ICML 2017.

Fast weights are plain dicts `{name: tensor}` evaluated with `torch.func.functional_call`; the
inner loop is a pure function (`inner_adapt`) that `map_tasks` maps (torch.func.vmap, or a loop) over
the tasks of a meta-batch or of a meta-test chunk. `first_order` is the single switch between MAML and FOMAML.

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


def map_tasks(task_fn, *batched, vectorize):
    """Maps a per-task function over the leading (task) dimension of `batched` and stacks its outputs
    (a tensor or a tuple of tensors): with torch.func.vmap, or with `vectorize=False` a plain loop (the
    naive reference)."""
    if vectorize:
        with elementary_batch_norm():  # F.batch_norm's second-order gradient under vmap is wrong (models.py)
            return vmap(task_fn)(*batched)
    out = [task_fn(*task) for task in zip(*batched)]
    if isinstance(out[0], tuple):
        return tuple(torch.stack(o) for o in zip(*out))
    return torch.stack(out)


def maml_meta_batch_loss(model, params, x_s, y_s, x_q, y_q, steps=TRAIN_INNER_STEPS, lr=INNER_LR,
                         first_order=False, vectorize=True):
    """MAML outer objective over a meta-batch of T tasks: (1/T) sum_t L(T_t; theta'_t).

    x_s [T, N*K, C, H, W], y_s [T, N*K], x_q [T, N*Q, C, H, W], y_q [T, N*Q]; the tasks are mapped
    by map_tasks (vmap, or a loop without `vectorize`)."""

    def task(xs, ys, xq, yq):
        return maml_task_loss(model, params, xs, ys, xq, yq, steps, lr, first_order)

    losses, accs = map_tasks(task, x_s, y_s, x_q, y_q, vectorize=vectorize)  # [T], [T]
    return losses.mean(), accs.mean()


def kd_loss(logits, teacher_logits, tau=TAU):
    """Knowledge distillation of BELL (paper §3.3), `logits` = f_theta(x):

        L_KD(T_i; theta) = tau^2 * KL( softmax(M_i(x)/tau) || softmax(f_theta(x)/tau) )

    averaged over the batch; a true KL between log-probabilities."""
    log_p_f = F.log_softmax(logits / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / tau, dim=-1)
    # authors' code feeds probabilities to F.kl_div; we give it log-probabilities on both sides
    return tau ** 2 * F.kl_div(log_p_f, log_p_teacher, reduction="batchmean", log_target=True)


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

    Adam moves every coordinate by about alpha per step whatever the gradient's size, so dividing by
    alpha as for SGD would hand the outer Adam a unit-size direction per coordinate that swamps the
    replay gradients in its second-moment estimate (how the scale was chosen: experiments/RESULTS.md,
    'How the quick counts were chosen').
    The authors' code multiplies by a bare 67 instead."""
    return 1.0 / (alpha * n_tasks) if optimizer == "sgd" else 1.0 / n_tasks


ADAM_BETAS = (0.9, 0.999)  # beta_1, beta_2 of the Adam on theta_tilde (torch.optim.Adam's defaults)
ADAM_EPS = 1e-8  # eps of the Adam on theta_tilde (torch.optim.Adam's default)


def task_loss_and_grad(model, theta_tilde, task, tau=TAU, hard_labels=False):
    """L(T_j; theta_tilde) (distill_loss) and its gradient grad L(T_j; theta_tilde) as a dict, both detached."""
    p = {k: v.detach().requires_grad_() for k, v in theta_tilde.items()}
    loss = distill_loss(model, p, task, tau, hard_labels)
    return loss.detach(), dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


def theta_tilde_sgd(model, theta, tasks, alpha=ALPHA, tau=TAU, hard_labels=False):
    """Eq. (3) with SGD steps on theta_tilde (Lemma 1's setting), through T_1..T_B in sequence:

        theta_tilde_0 = theta,  theta_tilde_j = theta_tilde_{j-1} - alpha * grad L(T_j; theta_tilde_{j-1})
        theta - theta_tilde_B = sum_j alpha * grad L(T_j; theta_tilde_{j-1})

    Returns (theta - theta_tilde_B as a dict, the B losses L(T_j; theta_tilde_{j-1}))."""
    theta_tilde, delta, losses = dict(theta), {k: torch.zeros_like(v) for k, v in theta.items()}, []
    for task in tasks:
        loss, g = task_loss_and_grad(model, theta_tilde, task, tau, hard_labels)  # L(T_j; theta_tilde_{j-1}), g_j
        for k in theta:
            step = alpha * g[k]  # alpha * g_j
            theta_tilde[k] = theta_tilde[k] - step  # theta_tilde_j = theta_tilde_{j-1} - alpha * g_j
            delta[k] = delta[k] + step  # theta - theta_tilde_j, summed as taken: no float32 cancellation
        losses.append(loss)
    return delta, torch.stack(losses)


def theta_tilde_adam(model, theta, tasks, alpha=ALPHA, tau=TAU, hard_labels=False, betas=ADAM_BETAS, eps=ADAM_EPS):
    """Eq. (3) with a fresh Adam on theta_tilde, through T_1..T_B in sequence (the supplement: "the cloned
    meta-learner parameters are optimized ... with an inner loop learning rate set at 0.001"; the authors' code):

        g_j = grad L(T_j; theta_tilde_{j-1})
        m_j = beta_1 m_{j-1} + (1 - beta_1) g_j,    m_hat_j = m_j / (1 - beta_1^j)
        v_j = beta_2 v_{j-1} + (1 - beta_2) g_j^2,  v_hat_j = v_j / (1 - beta_2^j)
        theta_tilde_j = theta_tilde_{j-1} - alpha * m_hat_j / (sqrt(v_hat_j) + eps)

    from theta_tilde_0 = theta, m_0 = v_0 = 0. Returns (theta - theta_tilde_B as a dict, the B losses)."""
    (b1, b2), zeros = betas, {k: torch.zeros_like(v) for k, v in theta.items()}
    theta_tilde, delta, m, v, losses = dict(theta), dict(zeros), dict(zeros), dict(zeros), []
    for j, task in enumerate(tasks, start=1):
        loss, g = task_loss_and_grad(model, theta_tilde, task, tau, hard_labels)  # L(T_j; theta_tilde_{j-1}), g_j
        for k in theta:
            m[k] = b1 * m[k] + (1 - b1) * g[k]  # m_j = beta_1 m_{j-1} + (1 - beta_1) g_j
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2  # v_j = beta_2 v_{j-1} + (1 - beta_2) g_j^2
            m_hat, v_hat = m[k] / (1 - b1 ** j), v[k] / (1 - b2 ** j)  # m_j / (1 - beta_1^j), v_j / (1 - beta_2^j)
            step = alpha * m_hat / (v_hat.sqrt() + eps)  # alpha * m_hat_j / (sqrt(v_hat_j) + eps)
            theta_tilde[k] = theta_tilde[k] - step  # theta_tilde_j = theta_tilde_{j-1} - step
            delta[k] = delta[k] + step  # theta - theta_tilde_j, summed as taken
        losses.append(loss)
    return delta, torch.stack(losses)


THETA_TILDE_STEPS = {"adam": theta_tilde_adam, "sgd": theta_tilde_sgd}  # who steps theta_tilde in Eq. (3)
THETA_TILDE_OPTIMIZERS = tuple(THETA_TILDE_STEPS)  # supplement/authors' Adam, or Lemma 1's SGD


def theta_tilde_no_align(steps, model, theta, tasks, **kwargs):
    """The `--no-align` ablation of Eq. (3): every task's step starts from theta with a fresh optimizer
    (independent KD steps), theta - theta_tilde = sum_j (theta - theta_tilde after T_j alone)."""
    single = [steps(model, theta, [task], **kwargs) for task in tasks]  # (theta - theta_tilde, [1]) per task
    return {k: sum(delta[k] for delta, _ in single) for k in theta}, torch.cat([losses for _, losses in single])


def align_meta_gradient(model, params, tasks, alpha=ALPHA, tau=TAU, hard_labels=False, align=True, optimizer="adam"):
    """Implicit gradient alignment, Eq. (3): theta_tilde <- theta steps through the B tasks in sequence
    (theta_tilde_adam or theta_tilde_sgd, by `optimizer`), and the meta-gradient is

        g = reptile_scale * (theta - theta_tilde)

    With SGD, g holds -alpha * grad(grad L_i . grad L_j) terms that raise the alignment of the tasks'
    gradients (Lemma 1, Theorem 1; their tests). `align=False` is `--no-align` (theta_tilde_no_align).
    Each task is (x, y, teacher_logits). Returns (g as a dict, mean task loss)."""
    if optimizer not in THETA_TILDE_STEPS:
        raise ValueError(f"theta_tilde optimizer must be one of {THETA_TILDE_OPTIMIZERS}, got {optimizer!r}")
    steps, theta = THETA_TILDE_STEPS[optimizer], {k: v.detach() for k, v in params.items()}
    kwargs = dict(alpha=alpha, tau=tau, hard_labels=hard_labels)
    if align:
        delta, losses = steps(model, theta, tasks, **kwargs)  # theta - theta_tilde
    else:
        delta, losses = theta_tilde_no_align(steps, model, theta, tasks, **kwargs)
    scale = reptile_scale(alpha, len(tasks), optimizer)
    return {k: scale * d for k, d in delta.items()}, losses.mean()  # g = reptile_scale * (theta - theta_tilde)


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
    adaptation (tasks mapped by map_tasks); returns [T]."""
    params = {k: v.detach() for k, v in params.items()}

    def task(xs, ys, xq, yq):
        return adapt_and_score(model, params, xs, ys, xq, yq, steps, lr)

    with torch.no_grad():  # torch.func.grad still differentiates inside; no outer graph is kept
        return map_tasks(task, x_s, y_s, x_q, y_q, vectorize=vectorize)


def mean_ci95(accs):
    """Meta-test summary: mean accuracy and the 95% CI half-width 1.96 * std / sqrt(n), in percent.
    std is the population std (numpy's default), as in the few-shot literature's evaluation code."""
    a = torch.as_tensor(accs, dtype=torch.float64) * 100.0
    n = a.numel()
    std = a.std(unbiased=False) if n > 1 else torch.zeros((), dtype=torch.float64)
    return a.mean().item(), (CI_Z * std / math.sqrt(n)).item()
