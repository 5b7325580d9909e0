"""Networks of FREE: the Conv4 meta-learner and teachers, few-shot ResNet-10/18 teachers, and the
meta-generator of supplement Table 1.

Paper: Wei et al., "FREE: Faster and Better Data-Free Meta-Learning", CVPR 2024, §4 (backbones) and supplement Table 1 (generator).

Every network takes images in [0, 1] and applies its own input normalisation (buffers `mean`,
`std`), so recovered images (a Sigmoid output) and real images are fed the same way, and the
teacher's normalisation inside A(·) of Eq. (1) is part of the teacher.

All modules work with `torch.func.functional_call(model, params, x)` over a params dict: the MAML
inner loop never edits modules. The meta-learner's BatchNorm keeps no running statistics
(`track_running_stats=False`, batch statistics always, as in MAML), which is what lets
`torch.func.vmap` run many tasks at once.

Differences from the authors' code:
- the multi-architecture zoo builds one module object per teacher (theirs loads four teachers into one).
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV4_FILTERS = 32  # Conv4 width (paper §4: Conv4 with 32 filters per block)
RESNET_WIDTHS = (64, 128, 256, 512)  # few-shot ResNet stage widths (paper §4 multi-architecture setting)
RESNET_BLOCKS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}  # basic blocks per stage
D_Z = 256  # d_z, latent size of the generator (supplement Table 1)
NF = 64  # nf, generator base width (supplement Table 1)
LEAKY_SLOPE = 0.2  # LeakyReLU slope (supplement Table 1)


class Normalize(nn.Module):
    """x -> (x - mean) / std, per channel: the teacher's input normalisation inside A(.) of Eq. (1)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


BN_EPS = 1e-5  # BatchNorm epsilon (PyTorch's default)


class BatchStatNorm2d(nn.Module):
    """BatchNorm with batch statistics only (MAML's meta-learner):

        y = gamma * (x - mu_B) / sqrt(sigma_B^2 + eps) + beta,  mu_B, sigma_B^2 over (batch, H, W)

    Same parameters as nn.BatchNorm2d(track_running_stats=False). Computed by the fused F.batch_norm, except
    inside `elementary_batch_norm()`, which maml.py enters around torch.func.vmap: in torch 2.13 the
    second-order gradient of F.batch_norm under vmap is wrong (caught by
    test_vmapped_meta_batch_matches_per_task_loop), and the elementary ops differentiate correctly."""

    elementary = False  # class-wide: True inside elementary_batch_norm()

    def __init__(self, channels, eps=BN_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        if not BatchStatNorm2d.elementary:
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        mu = x.mean(dim=(0, 2, 3), keepdim=True)  # [1, C, 1, 1]
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)  # [1, C, 1, 1]
        x_hat = (x - mu) / torch.sqrt(var + self.eps)
        return self.weight.view(1, -1, 1, 1) * x_hat + self.bias.view(1, -1, 1, 1)


@contextlib.contextmanager
def elementary_batch_norm():
    """Within this block BatchStatNorm2d computes its formula in elementary ops (for torch.func.vmap)."""
    before, BatchStatNorm2d.elementary = BatchStatNorm2d.elementary, True
    try:
        yield
    finally:
        BatchStatNorm2d.elementary = before


def conv_block(c_in, c_out, track_running_stats):
    """One Conv4 block (paper §4; Vinyals et al. 2016): Conv 3x3 (padding 1) -> BatchNorm -> ReLU -> MaxPool 2x2."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out) if track_running_stats else BatchStatNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """Conv4 (paper §4): four [Conv 3x3, 32 filters -> BN -> ReLU -> MaxPool 2x2] blocks, then a
    linear head. Works for any image size: 28 -> 1x1, 32 -> 2x2, 84 -> 5x5 spatial features.

    `track_running_stats=False` (the meta-learner) makes BatchNorm use batch statistics in both
    train and eval mode, as MAML does; teachers keep running statistics (`True`)."""

    def __init__(self, num_classes=5, in_channels=3, image_size=32, mean=None, std=None,
                 hidden=CONV4_FILTERS, track_running_stats=True):
        super().__init__()
        mean = list(mean) if mean is not None else [0.0] * in_channels
        std = list(std) if std is not None else [1.0] * in_channels
        # keyword arguments that rebuild this module (saved in checkpoints)
        self.arch = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                         mean=mean, std=std, hidden=hidden, track_running_stats=track_running_stats)
        self.normalize = Normalize(mean, std)
        self.blocks = nn.Sequential(
            conv_block(in_channels, hidden, track_running_stats),
            conv_block(hidden, hidden, track_running_stats),
            conv_block(hidden, hidden, track_running_stats),
            conv_block(hidden, hidden, track_running_stats),
        )
        s = image_size
        for _ in range(4):
            s //= 2  # MaxPool 2x2 floors odd sizes: 84 -> 42 -> 21 -> 10 -> 5
        self.feature_dim = hidden * s * s
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x):
        """Penultimate features, [B, hidden * s' * s'] (linear CKA, supplement Figure 1)."""
        return self.blocks(self.normalize(x)).flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with BN, identity or 1x1-conv shortcut."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Few-shot ResNet (paper §4 multi-architecture setting): 3x3 stem, four stages of basic blocks of 64/128/256/512 channels
    (strides 1, 2, 2, 2), global average pool, linear head."""

    def __init__(self, depth="resnet18", num_classes=5, in_channels=3, image_size=32, mean=None,
                 std=None):
        super().__init__()
        mean = list(mean) if mean is not None else [0.0] * in_channels
        std = list(std) if std is not None else [1.0] * in_channels
        self.arch = dict(depth=depth, num_classes=num_classes, in_channels=in_channels,
                         image_size=image_size, mean=mean, std=std)
        self.normalize = Normalize(mean, std)
        w0 = RESNET_WIDTHS[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(w0), nn.ReLU())
        layers, c_in = [], w0
        for i, (width, n_blocks) in enumerate(zip(RESNET_WIDTHS, RESNET_BLOCKS[depth])):
            for b in range(n_blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlock(c_in, width, stride))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.head = nn.Linear(c_in, num_classes)

    def features(self, x):
        """Penultimate features after global average pooling, [B, 512] (linear CKA, supplement Figure 1)."""
        return self.layers(self.stem(self.normalize(x))).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def ResNet10(**kwargs):
    """Few-shot ResNet-10, [1, 1, 1, 1] basic blocks (paper §4, multi-architecture zoo)."""
    return ResNet("resnet10", **kwargs)


def ResNet18(**kwargs):
    """Few-shot ResNet-18, [2, 2, 2, 2] basic blocks (paper §4, multi-architecture zoo)."""
    return ResNet("resnet18", **kwargs)


ARCHS = ("conv4", "resnet10", "resnet18")


def build_model(arch, **kwargs):
    """Build a classifier by name: 'conv4', 'resnet10' or 'resnet18' (paper §4)."""
    if arch == "conv4":
        return Conv4(**kwargs)
    if arch in RESNET_BLOCKS:
        kwargs.pop("depth", None)
        return ResNet(arch, **kwargs)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


class Generator(nn.Module):
    """Meta-generator G(z; theta_G), supplement Table 1:

        z in R^{d_z} -> FC -> reshape [2nf, s/4, s/4] -> BN -> Upsample x2
          -> Conv(2nf, 2nf, 3, 1, 1) -> BN -> LeakyReLU(0.2) -> Upsample x2
          -> Conv(2nf, nf, 3, 1, 1) -> BN -> LeakyReLU(0.2) -> Conv(nf, nc, 3, 1, 1) -> Sigmoid

    BatchNorm always uses batch statistics (a generator is only ever run on a whole batch Z)."""

    def __init__(self, image_size=32, nc=3, d_z=D_Z, nf=NF):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"Generator needs an image size divisible by 4 (Table 1 starts at "
                             f"s/4); got {image_size}")
        self.arch = dict(image_size=image_size, nc=nc, d_z=d_z, nf=nf)
        self.d_z, self.init_size = d_z, image_size // 4
        self.fc = nn.Linear(d_z, 2 * nf * self.init_size ** 2)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * nf, track_running_stats=False),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * nf, 2 * nf, 3, 1, 1),
            nn.BatchNorm2d(2 * nf, track_running_stats=False),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * nf, nf, 3, 1, 1),
            nn.BatchNorm2d(nf, track_running_stats=False),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(nf, nc, 3, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, z):
        h = self.fc(z)  # [B, 2nf * (s/4)^2]
        h = h.view(z.shape[0], -1, self.init_size, self.init_size)  # [B, 2nf, s/4, s/4]
        return self.net(h)  # [B, nc, s, s], in (0, 1)
