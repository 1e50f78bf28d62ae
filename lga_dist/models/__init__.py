"""Models: architecture adapters, safe loading, fingerprints and the embedded demo fact model."""

from lga_dist.models.adapters import ADAPTERS, Adapter, UnknownArchitecture, adapter_for, get_module
from lga_dist.models.fingerprint import fingerprint
from lga_dist.models.loading import DTYPES, LoadedModel, ModelError, ModelInfo, describe_model, load_model

__all__ = ["ADAPTERS", "DTYPES", "Adapter", "LoadedModel", "ModelError", "ModelInfo", "describe_model", "UnknownArchitecture", "adapter_for",
           "fingerprint", "get_module", "load_model"]
