"""Retry delays: exponential backoff with full jitter and a cap.

A pure function of the attempt number and a random source; imports nothing from the project.
"""

import random


def delay_s(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry).

    Full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter"): uniform in
    [0, min(cap_s, base_s * 2 ** (attempt - 1))], so many failing writers spread out.
    """
    ceiling = min(cap_s, base_s * 2 ** min(max(attempt, 1) - 1, 62))
    return rng.uniform(0, ceiling)
