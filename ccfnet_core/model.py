"""CCF-Net and its plain-ResNet baseline, one model family in one file (CCFNET.md, "Network").

Trunk: ResNet stem + layer1..layer3 (stride 16). Head: 1x1 to 256, multi-scale context (dilated-convolution
context block + pyramid pooling), a bottleneck, and a 1x1 conv to 44 maps: 11 heatmaps, 11 y-offsets,
11 x-offsets, 11 abnormality logits. The baseline is the full ResNet (layer4, stride 32) with one 1x1 conv.
Builders register by name in a registry that refuses duplicates. A pair (`r18-msc-pair`) is two such networks read
as one: points from a localiser, abnormality from a classifier, each trained at its own loss weights; an ensemble
(`r18-msc-ens3`) adds classifiers whose logits are averaged. Any of them + `-graded` adds the patch grader
(`ccfnet_core.grader`), a small CNN that grades a patch of the slice around each found point (`-graded2`:
the mean of two graders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccfnet_core.grader import PatchGrader
from ccfnet_core.refiner import PointRefiner
from ccfnet_core.structures import DISC_INDICES, NUM_STRUCTURES

OUTPUT_CHANNELS = 4 * NUM_STRUCTURES
BN_MOMENTUM = 0.1


class HeadOutput(NamedTuple):
    """The four groups of output maps, each (N, 11, h, w)."""

    heatmaps: Tensor
    offset_y: Tensor
    offset_x: Tensor
    logits: Tensor


def split_output(maps: Tensor) -> HeadOutput:
    """Split the 44-channel output into heatmaps, y-offsets, x-offsets and logits (channel order fixed)."""
    k = NUM_STRUCTURES
    return HeadOutput(maps[:, :k], maps[:, k : 2 * k], maps[:, 2 * k : 3 * k], maps[:, 3 * k :])


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1), with a 1x1 projection when the width changes."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width_out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, width_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width_out, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        if downsample is None and (stride != 1 or inplanes != width_out):
            downsample = _projection(inplanes, width_out, stride)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


Block = type[BasicBlock] | type[Bottleneck]


def _projection(inplanes: int, outplanes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(outplanes, momentum=BN_MOMENTUM),
    )


class ContextBlock(nn.Module):
    """Dense atrous context (CE-Net DAC shape) with weights shared across the four branches.

    out = x + relu(D1 x) + relu(P D3 x) + relu(P D3 D1 x) + relu(P D5 D3 D1 x)

    `reuse_branches` computes D1 x and D3 D1 x once (the same output, 1.81 GMAC less at 512). With it off the
    block evaluates the formula term by term as the reference code does; the paper's MAC figures count that.
    """

    def __init__(self, channels: int, reuse_branches: bool = True):
        super().__init__()
        self.reuse_branches = reuse_branches
        self.d1 = nn.Conv2d(channels, channels, 3, dilation=1, padding=1)
        self.d3 = nn.Conv2d(channels, channels, 3, dilation=3, padding=3)
        self.d5 = nn.Conv2d(channels, channels, 3, dilation=5, padding=5)
        self.p = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.reuse_branches:
            return (
                x
                + F.relu(self.d1(x))
                + F.relu(self.p(self.d3(x)))
                + F.relu(self.p(self.d3(self.d1(x))))
                + F.relu(self.p(self.d5(self.d3(self.d1(x)))))
            )
        d1 = self.d1(x)
        d3d1 = self.d3(d1)
        return (
            x
            + F.relu(d1)
            + F.relu(self.p(self.d3(x)))
            + F.relu(self.p(d3d1))
            + F.relu(self.p(self.d5(d3d1)))
        )


class PyramidPooling(nn.Module):
    """Max-pool at 2, 4, 8; one shared 1x1 conv to a single map each; upsample back; concatenate with x."""

    scales = (2, 4, 8)

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(self.conv(F.max_pool2d(x, s, s)), size=size, mode="bilinear", align_corners=True)
            for s in self.scales
        ]
        return torch.cat([*pooled, x], dim=1)


class MSCHead(nn.Module):
    """Multi-scale context head: context block, pyramid pooling, bottleneck (259 -> 64 -> 256), 1x1 to 44."""

    def __init__(self, channels: int = 256, out_channels: int = OUTPUT_CHANNELS):
        super().__init__()
        self.context = ContextBlock(channels)
        self.pyramid = PyramidPooling(channels)
        pyramid_channels = channels + len(PyramidPooling.scales)
        self.bottleneck = Bottleneck(pyramid_channels, channels // Bottleneck.expansion)
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.bottleneck(self.pyramid(self.context(x))))


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one registered architecture from another."""

    name: str
    block: Block
    layers: tuple[int, ...]
    msc: bool
    stride: int

    @property
    def trunk_channels(self) -> int:
        return 64 * 2 ** (len(self.layers) - 1) * self.block.expansion


class CCFNet(nn.Module):
    """ResNet trunk with either the MSC head (layers 1-3, stride 16) or a 1x1 head (layers 1-4, stride 32)."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        self.stride = spec.stride
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layers = nn.Sequential(
            *[
                self._make_layer(spec.block, 64 * 2**i, n, stride=1 if i == 0 else 2)
                for i, n in enumerate(spec.layers)
            ]
        )
        self.head: nn.Module
        self.reduce: nn.Module
        if spec.msc:
            self.reduce = nn.Conv2d(spec.trunk_channels, 256, 1)
            self.head = MSCHead(256)
        else:
            self.reduce = nn.Identity()
            self.head = nn.Conv2d(spec.trunk_channels, OUTPUT_CHANNELS, 1)
        self._init_weights()

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _projection(self.inplanes, planes * block.expansion, stride)
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """Convs N(0, 0.001) with zero bias, BN weight 1 / bias 0 (CCFNET.md, Init)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.reduce(self.layers(x))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 44, H/stride, W/stride)."""
        return self.forward_head(self.forward_features(x))


class PairedCCFNet(nn.Module):
    """CCF-Nets of one architecture read as one 44-map output: heatmaps and offsets from `localiser`, logits from
    `classifier` (with `extra_classifiers`, the mean of all classifiers' logits; with `localiser_logit_share`, a
    weighted mean of those and the localiser's).

    Why: trained from scratch, one network trades localisation for classification through the weight of its BCE
    terms (docs/model.md); a pair keeps the best of each weight. The localiser's own logits are a second opinion
    on the grade at no extra cost, so the pair can average them in (`PAIR_LOGITS`), and further classifiers
    (another seed) make an ensemble for the grade (`<arch>-ens<n>`, n networks in all). The paper's network is
    unchanged, only run several times. Pairs and ensembles are assembled from trained checkpoints
    (`ccfnet_core.pair`), not trained as one; the share is a buffer, so it is saved with the weights and covered
    by their digest. A pair has no `extra_classifiers` weights, so its state dict is the same as before they were.
    `extra_localisers` (another seed of the localiser's recipe, `<arch>-loc2`) are averaged with the localiser,
    all 44 maps: the heatmaps, the offsets and the logits the localiser's share reads.
    """

    localiser_logit_share: Tensor

    def __init__(
        self,
        localiser: CCFNet,
        classifier: CCFNet,
        localiser_logit_share: float = 0.0,
        extra_classifiers: Sequence[CCFNet] = (),
        extra_localisers: Sequence[CCFNet] = (),
    ):
        super().__init__()
        for other in (classifier, *extra_classifiers, *extra_localisers):
            if localiser.spec != other.spec:
                raise ValueError(f"a pair needs one architecture, not {localiser.spec.name} + {other.spec.name}")
        if not 0.0 <= localiser_logit_share < 1.0:
            raise ValueError(f"the localiser's logit share must be in [0, 1), not {localiser_logit_share}")
        self.localiser = localiser
        self.classifier = classifier
        self.extra_classifiers = nn.ModuleList(extra_classifiers)
        self.extra_localisers = nn.ModuleList(extra_localisers)
        self.spec = localiser.spec
        self.stride = localiser.stride
        self.register_buffer("localiser_logit_share", torch.tensor(float(localiser_logit_share)))

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, 44, h, w): the localiser's 33 point maps, then the 11 logits (see the class)."""
        located = self.localiser(x)
        for extra in self.extra_localisers:
            located = located + extra(x)
        located = located / (1 + len(self.extra_localisers))
        points = located[:, : 3 * NUM_STRUCTURES]
        logits = self.classifier(x)[:, 3 * NUM_STRUCTURES :]
        for extra in self.extra_classifiers:
            logits = logits + extra(x)[:, 3 * NUM_STRUCTURES :]
        logits = logits / (1 + len(self.extra_classifiers))
        share = self.localiser_logit_share.to(logits.dtype)  # 0 gives the classifiers' logits exactly
        logits = (1 - share) * logits + share * located[:, 3 * NUM_STRUCTURES :]
        return torch.cat([points, logits], dim=1)


# How a pair's 11 logits are made: "classifier" = the classifiers' (their mean, if several); "mean" = the mean of
# every network's, the localiser's included. The value is the localiser's share given the number of networks.
PAIR_LOGITS: dict[str, Callable[[int], float]] = {
    "classifier": lambda networks: 0.0,
    "mean": lambda networks: 1 / networks,
}


class GradedCCFNet(nn.Module):
    """A CCF-Net (single, pair or ensemble) whose grade is re-read by patch graders at the points it finds.

    `forward` is the network's own (the 44 maps: heatmaps, offsets and its logits), so decoding and heatmaps are
    unchanged; after decoding, `grade` turns the network's logits and the graders' mean logit at the points into one
    P(abnormal): logit = share x network + (1 - share) x graders. Why: the heatmap network localises well but
    grades from coarse shared features; the grader sees each structure at the slice's own resolution
    (docs/model.md, "Patch grader"). The share is a buffer, so it is saved with the weights and in their digest.
    """

    network_logit_share: Tensor

    def __init__(
        self,
        network: CCFNet | PairedCCFNet,
        graders: Sequence[PatchGrader],
        network_logit_share: float = 0.0,
        grade_grader: PatchGrader | None = None,
    ):
        super().__init__()
        if not 0.0 <= network_logit_share < 1.0:
            raise ValueError(f"the network's logit share must be in [0, 1), not {network_logit_share}")
        if not graders:
            raise ValueError("a graded network needs at least one grader")
        if grade_grader is not None and grade_grader.classes < 2:
            raise ValueError("a grade grader has one logit per disc class, not one logit")
        self.network = network
        self.graders = nn.ModuleList(graders)
        self.grade_grader = grade_grader
        self.spec = network.spec
        self.stride = network.stride
        self.register_buffer("network_logit_share", torch.tensor(float(network_logit_share)))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.network(x)
        return out

    def grade(self, image: Tensor, points: np.ndarray, network_logits: Tensor) -> Tensor:
        """(11,) combined logits for one (H, W) slice, its 11 points (x, y) in its pixels and the network's logits."""
        graders = [grader for grader in self.graders if isinstance(grader, PatchGrader)]
        grader_logits = torch.stack([grader.grade(image, points) for grader in graders]).mean(dim=0)
        share = self.network_logit_share.to(grader_logits.dtype)
        return share * network_logits.to(grader_logits.dtype) + (1 - share) * grader_logits

    def disc_grades(self, image: Tensor, points: np.ndarray) -> Tensor | None:
        """(6, classes) softmax of the grade grader over the disc classes (v1..v5) at the discs of one slice, or
        None without a grade grader; P(abnormal) stays `grade`'s (the binary path the Score reads)."""
        if self.grade_grader is None:
            return None
        return torch.softmax(self.grade_grader.grade(image, points, only=DISC_INDICES), dim=1)


class RefinedCCFNet(nn.Module):
    """A CCF-Net (single, pair, ensemble or graded) whose decoded points are moved by point refiners.

    `forward` is the network's own (decoding and heatmaps unchanged); after decoding, `refine` moves each point to
    where the refiners (their mean) find its structure in a patch around it, and a graded network grades there.
    Why: a quarter of the network's misses are near misses on the right structure (docs/model.md, "Point refiner").
    """

    def __init__(self, network: CCFNet | PairedCCFNet | GradedCCFNet, refiners: Sequence[PointRefiner]):
        super().__init__()
        if not refiners:
            raise ValueError("a refined network needs at least one refiner")
        self.network = network
        self.refiners = nn.ModuleList(refiners)
        self.spec = network.spec
        self.stride = network.stride

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.network(x)
        return out

    def refine(self, image: Tensor, points: np.ndarray) -> np.ndarray:
        """(11, 2) points (x, y) of one (H, W) slice moved by the refiners (the mean of their points)."""
        refiners = [refiner for refiner in self.refiners if isinstance(refiner, PointRefiner)]
        return np.mean([refiner.refine(image, points) for refiner in refiners], axis=0)


Network = CCFNet | PairedCCFNet | GradedCCFNet | RefinedCCFNet
PAIR_SUFFIX = "-pair"
ENSEMBLE_SUFFIX = "-ens"  # + the number of networks: r18-msc-ens3 is a localiser and two classifiers
ENSEMBLE_SIZES = (3, 4, 5)


LOCALISERS_SUFFIX = "-loc"  # + the number of localisers averaged, when more than one: r18-msc-pair-loc2
LOCALISER_COUNTS = (1, 2)


def combined_arch(single_arch: str, classifiers: int, localisers: int = 1) -> str:
    """The registry name of `localisers` localisers and `classifiers` classifiers of `single_arch`: a pair
    (`-pair-loc2` when two localisers' maps are averaged) or an ensemble (one localiser)."""
    if localisers not in LOCALISER_COUNTS:
        raise ValueError(f"a pair has {LOCALISER_COUNTS[0]}-{LOCALISER_COUNTS[-1]} localisers, not {localisers}")
    if classifiers == 1:
        return single_arch + PAIR_SUFFIX + (f"{LOCALISERS_SUFFIX}{localisers}" if localisers > 1 else "")
    if localisers > 1:
        raise ValueError("two localisers are averaged in a pair, not in an ensemble")
    if classifiers + 1 not in ENSEMBLE_SIZES:
        raise ValueError(f"an ensemble has {ENSEMBLE_SIZES[0]}-{ENSEMBLE_SIZES[-1]} networks, not {classifiers + 1}")
    return f"{single_arch}{ENSEMBLE_SUFFIX}{classifiers + 1}"


GRADED_SUFFIX = "-graded"
GRADER_COUNTS = (1, 2)
GRADES_SUFFIX = "-grades"  # after -graded<n>: the graded network also has a disc grade grader
DISC_GRADE_CLASSES = 5  # v1..v5 (ccfnet_core.disc_grades.DISC_GRADES)


def graded_arch(arch: str, graders: int = 1, grades: bool = False) -> str:
    """The registry name of `arch` (single, pair or ensemble) with `graders` patch graders (and, with `grades`, a
    disc grade grader)."""
    if GRADED_SUFFIX in arch:
        raise ValueError(f"{arch} already has a patch grader")
    if graders not in GRADER_COUNTS:
        raise ValueError(f"a graded network has {GRADER_COUNTS[0]}-{GRADER_COUNTS[-1]} graders, not {graders}")
    return arch + GRADED_SUFFIX + (str(graders) if graders > 1 else "") + (GRADES_SUFFIX if grades else "")


def with_grades_arch(arch: str) -> str:
    """`arch` (graded, refined or not) with a disc grade grader in its graded network: `-grades` after `-graded<n>`."""
    if GRADES_SUFFIX in arch:
        raise ValueError(f"{arch} already has a disc grade grader")
    head, graded, tail = arch.partition(GRADED_SUFFIX)
    if not graded:
        raise ValueError(f"{arch} has no patch grader to put a disc grade grader beside")
    count = tail.split("-", 1)[0]
    rest = tail[len(count) :]
    return head + graded + count + GRADES_SUFFIX + rest


REFINED_SUFFIX = "-refined"
REFINER_COUNTS = (1, 2)


def refined_arch(arch: str, refiners: int = 1) -> str:
    """The registry name of `arch` (single, pair, ensemble, graded) with `refiners` point refiners."""
    if REFINED_SUFFIX in arch:
        raise ValueError(f"{arch} already has a point refiner")
    if refiners not in REFINER_COUNTS:
        raise ValueError(f"a refined network has {REFINER_COUNTS[0]}-{REFINER_COUNTS[-1]} refiners, not {refiners}")
    return arch + REFINED_SUFFIX + (str(refiners) if refiners > 1 else "")


def is_combined(arch: str) -> bool:
    """True for a pair or an ensemble (several networks read as one), False for a single network."""
    arch = arch.split(REFINED_SUFFIX)[0].split(GRADED_SUFFIX)[0].split(LOCALISERS_SUFFIX)[0]
    return arch.endswith(PAIR_SUFFIX) or any(arch.endswith(f"{ENSEMBLE_SUFFIX}{n}") for n in ENSEMBLE_SIZES)


_REGISTRY: dict[str, Callable[[], Network]] = {}


Builder = TypeVar("Builder", bound=Callable[[], Network])


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register a builder under `name`; a second builder of the same name is an error, not an overwrite."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str) -> Network:
    """Build a registered architecture by name (`r18-msc`, `r50-msc`, `r18`, `r50`; an MSC one + `-pair`/`-ens3`...)."""
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(list_models())}") from None
    return builder()


def _create_ccfnet(name: str, block: Block, layers: tuple[int, ...], msc: bool) -> CCFNet:
    return CCFNet(ArchSpec(name=name, block=block, layers=layers, msc=msc, stride=16 if msc else 32))


@register_model("r18-msc")
def ccfnet_r18_msc() -> CCFNet:
    return _create_ccfnet("r18-msc", BasicBlock, (2, 2, 2), msc=True)


@register_model("r50-msc")
def ccfnet_r50_msc() -> CCFNet:
    return _create_ccfnet("r50-msc", Bottleneck, (3, 4, 6), msc=True)


@register_model("r18")
def resnet18_baseline() -> CCFNet:
    return _create_ccfnet("r18", BasicBlock, (2, 2, 2, 2), msc=False)


@register_model("r50")
def resnet50_baseline() -> CCFNet:
    return _create_ccfnet("r50", Bottleneck, (3, 4, 6, 3), msc=False)


def _combined_builder(
    single: Callable[[], CCFNet], classifiers: int, localisers: int
) -> Callable[[], PairedCCFNet]:
    def build() -> PairedCCFNet:
        localiser, classifier, *extra = (single() for _ in range(1 + classifiers))
        more_localisers = [single() for _ in range(localisers - 1)]
        return PairedCCFNet(localiser, classifier, extra_classifiers=extra, extra_localisers=more_localisers)

    return build


for _name, _single in (("r18-msc", ccfnet_r18_msc), ("r50-msc", ccfnet_r50_msc)):
    for _classifiers in (1, *(n - 1 for n in ENSEMBLE_SIZES)):
        for _localisers in LOCALISER_COUNTS if _classifiers == 1 else (1,):  # two localisers: pairs only
            _arch = combined_arch(_name, _classifiers, _localisers)
            register_model(_arch)(_combined_builder(_single, _classifiers, _localisers))


def _graded_builder(
    network: Callable[[], CCFNet | PairedCCFNet], graders: int, grades: bool
) -> Callable[[], GradedCCFNet]:
    def build() -> GradedCCFNet:
        grade_grader = PatchGrader(classes=DISC_GRADE_CLASSES) if grades else None
        return GradedCCFNet(network(), [PatchGrader() for _ in range(graders)], grade_grader=grade_grader)

    return build


for _name in list(_REGISTRY):
    for _graders in GRADER_COUNTS:
        for _grades in (False, True):
            register_model(graded_arch(_name, _graders, _grades))(
                _graded_builder(_REGISTRY[_name], _graders, _grades)  # type: ignore[arg-type]
            )


def _refined_builder(network: Callable[[], Network], refiners: int) -> Callable[[], RefinedCCFNet]:
    def build() -> RefinedCCFNet:
        inner = network()
        if isinstance(inner, RefinedCCFNet):
            raise ValueError("a refined network cannot be refined again")
        return RefinedCCFNet(inner, [PointRefiner() for _ in range(refiners)])

    return build


for _name in list(_REGISTRY):
    for _refiners in REFINER_COUNTS:
        register_model(refined_arch(_name, _refiners))(_refined_builder(_REGISTRY[_name], _refiners))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int = 512, paper_graph: bool = True) -> int:
    """Multiply-accumulates at 1x3xSxS, counted as thop counted them for the paper's table.

    thop's convention at the time: a convolution costs out_elements x (in_channels/groups x kh x kw + 1 if it
    has a bias), batch norm 2 per element, ReLU and pooling nothing, bilinear upsampling 4 per output element.
    With `paper_graph` the context block is evaluated term by term, as the reference code runs it and as the
    paper counted it; without it, the MACs this implementation executes.
    """
    import copy

    probe = copy.deepcopy(model).eval()
    for module in probe.modules():
        if isinstance(module, ContextBlock):
            module.reuse_branches = not paper_graph
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k_h, k_w = module.kernel_size
            bias_ops = 1 if module.bias is not None else 0
            total += output.numel() * ((module.in_channels // module.groups) * k_h * k_w + bias_ops)
        elif isinstance(module, nn.BatchNorm2d):
            total += 2 * output.numel()
        elif isinstance(module, PyramidPooling):
            total += 4 * len(module.scales) * output.shape[0] * output.shape[-2] * output.shape[-1]

    handles = [m.register_forward_hook(hook) for m in probe.modules()]
    with torch.no_grad():
        probe(torch.zeros(1, 3, input_size, input_size))
    for handle in handles:
        handle.remove()
    return total
