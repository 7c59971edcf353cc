"""What loading a published checkpoint into these models takes: the state dict out of a file's
wrappers, and a check, naming the keys, that a mapped state dict fits a model exactly. The
per-family mappings (timm's ``checkpoint_filter_fn``) live beside their models:
:mod:`attvig_pyg.models.greedyvig` and :mod:`attvig_pyg.models.vig`."""
from typing import Dict, Mapping, Tuple

from torch import Tensor, nn

__all__ = ["unwrap_state_dict", "check_fits"]


def unwrap_state_dict(checkpoint) -> Dict[str, Tensor]:
    """The state dict inside a checkpoint's contents: the dict itself, or its ``"model"`` or
    ``"state_dict"`` entry (training scripts' wrappers), without DataParallel's ``module.``
    prefixes."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, Tensor)
                                                      for v in checkpoint.values()):
        raise ValueError("Expected a state dict of tensors (or a dict holding one under "
                         f"'model' or 'state_dict'), got {type(checkpoint).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v
            for k, v in checkpoint.items()}


def check_fits(state_dict: Mapping[str, Tensor], model: nn.Module, source: str,
               classifiers: Tuple[str, ...] = ()) -> None:
    """Raises ValueError, naming the keys, unless ``state_dict`` has exactly ``model``'s keys
    with its shapes, leaving out the ``classifiers`` (module names: timm replaces or drops them
    where the number of classes differs)."""
    def kept(keys):
        return {k for k in keys if not k.startswith(tuple(c + "." for c in classifiers))}
    expected = {k: v for k, v in model.state_dict().items() if k in kept(model.state_dict())}
    state_dict = {k: v for k, v in state_dict.items() if k in kept(state_dict)}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} for {tuple(expected[k].shape)}"
              for k in sorted(set(state_dict) & set(expected))
              if state_dict[k].shape != expected[k].shape]
    if missing or extra or shapes:
        def listed(items):
            return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5
                                           else "") if items else "none"
        raise ValueError(f"{source} does not fit {type(model).__name__}: missing {listed(missing)};"
                         f" unexpected {listed(extra)}; wrong shapes {listed(shapes)}")
