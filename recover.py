"""FIVE (Faster Inversion via meta-generator): recover each teacher's task in k evaluations of Eq. (1)
from a meta-learned generator, meta-update the generator (first-order), and keep every recovered task in a
memory bank for cross-task replay.

Paper: Wei et al., CVPR 2024, §3.2, Eq. (1), supplement Table 1 and implementation details.

As in the authors' code: the k-th evaluation of Eq. (1) gives both the recovered images and the
meta-gradient (no extra pass), and the meta-learner inside L_adv is a fixed target (no gradient to the
images through it).

Differences from the authors' code:
- the meta-generator's Adam persists across rounds (theirs is recreated every round);
- all B recovered tasks of a round enter the memory bank (theirs stores only the last teacher's);
- L_adv is a true KL on log-probabilities (theirs feeds probabilities to F.kl_div);
- recovered images stay in memory as uint8 tensors (theirs writes PNGs; the quantisation is the same);
- no "best image" selection (theirs has one that never selects): every recovered image is kept by
  default, as the paper describes the memory bank; free.py's `--bank-filter agree` keeps only the
  images the teacher labels as Y (ours; `python experiments/bench.py seeds` measures it).
"""
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from models import NF, Generator

# k (paper §3.2): k = 5 is the number of evaluations of Eq. (1) per teacher, with k - 1 Adam steps on
# (theta_G', Z) between them; the k-th evaluation gives the task and the meta-gradient.
K = 5
GEN_LR = 1e-3  # lr of the inner Adam on (theta_G', Z) and of the meta-generator's Adam (supplement: 1e-3)
GEN_BETAS = (0.5, 0.999)  # Adam betas of the generator optimisers (authors' code default)
IMAGES_PER_CLASS = 20  # rows of Z per class: 100 for a 5-way teacher (authors' code default)
LAMBDA_ADV = 1.0  # lambda_adv of Eq. (1) (authors' code default)
AUG_PAD = 4  # A(.): random-crop padding (authors' code: RandomCrop padding 4)
BANK_CAP = 400  # memory-bank FIFO cap per class: 20 batches of 20 images (authors' code default)
SCRATCH_STEPS = 200  # evaluations of Eq. (1) from a fresh generator (BiDf-MKD), the speed-up baseline (paper §4)


def augment(x, pad=AUG_PAD, flip=True, generator=None):
    """A(.) of Eq. (1), differentiable: random crop of each image after zero-padding by `pad`,
    then a random horizontal flip (if `flip`). x [B, C, H, W] -> [B, C, H, W]. Random draws come
    from `generator` (a CPU torch.Generator) or, without one, the RNG of x's device (no host round trip).
    zoo.py trains teachers with it."""
    B, C, H, W = x.shape
    where = "cpu" if generator is not None else x.device
    padded = F.pad(x, [pad, pad, pad, pad])  # [B, C, H+2p, W+2p]
    di = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=where).to(x.device)
    dj = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=where).to(x.device)
    rows = (di[:, None] + torch.arange(H, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (dj[:, None] + torch.arange(W, device=x.device))[:, None, :]  # [B, 1, W]
    b = torch.arange(B, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)  # [B, C, H, W]
    if flip:
        mirror = (torch.rand(B, generator=generator, device=where) < 0.5).to(x.device)
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out


def adversarial_loss(teacher_logits, learner_logits):
    """L_adv of Eq. (1), with M_i the teacher and f_theta the meta-learner (`learner_logits` = f_theta(x)):

        L_adv = - mean_n[ 1(argmax f_theta(x_n) = argmax M_i(x_n)) * KL(p_M(x_n) || p_f(x_n)) ]

    Minimising L_G therefore maximises KL(p_M || p_f) on the samples where the meta-learner's label agrees
    with the teacher's: it pushes the recovered samples toward ones that the meta-learner still labels as the
    teacher does but whose predictive distribution differs most from the teacher's, i.e. harder for the
    meta-learner."""
    agree = (learner_logits.argmax(1) == teacher_logits.argmax(1)).float()  # 1(argmax f_theta(x_n) = argmax M_i(x_n))
    kl = F.kl_div(F.log_softmax(learner_logits, 1), F.log_softmax(teacher_logits, 1),
                  reduction="none", log_target=True).sum(1)  # KL(p_M(x_n) || p_f(x_n)) per sample
    return -(agree * kl).mean()  # - mean_n[ 1(.) * KL ]


def inversion_loss(teacher, x, y, meta_learner=None, lambda_adv=LAMBDA_ADV, pad=AUG_PAD, flip=True, generator=None):
    """Eq. (1):  L_G = CE(M_i(A(G(Z; theta_G'))), Y) + lambda_adv * L_adv

    x = G(Z; theta_G') in [0, 1]; the teacher normalises its own input. `meta_learner` is f_theta of
    L_adv as (module, detached params), or None in
    warm-up, which drops L_adv. A(.)'s draws come from `generator` if given (augment)."""
    xa = augment(x, pad, flip, generator)  # A(G(Z; theta_G'))
    teacher_logits = teacher(xa)  # M_i(A(x))
    loss = F.cross_entropy(teacher_logits, y)  # CE(M_i(A(x)), Y)
    if meta_learner is not None and lambda_adv > 0:
        model, params = meta_learner
        with torch.no_grad():  # as the authors' code: f_theta(x) is a fixed target, no gradient to x through it
            learner_logits = functional_call(model, params, (xa,))  # f_theta(A(x))
        loss = loss + lambda_adv * adversarial_loss(teacher_logits, learner_logits)  # + lambda_adv * L_adv
    return loss


@dataclass
class RecoveredTask:
    """One recovered task T_i of FIVE: the output of Eq. (1)'s k-step minimisation."""

    x: torch.Tensor  # [way * n, C, H, W] recovered images in [0, 1]
    y: torch.Tensor  # [way * n] the teacher's local labels Y
    teacher_logits: torch.Tensor  # [way * n, way] M_i(x), soft labels for KD
    teacher_acc: float  # M_i's accuracy on x (the weak yardstick; see experiments/probes.py)
    meta_grad: list  # first-order gradient of L_G at the adapted theta_G' (None if not asked)
    seconds: float


def labels_Y(way, n_per_class, device):
    """Y of Eq. (1): n_per_class rows per class, [way * n_per_class] = [0,...,0, 1,...,1, ...]."""
    return torch.arange(way, device=device).repeat_interleave(n_per_class)


def recover_task(theta_G, teacher, way, steps=K, n_per_class=IMAGES_PER_CLASS, lr=GEN_LR,
                 betas=GEN_BETAS, meta_learner=None, lambda_adv=LAMBDA_ADV, pad=AUG_PAD, flip=True,
                 meta_grad=True, after_step=None, generator=None):
    """Recover teacher M_i's task: theta_G' <- theta_G, a fresh Z ~ N(0, I), then k = `steps` evaluations
    of Eq. (1). k = 5 is the number of evaluations of Eq. (1) per teacher, with k - 1 Adam steps on
    (theta_G', Z) between them; the k-th evaluation gives the task and the meta-gradient: its images
    x = G(Z; theta_G') (returned with their labels Y and the teacher's soft labels) and its gradient
    w.r.t. theta_G', the first-order meta-gradient (FOMAML). `meta_learner`: f_theta of L_adv
    (inversion_loss). `generator`, a CPU torch.Generator, if given draws Z (on the CPU, then moved to the
    device) and every augmentation of Eq. (1), so the result depends on its seed and not on the process's
    RNG; without one both come from the device's RNG. `after_step(step, x)`, if given, sees each
    evaluation's images (experiments/probes.py traces quality with it; its own time is not counted in `seconds`)."""
    t0 = time.perf_counter()
    device = next(theta_G.parameters()).device
    G = copy.deepcopy(theta_G)  # theta_G' = theta_G
    where = "cpu" if generator is not None else device
    Z = torch.randn(way * n_per_class, G.d_z, generator=generator, device=where).to(device).requires_grad_()
    Y = labels_Y(way, n_per_class, device)
    params = list(G.parameters())
    opt = torch.optim.Adam(params + [Z], lr=lr, betas=betas)
    traced, grads = 0.0, None
    x = None
    for step in range(1, steps + 1):
        x = G(Z)  # [way * n, C, H, W]
        loss = inversion_loss(teacher, x, Y, meta_learner, lambda_adv, pad, flip, generator)
        if step < steps:
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params + [Z])
            opt.step()
        elif meta_grad:
            # as the authors' code: the k-th gradient is the meta-gradient, and x the task (no extra L_G pass)
            grads = [g.detach() for g in torch.autograd.grad(loss, params)]
        if after_step is not None:
            t_cb = time.perf_counter()
            after_step(step, x.detach())
            traced += time.perf_counter() - t_cb
    if x is None:  # steps = 0: the meta-generator's images as they are
        with torch.no_grad():
            x = G(Z)
    x = x.detach()
    with torch.no_grad():
        t_logits = teacher(x)
    acc = (t_logits.argmax(1) == Y).float().mean().item()
    return RecoveredTask(x, Y, t_logits, acc, grads, time.perf_counter() - t0 - traced)


def recover_from_scratch(teacher, way, steps=SCRATCH_STEPS, image_size=32, nc=3, nf=NF, **kwargs):
    """Baseline inversion (BiDf-MKD style): a freshly initialised generator and `steps` evaluations of
    Eq. (1). The speed-up claim compares this with `recover_task` from the meta-generator. kwargs go to
    recover_task; a `generator` there also draws the fresh generator's initialisation."""
    device = next(teacher.parameters()).device
    generator = kwargs.get("generator")
    with torch.random.fork_rng(devices=[], enabled=generator is not None):  # the global CPU RNG is left as it was
        if generator is not None:
            torch.default_generator.manual_seed(int(torch.randint(2 ** 62, (), generator=generator)))
        G = Generator(image_size=image_size, nc=nc, nf=nf).to(device)
    return recover_task(G, teacher, way, steps=steps, meta_grad=False, **kwargs)


class MetaGenerator:
    """theta_G and its meta-update: after the B teachers of a round, theta_G takes one step of a
    persistent Adam with the mean of the first-order meta-gradients (FOMAML)."""

    def __init__(self, generator, lr=GEN_LR, betas=GEN_BETAS):
        self.G = generator
        # persistent across rounds; authors' code recreates this Adam every round
        self.opt = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)

    def meta_update(self, meta_grads):
        """Meta-update of FIVE (first-order MAML over the B teachers of a round, Eq. (1) losses):
        theta_G <- Adam(theta_G, (1/B) sum_i grad L_G(T_i; theta_G'_i))."""
        self.opt.zero_grad(set_to_none=True)
        for j, p in enumerate(self.G.parameters()):
            p.grad = torch.stack([g[j] for g in meta_grads]).mean(0)
        self.opt.step()

    def state_dict(self):
        return {"G": self.G.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.G.load_state_dict(state["G"])
        self.opt.load_state_dict(state["opt"])


def to_uint8(x):
    """[0, 1] float -> uint8 for the memory bank (the quantisation a PNG round trip would apply)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class MemoryBank:
    """Memory bank of FIVE (paper §3.2): recovered images keyed by global class id (from the teacher's
    label list), FIFO-capped per class. Samples N-way K-shot Q-query tasks whose classes may come
    from different teachers (cross-task replay), relabelled 0..N-1."""

    def __init__(self, cap=BANK_CAP, device="cpu"):
        self.cap = cap
        self.device = torch.device(device)  # where the images live: the run's device (no host-device copy per meta-batch)
        self.images = {}  # global class id -> uint8 [n <= cap, C, H, W], oldest first

    def add(self, x, y, classes):
        """Memory bank (paper §3.2): store recovered images x [M, C, H, W] with local labels y under global
        ids classes[y]."""
        x, y = to_uint8(x.detach()).to(self.device), y.to(self.device)
        for local, cls in enumerate(classes):
            new = x[y == local]
            old = self.images.get(int(cls))
            merged = new if old is None else torch.cat([old, new])
            self.images[int(cls)] = merged[-self.cap:]  # FIFO: drop the oldest beyond the cap

    def __len__(self):
        return sum(v.shape[0] for v in self.images.values())

    def classes(self, min_images=1):
        """Global class ids holding at least `min_images` images (cross-task replay pool)."""
        return sorted(c for c, v in self.images.items() if v.shape[0] >= min_images)

    def can_sample(self, way, shot, query):
        """Whether `way` classes hold at least shot + query images each (cross-task replay, paper §3.3)."""
        return len(self.classes(min_images=shot + query)) >= way

    def sample_tasks(self, n_tasks, way, shot, query, generator):
        """Cross-task replay tasks (paper §3.3): T tasks: x_s [T, way*shot, C, H, W], y_s [T, way*shot],
        x_q [T, way*query, ...], y_q; classes drawn without replacement from the whole bank, images
        without replacement within a class; labels relative, 0..way-1. Indices are drawn on the CPU
        (from `generator`) and gathered in one step on the bank's device; float images in [0, 1] there."""
        pool = self.classes(min_images=shot + query)
        if len(pool) < way:
            raise ValueError(f"memory bank has {len(pool)} classes with >= {shot + query} images; "
                             f"a {way}-way task needs {way}")
        sizes = [self.images[c].shape[0] for c in pool]
        start = torch.tensor([0] + sizes).cumsum(0).tolist()  # offset of each class in the flat bank
        s_idx, q_idx = [], []
        for _ in range(n_tasks):
            chosen = torch.randperm(len(pool), generator=generator)[:way].tolist()
            for c in chosen:
                idx = torch.randperm(sizes[c], generator=generator)[:shot + query] + start[c]
                s_idx.append(idx[:shot])
                q_idx.append(idx[shot:])
        flat = torch.cat([self.images[c] for c in pool])  # [sum of sizes, C, H, W]
        shape = flat.shape[1:]

        def gather(idx, per_class):
            return flat[torch.cat(idx).to(self.device)].float().div_(255).view(n_tasks, way * per_class, *shape)

        y_s = torch.arange(way, device=self.device).repeat_interleave(shot).expand(n_tasks, -1)
        y_q = torch.arange(way, device=self.device).repeat_interleave(query).expand(n_tasks, -1)
        return gather(s_idx, shot), y_s, gather(q_idx, query), y_q

    def state_dict(self):
        return {"cap": self.cap, "images": dict(self.images)}

    def load_state_dict(self, state):
        self.cap = state["cap"]
        self.images = {c: v.to(self.device) for c, v in state["images"].items()}
