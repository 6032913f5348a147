"""rmoe: Mixture-of-Experts language models with the layerwise recurrent router (RMoE).

Importing rmoe registers `RMoEConfig`, `RMoEModel` and `RMoEForCausalLM` with transformers'
`AutoConfig`, `AutoModel` and `AutoModelForCausalLM` (model_type "rmoe"), so
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved rmoe model without trust_remote_code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import RMoEConfig
from .modeling import RMoEForCausalLM, RMoEModel

__version__ = "0.1.0"


def _register() -> None:
    try:
        AutoConfig.register("rmoe", RMoEConfig)
    except ValueError:  # already registered (module reloaded)
        pass
    for auto, cls in ((AutoModel, RMoEModel), (AutoModelForCausalLM, RMoEForCausalLM)):
        try:
            auto.register(RMoEConfig, cls)
        except ValueError:  # already registered (module reloaded)
            pass


_register()

_SUBPACKAGES = frozenset(
    {
        "analysis",
        "continual",
        "data",
        "evaluation",
        "experiments",
        "integrations",
        "loading",
        "modeling",
        "registry",
        "runtime",
        "training",
    }
)


def __getattr__(name: str):
    """Import a subpackage on first access, so ``rmoe.continual.MIGU`` works after ``import rmoe``."""
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RMoEConfig", "RMoEForCausalLM", "RMoEModel", "__version__"]
