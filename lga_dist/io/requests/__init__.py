"""Edit requests: one record type, readers for every supported format, validation and quarantine."""

from lga_dist.io.requests.formats import (
    CONFLICTING_TARGET,
    FORMATS,
    RecordError,
    convert,
    detect_format,
    to_counterfact_flat,
)
from lga_dist.io.requests.schema import EditRequest, requests_hash
from lga_dist.io.requests.validation import (
    ON_CONFLICT,
    Rejection,
    RequestError,
    RequestSet,
    read_requests,
    write_quarantine,
)

__all__ = [
    "CONFLICTING_TARGET", "EditRequest", "FORMATS", "ON_CONFLICT", "RecordError", "Rejection", "RequestError",
    "RequestSet", "convert", "detect_format", "read_requests", "requests_hash", "to_counterfact_flat",
    "write_quarantine",
]
