"""Exponential backoff with full jitter and a ceiling (AWS architecture blog's 'full jitter')."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.05
    ceiling_s: float = 5.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1-based); a peer's Retry-After wins if longer."""
        cap = min(self.ceiling_s, self.base_s * (2 ** min(attempt - 1, 30)))
        jittered = random.uniform(0, cap)
        if retry_after is not None:
            return max(jittered, min(retry_after, self.ceiling_s * 6))
        return jittered
