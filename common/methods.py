"""The methods fedoppu compares, as OPPU's paper does, expressed as what each one puts together.

Every method answers with: base model [+ shared adapter] [+ personal adapter] and a prompt that may
carry retrieved history (RAG) or a profile (PAG). A personal variant is trained with the same
context its method answers with, on top of the shared adapter or, for `local`, the bare model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    shared: bool
    personal: bool
    rag: bool = False
    profile: bool = False
    description: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zero-shot", False, False, description="base model alone"),
        Method("rag", False, False, rag=True, description="base model + top-k of the user's own history"),
        Method("shared", True, False, description="federated shared adapter, not personalized"),
        Method("local", False, True, description="personal adapter on the bare base model, no federation"),
        Method("oppu", True, True, description="federated shared adapter + personal adapter (OPPU)"),
        Method("oppu-rag", True, True, rag=True, description="OPPU with retrieval in training and prompts"),
        Method("oppu-pag", True, True, profile=True, description="OPPU with the user's profile in prompts"),
    )
}
# Runs apart, with every user's history pooled on one node: OPPU's original, non-private setting.
CENTRALIZED = ("centralized-shared", "centralized")
