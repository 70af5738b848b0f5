"""A tiny synthetic corpus for data and training tests: short sentences over a small vocabulary, with structure
a 2-layer model (or an LSTM) learns in a few dozen steps."""

from __future__ import annotations

import random


def make_text(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    animals, verbs, things = ["cat", "dog", "fox", "owl"], ["sees", "likes", "eats"], ["fish", "corn", "a hat"]
    return "".join(f"the {rng.choice(animals)} {rng.choice(verbs)} {rng.choice(things)}.\n" for _ in range(n_lines))
