"""lga-dist check-requests: read and validate edit requests, quarantine what is broken."""

from __future__ import annotations

import dataclasses

from lga_dist.config import ConfigError, option
from lga_dist.console import format_table
from lga_dist.io.requests import FORMATS, ON_CONFLICT, read_requests
from lga_dist.io.requests.containers import CONTAINERS

DESCRIPTION = """Read edit requests (flat or nested CounterFact, zsRE; .json, .jsonl, .parquet; local or s3://),
validate every record and write each rejected one, with its location and reason, to the
quarantine file. The format is detected from the records, the container from the file name.

exit status: 0 all read; 1 some records rejected and --strict given; 2 unusable input."""


@dataclasses.dataclass
class Config:
    paths: list[str] = option([], "request files or directories/prefixes (local or s3://)", positional=True,
                              metavar="PATH")
    format: str | None = option(None, "record format instead of detecting it", choices=FORMATS)
    container: str | None = option(None, "container instead of the file extension",
                                   choices=sorted(set(CONTAINERS.values())))
    quarantine: str = option("out/check_requests/quarantine.jsonl", "where rejected records are written (local or "
                             "s3://)")
    on_conflict: str = option("reject", "requests giving one subject+prompt different targets: 'reject' "
                              "quarantines them all, 'last' keeps the last one read", choices=ON_CONFLICT)
    strict: bool = option(False, "exit with status 1 if any record was rejected")

    def validate(self) -> None:
        if not self.paths:
            raise ConfigError("give at least one PATH")


def run(config: Config) -> tuple[dict, int]:
    result = read_requests(config.paths, format_name=config.format, container=config.container,
                           on_conflict=config.on_conflict, quarantine=config.quarantine)
    print(f"read {result.read} records from {len(result.files)} file(s): {len(result.requests)} valid, "
          f"{len(result.rejections)} rejected")
    if result.rejections:
        print(format_table([{"reason": k, "count": v} for k, v in result.by_reason.items()]))
        print(f"rejected records with their reasons: {config.quarantine}")
    code = 1 if config.strict and result.rejections else 0
    return result.summary(), code
