"""Models: sources (packaged names, GGUF, folders, s3://, hub cache), adapters, safe loading, fingerprints, and the
demo model."""

from lga_dist.models.adapters import ADAPTERS, Adapter, UnknownArchitecture, adapter_for, get_module
from lga_dist.models.fingerprint import fingerprint
from lga_dist.models.loading import DTYPES, LoadedModel, ModelInfo, describe_model, load_model
from lga_dist.models.sources import ModelError, resolve_model

__all__ = ["ADAPTERS", "DTYPES", "Adapter", "LoadedModel", "ModelError", "ModelInfo", "describe_model",
           "UnknownArchitecture", "adapter_for", "fingerprint", "get_module", "load_model", "resolve_model"]
