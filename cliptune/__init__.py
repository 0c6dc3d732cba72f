"""cliptune: adapt pretrained CLIP models to a new domain from a folder of labelled images."""

__version__ = "0.1.0"

from cliptune.models import LoadedModel, ModelSpec, load_model  # noqa: E402


def load(source, device="cpu"):
    """A ready classifier from a finished run folder or a classifier export: see `cliptune.classifier.load`."""
    from cliptune.classifier import load as load_classifier

    return load_classifier(source, device)


__all__ = ["LoadedModel", "ModelSpec", "load", "load_model", "__version__"]
