"""``config.model_type`` -> adapter class, and :func:`get_adapter`."""

from __future__ import annotations

from torch import nn

from rmoe.analysis.adapters.base import MoEAdapter
from rmoe.analysis.adapters.hf_custom import (
    DbrxAdapter,
    GptOssAdapter,
    HYV4Adapter,
    JetMoeAdapter,
    Llama4Adapter,
)
from rmoe.analysis.adapters.huggingface import (
    Cohere2MoeAdapter,
    DeepseekV2Adapter,
    DeepseekV3Adapter,
    ErnieMoeAdapter,
    FlexOlmoAdapter,
    HunYuanMoeAdapter,
    JambaAdapter,
    Lfm2MoeAdapter,
    MiniMaxAdapter,
    MixtralAdapter,
    OlmoeAdapter,
    PhimoeAdapter,
    Qwen2MoeAdapter,
    Qwen3MoeAdapter,
    Qwen3NextAdapter,
    SigmoidBiasAdapter,
    TopKSoftmaxAdapter,
)
from rmoe.analysis.adapters.rmoe_model import RMoEAdapter

_CLASSES: tuple[type[MoEAdapter], ...] = (
    RMoEAdapter,
    MixtralAdapter,
    OlmoeAdapter,
    Qwen2MoeAdapter,
    Qwen3MoeAdapter,
    DeepseekV2Adapter,
    DeepseekV3Adapter,
    MiniMaxAdapter,
    HunYuanMoeAdapter,
    TopKSoftmaxAdapter,
    FlexOlmoAdapter,
    JambaAdapter,
    Qwen3NextAdapter,
    PhimoeAdapter,
    ErnieMoeAdapter,
    Cohere2MoeAdapter,
    SigmoidBiasAdapter,
    Lfm2MoeAdapter,
    GptOssAdapter,
    HYV4Adapter,
    Llama4Adapter,
    DbrxAdapter,
    JetMoeAdapter,
)

ADAPTERS: dict[str, type[MoEAdapter]] = {t: cls for cls in _CLASSES for t in cls.model_types}
"""``config.model_type`` -> adapter class: the one place a family is registered."""


def supported_families() -> list[str]:
    """The ``model_type`` values :func:`get_adapter` accepts."""
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    Raises:
        ValueError: the model type is not a supported MoE family (the message lists them).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = ADAPTERS.get(str(model_type))
    if cls is None:
        import difflib

        near = difflib.get_close_matches(str(model_type), list(ADAPTERS), n=1)
        hint = f" (nearest: {near[0]!r})" if near else ""
        raise ValueError(
            f"model type {model_type!r} is not a supported MoE family; supported: "
            f"{', '.join(supported_families())}{hint}"
        )
    return cls(model)
