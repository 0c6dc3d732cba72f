"""cliptune: adapt pretrained CLIP models to a new domain from a folder of labelled images."""

__version__ = "0.2.0"  # the package version (pyproject.toml reads it from here)

__all__ = ["LoadedModel", "ModelSpec", "load", "load_model", "__version__"]
# Exported lazily (PEP 562): importing cliptune, e.g. for the CLI's --help, does not import torch.
_LAZY = {"LoadedModel": "cliptune.models.loading", "ModelSpec": "cliptune.models.loading", "load_model": "cliptune.models.loading"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cliptune' has no attribute {name!r}")


def load(source, device="cpu"):
    """A ready classifier from a finished run folder or a classifier export: see `cliptune.deploy.classifier.load`."""
    from cliptune.deploy.classifier import load as load_classifier

    return load_classifier(source, device)
