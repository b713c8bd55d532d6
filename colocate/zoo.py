"""The embedded default ensemble: five small-to-large image classifiers written in ``torch.nn``.

Five real architectures, each an image classifier over a float32 batch of shape
``(B, 3, H, W)`` returning logits of shape ``(B, num_classes)``:

- ``resnet``: a ResNet-34-style CNN (basic residual blocks, BatchNorm, stride-2 stages).
- ``mobilenet``: MobileNetV2 (inverted residuals, depthwise convolutions, ReLU6).
- ``efficientnet``: EfficientNet-B0 (MBConv with squeeze-excitation, SiLU).
- ``vit``: a ViT-S/16-style Vision Transformer (patch embedding, class token,
  position embedding, pre-norm attention blocks written with ``nn.Linear`` and
  ``scaled_dot_product_attention`` so they export to ONNX).
- ``mlp``: a multi-layer perceptron over the flattened image.

Each comes in three presets (:data:`SCALES`):

- ``"tiny"``: 32x32 images, narrow and shallow; for tests.
- ``"small"``: 64x64 images, a quarter of the full widths and half the depth; the
  CPU default (the whole ensemble runs a batch of 8 in a few tens of milliseconds).
- ``"large"``: 224x224 images and the full architectures (ResNet-34, MobileNetV2,
  EfficientNet-B0, ViT-S/16, a 78M-parameter MLP): real work for a GPU.

A float ``scale`` ``s`` means the ``"small"`` preset with every width multiplied
by ``s`` (so ``scale=1.0`` builds the same model as ``scale="small"``).

Weights are random but seeded: the same ``(arch, seed)`` always gives the same
weights, different architectures draw from different seeds, and the global
torch RNG is left untouched. ``import colocate.zoo`` does not import torch; the
``nn.Module`` classes are created on the first :func:`build_model` call.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

from colocate._optional import optional_import
from colocate.ensemble import Ensemble, InputSpec, Member
from colocate.errors import InvalidInputError, ModelLoadError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHITECTURES",
    "SCALES",
    "ModelFactory",
    "Scale",
    "build_model",
    "count_parameters",
    "default_ensemble",
    "export_onnx",
    "input_shape",
    "member",
]

_BUILD_LOCK = threading.Lock()

ARCHITECTURES: tuple[str, ...] = ("resnet", "mobilenet", "efficientnet", "vit", "mlp")
SCALES: tuple[str, ...] = ("tiny", "small", "large")

Scale: TypeAlias = str | float  # a preset name of SCALES, or a width multiplier of "small"

# preset -> (image size, width multiplier, depth multiplier); width = depth = 1 is the full architecture
_PRESETS: dict[str, tuple[int, float, float]] = {
    "tiny": (32, 0.125, 0.25),
    "small": (64, 0.25, 0.5),
    "large": (224, 1.0, 1.0),
}
_FLOAT_SCALE_BASE = "small"  # a float scale multiplies the widths of this preset
_MAX_FLOAT_SCALE = 16.0
_ONNX_BACKENDS: tuple[str, ...] = ("onnxruntime", "tensorrt")
_MEMBER_BACKENDS: tuple[str, ...] = ("torch", *_ONNX_BACKENDS)


# --- validation and configuration ---------------------------------------------------------------


def _check_arch(arch: object) -> str:
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise InvalidInputError(
            f"unknown zoo architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    return arch


def _resolve_scale(scale: object) -> tuple[int, float, float]:
    """(image size, width multiplier, depth multiplier) of a preset name or a float scale."""
    if isinstance(scale, str):
        if scale not in _PRESETS:
            raise InvalidInputError(
                f"unknown zoo scale {scale!r}; choose one of {', '.join(SCALES)} "
                f"or a float in (0, {_MAX_FLOAT_SCALE:g}] multiplying the widths of '{_FLOAT_SCALE_BASE}'"
            )
        return _PRESETS[scale]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidInputError(
            f"zoo scale must be one of {', '.join(SCALES)} or a float, got {type(scale).__name__}"
        )
    value = float(scale)
    if not math.isfinite(value) or value <= 0 or value > _MAX_FLOAT_SCALE:
        raise InvalidInputError(
            f"zoo scale {scale!r} is out of range; a float scale must be in (0, {_MAX_FLOAT_SCALE:g}] "
            f"(it multiplies the widths of '{_FLOAT_SCALE_BASE}'), or use one of {', '.join(SCALES)}"
        )
    image, width, depth = _PRESETS[_FLOAT_SCALE_BASE]
    return image, width * value, depth


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidInputError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInputError(f"seed must be an int, got {seed!r}")
    return seed


def _scale_tag(scale: Scale) -> str:
    return scale if isinstance(scale, str) else f"x{float(scale):g}"


def _derived_seed(arch: str, seed: int) -> int:
    """A per-architecture seed: different archs with the same ``seed`` get different weights."""
    return (zlib.crc32(arch.encode("utf-8")) + seed * 0x9E3779B97F4A7C15) % (2**63)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to a multiple of ``divisor`` (at least ``divisor``, never 10% below)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _repeats(count: int, depth: float) -> int:
    return max(1, math.ceil(count * depth))


def input_shape(scale: Scale = "small") -> tuple[int, ...]:
    """The input shape of the zoo models at ``scale``: ``(-1, 3, H, W)`` (``-1`` = any batch size).

    ``H = W`` is 32 for ``"tiny"``, 64 for ``"small"`` and for float scales, 224 for ``"large"``.
    """
    image, _, _ = _resolve_scale(scale)
    return (-1, 3, image, image)


# --- the architectures (created lazily: torch is imported on first use) ------------------------


def _torch(purpose: str) -> ModuleType:
    return optional_import("torch", purpose=purpose)


def _restore_module(class_name: str) -> torch.nn.Module:
    """Unpickling helper: an empty instance of the zoo class ``class_name``."""
    cls = _models()[class_name]
    return cls.__new__(cls)


@functools.cache
def _models() -> dict[str, type[torch.nn.Module]]:
    """Define the zoo's ``nn.Module`` classes (once) and return them by name."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ZooModule(nn.Module):
        """Base of the zoo classes: picklable although defined inside a function."""

        def __reduce__(self) -> tuple[Any, ...]:
            return (_restore_module, (type(self).__name__,), self.__dict__.copy())

    def conv_bn(
        cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = None
    ) -> nn.Sequential:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        return nn.Sequential(*layers)

    # ResNet ------------------------------------------------------------------------------------

    class BasicBlock(ZooModule):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = conv_bn(cin, cout, 3, stride, act=nn.ReLU)
            self.conv2 = conv_bn(cout, cout, 3)
            self.shortcut: nn.Module = (
                conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.conv2(self.conv1(x)) + self.shortcut(x)
            return F.relu(out)

    class ResNet(ZooModule):
        """ResNet-34 layout (3, 4, 6, 3 basic blocks; widths 64..512) scaled by width and depth."""

        def __init__(self, *, image_size: int, width: float, depth: float, num_classes: int) -> None:
            super().__init__()
            widths = [_make_divisible(c * width) for c in (64, 128, 256, 512)]
            blocks = [_repeats(n, depth) for n in (3, 4, 6, 3)]
            if image_size >= 128:  # ImageNet stem: /4
                self.stem = nn.Sequential(conv_bn(3, widths[0], 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1))
            else:  # small images: /2 from 64 px up, /1 below
                self.stem = nn.Sequential(conv_bn(3, widths[0], 3, 2 if image_size >= 64 else 1, act=nn.ReLU))
            stages: list[nn.Module] = []
            cin = widths[0]
            for i, (cout, count) in enumerate(zip(widths, blocks, strict=True)):
                for j in range(count):
                    stages.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                    cin = cout
            self.stages = nn.Sequential(*stages)
            self.head = nn.Linear(cin, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features: torch.Tensor = self.stages(self.stem(x))
            out: torch.Tensor = self.head(features.mean(dim=(2, 3)))
            return out

    # MobileNetV2 -------------------------------------------------------------------------------

    class InvertedResidual(ZooModule):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
            layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
            layers.append(conv_bn(hidden, cout, 1))
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.block(x)
            return x + out if self.residual else out

    class MobileNetV2(ZooModule):
        """MobileNetV2 (expansion, channels, repeats, stride settings of the paper), scaled."""

        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                    (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

        def __init__(self, *, image_size: int, width: float, depth: float, num_classes: int) -> None:
            super().__init__()
            cin = _make_divisible(32 * width)
            layers: list[nn.Module] = [conv_bn(3, cin, 3, 2 if image_size >= 64 else 1, act=nn.ReLU6)]
            for expand, channels, count, stride in self.SETTINGS:
                cout = _make_divisible(channels * width)
                for j in range(_repeats(count, depth)):
                    layers.append(InvertedResidual(cin, cout, stride if j == 0 else 1, expand))
                    cin = cout
            last = _make_divisible(1280 * max(1.0, width))
            layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(last, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features: torch.Tensor = self.features(x)
            out: torch.Tensor = self.head(features.mean(dim=(2, 3)))
            return out

    # EfficientNet-B0 ---------------------------------------------------------------------------

    class SqueezeExcite(ZooModule):
        def __init__(self, channels: int, squeezed: int) -> None:
            super().__init__()
            self.reduce = nn.Conv2d(channels, squeezed, 1)
            self.expand = nn.Conv2d(squeezed, channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale: torch.Tensor = self.expand(F.silu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
            return x * torch.sigmoid(scale)

    class MBConv(ZooModule):
        def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers.append(conv_bn(cin, hidden, 1, act=nn.SiLU))
            layers.append(conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU))
            layers.append(SqueezeExcite(hidden, max(1, cin // 4)))
            layers.append(conv_bn(hidden, cout, 1))
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.block(x)
            return x + out if self.residual else out

    class EfficientNet(ZooModule):
        """EfficientNet-B0 (expansion, kernel, stride, channels, repeats per stage), scaled."""

        SETTINGS = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip

        def __init__(self, *, image_size: int, width: float, depth: float, num_classes: int) -> None:
            super().__init__()
            cin = _make_divisible(32 * width)
            layers: list[nn.Module] = [conv_bn(3, cin, 3, 2 if image_size >= 64 else 1, act=nn.SiLU)]
            for expand, kernel, stride, channels, count in self.SETTINGS:
                cout = _make_divisible(channels * width)
                for j in range(_repeats(count, depth)):
                    layers.append(MBConv(cin, cout, kernel, stride if j == 0 else 1, expand))
                    cin = cout
            last = _make_divisible(1280 * width)
            layers.append(conv_bn(cin, last, 1, act=nn.SiLU))
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(last, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features: torch.Tensor = self.features(x)
            out: torch.Tensor = self.head(features.mean(dim=(2, 3)))
            return out

    # Vision Transformer ------------------------------------------------------------------------

    class Attention(ZooModule):
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, tokens, dim = x.shape
            qkv: torch.Tensor = self.qkv(x)
            qkv = qkv.reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attended = F.scaled_dot_product_attention(q, k, v)
            out: torch.Tensor = self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
            return out

    class EncoderBlock(ZooModule):
        def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim)
            hidden = mlp_ratio * dim
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            out: torch.Tensor = x + self.mlp(self.norm2(x))
            return out

    class VisionTransformer(ZooModule):
        """ViT-S/16 (dim 384, 12 blocks, 6 heads of 64) scaled; patch 16 at 224 px, image/8 below."""

        def __init__(self, *, image_size: int, width: float, depth: float, num_classes: int) -> None:
            super().__init__()
            raw = 384 * width
            dim = _make_divisible(raw, 64) if raw >= 64 else _make_divisible(raw, 16)
            heads = max(1, dim // 64)
            patch = 16 if image_size >= 128 else max(1, image_size // 8)
            tokens = (image_size // patch) ** 2 + 1
            self.patch_embed = nn.Conv2d(3, dim, patch, patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(_repeats(12, depth))])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            patches: torch.Tensor = self.patch_embed(x)
            tokens = patches.flatten(2).transpose(1, 2)
            cls = self.cls_token.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
            encoded: torch.Tensor = self.norm(self.blocks(tokens))
            out: torch.Tensor = self.head(encoded[:, 0])
            return out

    # MLP ---------------------------------------------------------------------------------------

    class MLP(ZooModule):
        """Flattened image -> ``4 * depth`` hidden layers of ``512 * width`` (Linear, ReLU) -> logits."""

        def __init__(self, *, image_size: int, width: float, depth: float, num_classes: int) -> None:
            super().__init__()
            hidden = _make_divisible(512 * width)
            layers: list[nn.Module] = []
            features = 3 * image_size * image_size
            for _ in range(_repeats(4, depth)):
                layers += [nn.Linear(features, hidden), nn.ReLU()]
                features = hidden
            layers.append(nn.Linear(features, num_classes))
            self.layers = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.layers(x.flatten(1))
            return out

    classes: list[type[nn.Module]] = [
        BasicBlock, ResNet, InvertedResidual, MobileNetV2, SqueezeExcite, MBConv, EfficientNet,
        Attention, EncoderBlock, VisionTransformer, MLP,
    ]  # fmt: skip
    for cls in classes:  # a readable, stable identity: colocate.zoo.ResNet rather than _models.<locals>.
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    by_name: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in classes}
    by_name.update(
        resnet=ResNet, mobilenet=MobileNetV2, efficientnet=EfficientNet, vit=VisionTransformer, mlp=MLP
    )
    return by_name


# --- public API --------------------------------------------------------------------------------


def build_model(
    arch: str, *, scale: Scale = "small", num_classes: int = 10, seed: int = 0
) -> torch.nn.Module:
    """Build one zoo model with seeded random weights, in eval mode, on the CPU.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        scale: one of :data:`SCALES` (``"tiny"``, ``"small"``, ``"large"``), or a float
            multiplying the widths of ``"small"``.
        num_classes: length of the logits vector.
        seed: the same ``(arch, scale, num_classes, seed)`` always gives identical weights;
            the seed is mixed with the architecture name, and the global torch RNG is left
            as it was.

    Returns:
        An ``nn.Module`` mapping a float32 batch of :func:`input_shape` ``(B, 3, H, W)`` to
        logits ``(B, num_classes)``.

    Raises:
        InvalidInputError: unknown ``arch`` or ``scale``, or a bad ``num_classes``/``seed``.
        BackendUnavailableError: torch is not installed.
    """
    arch = _check_arch(arch)
    image, width, depth = _resolve_scale(scale)
    num_classes = _check_num_classes(num_classes)
    seed = _check_seed(seed)
    tm = _torch(f"colocate.zoo.build_model('{arch}')")
    cls = _models()[arch]
    # torch's generator is process-wide: two threads building at once would draw each other's
    # numbers, so builds are serialised (the executor loads stream slots from several threads)
    with _BUILD_LOCK, tm.random.fork_rng(devices=[]):
        tm.manual_seed(_derived_seed(arch, seed))
        model: torch.nn.Module = cls(image_size=image, width=width, depth=depth, num_classes=num_classes)
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    """The number of parameters (elements) of ``model``, shared parameters counted once."""
    return sum(p.numel() for p in model.parameters())


#: bump when an architecture or its initialisation changes (invalidates cached profiles)
ZOO_VERSION = 1


@dataclass(frozen=True)
class ModelFactory:
    """A picklable recipe for a zoo model: calling it returns :func:`build_model` of its fields.

    Used as a torch member's ``source``: building an ensemble costs nothing and the
    factory can be sent to a spawned worker process, which builds the model itself.
    """

    arch: str
    scale: Scale = "small"
    num_classes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        _check_arch(self.arch)
        _resolve_scale(self.scale)
        _check_num_classes(self.num_classes)
        _check_seed(self.seed)

    def __call__(self) -> torch.nn.Module:
        """Build the model (seeded random weights, eval mode, CPU)."""
        return build_model(self.arch, scale=self.scale, num_classes=self.num_classes, seed=self.seed)

    def cache_key(self) -> str:
        """A key that identifies the weights without building them (the recipe is deterministic).

        Includes the zoo's version, so a change to an architecture invalidates cached profiles.
        """
        return f"colocate.zoo/{ZOO_VERSION}/{self.arch}/{self.scale}/{self.num_classes}/{self.seed}"

    # functools.partial-like view, so that Member.describe() shows the full recipe
    @property
    def func(self) -> Callable[..., torch.nn.Module]:
        """The function this factory calls: :func:`build_model`."""
        return build_model

    @property
    def args(self) -> tuple[str]:
        """Positional arguments of :attr:`func`."""
        return (self.arch,)

    @property
    def keywords(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`func`."""
        return {"scale": self.scale, "num_classes": self.num_classes, "seed": self.seed}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape, ``(-1, 3, H, W)``."""
        return input_shape(self.scale)


def _concrete_shape(shape: Sequence[int], batch: int) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if not dims or any(d < 1 for d in dims[1:]) or (dims[0] != -1 and dims[0] < 1):
        raise InvalidInputError(
            f"input_shape {tuple(shape)} is not valid; give (batch, ...) with batch -1 (any) or positive"
        )
    return (batch, *dims[1:])


def export_onnx(
    model_or_factory: torch.nn.Module | Callable[[], torch.nn.Module],
    path: str | Path,
    *,
    input_shape: Sequence[int],
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Export a torch model (or a factory such as :class:`ModelFactory`) to an ONNX file.

    Uses the TorchScript-based exporter (fast; needs only ``onnx``) on a dummy batch in
    eval mode, falling back to the ``torch.export``-based exporter where the former is
    gone. The graph has one input ``"input"`` and one output ``"output"``; with
    ``dynamic_batch`` their first dimension is the symbolic ``"batch"``. The file is
    checked with ``onnx.checker``. An existing file at ``path`` is overwritten.

    Args:
        model_or_factory: an ``nn.Module``, or a callable returning one.
        path: where to write the ``.onnx`` file (parent folders are created).
        input_shape: the input shape, batch first (``-1`` = any), e.g. ``(-1, 3, 64, 64)``.
        opset: the ONNX opset to target.
        dynamic_batch: whether the batch dimension is symbolic; otherwise it is fixed to
            ``input_shape[0]`` (or 2 where that is ``-1``).

    Returns:
        The path of the written file.

    Raises:
        BackendUnavailableError: torch or onnx is not installed.
        ModelLoadError: the factory failed, or the export or the check failed.
    """
    tm = _torch("colocate.zoo.export_onnx")
    onnx = optional_import("onnx", purpose="colocate.zoo.export_onnx (ONNX export)")
    if isinstance(model_or_factory, tm.nn.Module):
        model: torch.nn.Module = model_or_factory
    elif callable(model_or_factory):
        try:
            model = model_or_factory()
        except Exception as exc:
            raise ModelLoadError(
                f"export_onnx: the factory {model_or_factory!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(model, tm.nn.Module):
            raise ModelLoadError(
                f"export_onnx: the factory {model_or_factory!r} returned {type(model).__name__}, "
                "not a torch.nn.Module"
            )
    else:
        raise InvalidInputError(
            "export_onnx needs an nn.Module or a factory returning one, "
            f"got {type(model_or_factory).__name__}"
        )
    shape = tuple(int(d) for d in input_shape)
    batch = 2 if dynamic_batch or not shape or shape[0] == -1 else shape[0]
    dummy_shape = _concrete_shape(shape, batch)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters(), None)
    device = param.device if param is not None else tm.device("cpu")
    dummy = tm.randn(dummy_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        with tm.no_grad():
            try:
                _export_legacy(tm, model, dummy, out, opset=opset, dynamic_batch=dynamic_batch)
            except (TypeError, NotImplementedError, AttributeError, ImportError):
                # the TorchScript-based exporter is gone from this torch: use torch.export
                _export_dynamo(tm, model, dummy, out, opset=opset, dynamic_batch=dynamic_batch)
        onnx.checker.check_model(str(out))
    except Exception as exc:
        raise ModelLoadError(
            f"export_onnx: exporting to {str(out)!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    return out


def _export_legacy(
    tm: ModuleType,
    model: torch.nn.Module,
    dummy: torch.Tensor,
    path: Path,
    *,
    opset: int,
    dynamic_batch: bool,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tm.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None,
            opset_version=opset,
        )


def _export_dynamo(
    tm: ModuleType,
    model: torch.nn.Module,
    dummy: torch.Tensor,
    path: Path,
    *,
    opset: int,
    dynamic_batch: bool,
) -> None:
    dynamic_shapes = ({0: tm.export.Dim("batch", min=1)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations of torch.export
        tm.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=dynamic_shapes,
            opset_version=max(opset, 18),  # the torch.export-based exporter starts at opset 18
        )


def member(
    arch: str,
    *,
    scale: Scale = "small",
    backend: str = "torch",
    num_classes: int = 10,
    seed: int = 0,
    name: str | None = None,
    onnx_dir: str | Path | None = None,
    precision: str = "fp32",
) -> Member:
    """A zoo model as an ensemble :class:`~colocate.ensemble.Member`.

    For backend ``"torch"`` the source is a :class:`ModelFactory` (nothing is built now).
    For ``"onnxruntime"`` and ``"tensorrt"`` the model is built and exported now with
    :func:`export_onnx` to ``onnx_dir/<arch>-<scale>-c<num_classes>-s<seed>.onnx``, and the
    source is that file.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        scale: one of :data:`SCALES` or a float (see :func:`build_model`).
        backend: ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.
        num_classes: length of the logits vector.
        seed: weight seed (see :func:`build_model`).
        name: member name; defaults to ``arch``.
        onnx_dir: folder for the ONNX file; required for the ONNX-based backends.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``: the precision the member runs in.

    Raises:
        InvalidInputError: unknown ``arch``/``scale``/``backend``, or no ``onnx_dir`` for an
            ONNX-based backend.
    """
    factory = ModelFactory(arch, scale=scale, num_classes=num_classes, seed=seed)
    spec = InputSpec(shape=input_shape(scale), dtype="float32")
    member_name = name if name is not None else arch
    if backend == "torch":
        return Member(name=member_name, backend="torch", source=factory, input=spec, precision=precision)
    if backend not in _ONNX_BACKENDS:
        raise InvalidInputError(
            f"zoo member '{member_name}': backend {backend!r} is not supported by the zoo; "
            f"choose one of {', '.join(_MEMBER_BACKENDS)}"
        )
    if onnx_dir is None:
        raise InvalidInputError(
            f"zoo member '{member_name}': backend '{backend}' loads an ONNX file; "
            "pass onnx_dir=<folder> to export the model into"
        )
    filename = f"{arch}-{_scale_tag(scale)}-c{num_classes}-s{seed}.onnx"
    path = export_onnx(factory, Path(onnx_dir) / filename, input_shape=spec.shape)
    return Member(name=member_name, backend=backend, source=path, input=spec, precision=precision)


def default_ensemble(
    *,
    scale: Scale = "small",
    backend: str = "torch",
    combine: str = "mean",
    onnx_dir: str | Path | None = None,
) -> Ensemble:
    """The five zoo architectures as one ensemble named ``default-<scale>``.

    Members are named after their architecture (``resnet``, ``mobilenet``, ``efficientnet``,
    ``vit``, ``mlp``), all at ``scale`` on ``backend`` with 10 classes and seed 0; see
    :func:`member` (``onnx_dir`` is required for the ONNX-based backends).
    """
    members = tuple(member(arch, scale=scale, backend=backend, onnx_dir=onnx_dir) for arch in ARCHITECTURES)
    return Ensemble(members=members, combine=combine, name=f"default-{_scale_tag(scale)}")
