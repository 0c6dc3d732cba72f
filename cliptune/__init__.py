"""cliptune: adapt pretrained CLIP models to a new domain from a folder of labelled images."""

__version__ = "0.1.0"

from cliptune.models import LoadedModel, ModelSpec, load_model  # noqa: E402

__all__ = ["LoadedModel", "ModelSpec", "load_model", "__version__"]
