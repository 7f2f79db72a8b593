"""Building models from names and checkpoints (never downloads weights)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from fxmerge.errors import InputError


def create(name: str, num_classes: Optional[int] = None, **kwargs) -> torch.nn.Module:
    """A randomly initialised model: a timm name, or ``torchvision:NAME``."""
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.split(":", 1)[1]
        if tv_name not in torchvision.models.list_models():
            raise InputError(f"unknown torchvision model '{tv_name}' (see torchvision.models.list_models())")
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return torchvision.models.get_model(tv_name, weights=None, **kwargs)
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise InputError(f"unknown model '{name}': not a timm model name and not 'torchvision:NAME'{hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(name, pretrained=False, **kwargs)


def default_input_size(model: torch.nn.Module) -> tuple:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    return tuple(size) if size else (3, 224, 224)


def parse_input_size(text: str) -> tuple:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"bad --input-size '{text}': expected C,H,W such as 3,224,224") from None
    if len(parts) != 3 or min(parts) <= 0:
        raise InputError(f"bad --input-size '{text}': expected three positive integers C,H,W")
    return parts


def read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise InputError(f"checkpoint '{path}' does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot read checkpoint '{path}': {type(e).__name__}: {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"checkpoint '{path}' is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load(arch: str, checkpoint: str, **kwargs) -> torch.nn.Module:
    """Build ``arch`` and load ``checkpoint`` into it. The classifier's size is
    taken from the checkpoint when it differs from the default."""
    state = read_state_dict(checkpoint)
    model = create(arch, **kwargs)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        head = _classifier_size(model, state)
        if head is not None:
            model = create(arch, num_classes=head, **kwargs)
            own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or bad:
        detail = []
        if bad:
            k = bad[0]
            detail.append(f"'{k}' has shape {list(state[k].shape)}, {arch} expects {list(own[k].shape)}")
        if missing:
            detail.append(f"missing '{missing[0]}'" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if unexpected:
            detail.append(f"unexpected '{unexpected[0]}'" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
        raise InputError(f"checkpoint '{checkpoint}' does not fit architecture '{arch}': " + "; ".join(detail))
    model.load_state_dict(state)
    return model


def _classifier_size(model, state) -> Optional[int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = [heads] if isinstance(heads, str) else list(heads)
    heads += ["fc", "head", "classifier", "heads.head", "classifier.1", "classifier.3", "head.fc"]
    for h in heads:
        w = state.get(f"{h}.weight")
        if w is not None and w.ndim >= 2:
            return int(w.shape[0])
    return None
