"""The studies `fedoppu study NAME` runs: each one simulated federation (`fedoppu simulate`) with a
preset of run-config keys that sets it up to answer one question, reported with the rest of the run.
Kept free of heavy imports: the command line's parser reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Study:
    help: str
    question: str
    preset: dict[str, Any]  # over pyproject's run config; --config and --set apply on top


STUDIES = {
    # OPPU's paper, "behavior shift"; the report's part is simulations/behaviour_shift.py. As many
    # shifted as usual queries per user, and the methods the paper compares, with the shared adapter
    # and zero-shot as floors.
    "behaviour-shift": Study(
        help="how methods fare on queries whose topic the user's history never shows (OPPU's behavior shift)",
        question="On the built-in tagging benchmark each user also asks about movie themes their history "
        "never shows (benchmark-shifted-queries); every method is scored on those (shifted) and on the "
        "usual (in-history) queries, and the report answers: does retrieval (rag, oppu-rag) lose more "
        "than OPPU's personal adapter when the topic is new?",
        preset={"benchmark-shifted-queries": 8, "methods": "zero-shot,rag,shared,oppu,oppu-rag"},
    ),
}
