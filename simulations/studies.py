"""The studies `fedoppu study NAME` runs: each one simulated federation (`fedoppu simulate`) with a
preset of run-config keys that sets it up to answer one question, reported with the rest of the run.
Kept free of heavy imports: the command line's parser reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Study:
    help: str
    question: str
    preset: dict[str, Any]  # over pyproject's run config; --config and --set apply on top
    # One federation per variant, each with these keys over the rest (the setting the study varies),
    # in <run-dir>/<variant>/, compared with the first (simulations/variants.py); none: one federation.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    # OPPU's paper, "PEFT versatility": the same federation with both adapters as LoRA, DoRA and IA3.
    "peft-types": Study(
        help="the same federation with the adapters as LoRA, DoRA and IA3 (OPPU's PEFT versatility)",
        question="The default federation once per PEFT type of the shared and personal adapters (peft-type: "
        "lora, dora, ia3), on the same users, queries and seed; the report gives every method per type and "
        "each type minus LoRA, paired over users: does OPPU's gain hold whatever the PEFT module?",
        preset={"methods": "zero-shot,shared,local,oppu"},
        variants={name: {"peft-type": name} for name in ("lora", "dora", "ia3")},
    ),
}
