"""Choosing the proxy set of edit requests that LGA ranks layers on."""

from __future__ import annotations

import collections
import math
import random
from typing import Sequence

from lga_dist.errors import UserError
from lga_dist.io.requests import EditRequest


class ProxyError(UserError, ValueError):
    pass


def proxy_count(total: int, size: int | None, fraction: float | None) -> int:
    if size is not None:
        if size <= 0:
            raise ProxyError(f"--proxy-size must be positive, got {size}")
        return min(size, total)
    if fraction is None or not 0 < fraction <= 1:
        raise ProxyError(f"--proxy-fraction must be in (0, 1], got {fraction}")
    return max(1, round(total * fraction))


def select_proxy(requests: Sequence[EditRequest], *, size: int | None = None, fraction: float | None = 0.1,
                 seed: int = 0) -> list[EditRequest]:
    """A seeded sample, stratified by relation id when the requests carry one (proportional allocation).

    The result is in the input order, so the same seed and input give the same proxy set.
    """
    if not requests:
        raise ProxyError("no valid edit requests to choose a proxy set from")
    count = proxy_count(len(requests), size, fraction)
    rng = random.Random(seed)
    groups: dict[str | None, list[int]] = collections.defaultdict(list)
    for index, request in enumerate(requests):
        groups[request.relation_id].append(index)
    if len(groups) == 1:
        chosen = rng.sample(range(len(requests)), count)
    else:  # largest remainder allocation so the strata add up to exactly `count`
        quotas = {key: count * len(members) / len(requests) for key, members in groups.items()}
        allocation = {key: math.floor(q) for key, q in quotas.items()}
        by_remainder = sorted(quotas, key=lambda k: (-(quotas[k] - allocation[k]), str(k)))
        for key in by_remainder[:count - sum(allocation.values())]:
            allocation[key] += 1
        chosen = [i for key in sorted(groups, key=str) for i in rng.sample(groups[key], allocation[key])]
    return [requests[i] for i in sorted(chosen)]
