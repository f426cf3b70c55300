"""The per-user gate: personal training kept only as far as it helps on the user's own held-out history.

OPPU trains every user's personal adapter for a fixed number of epochs on top of the shared adapter
and always answers with both. On a user whose personal adapter overfits, or whose data the shared
adapter fits badly, that can fall below the shared adapter alone or below a personal adapter alone
(`local`). The gate decides per user, on the node, from a held-out slice of that user's history:

1. The held-out slice: `personal-holdout` of the history (at least `MIN_HOLDOUT` items), drawn from
   the run's seed and the user id, so a re-run holds out the same items. The queries are never part
   of it: they are not history. A user with fewer than `2 * MIN_HOLDOUT` items has too little to
   judge by and is answered with the shared adapter alone (`reason = "short-history"`).
2. The shared adapter's weight: the held-out loss of the shared adapter alone at each weight of
   `personal-gate-weights` ("mix"; weight 0 is the bare model, 1 the `shared` method); the personal
   adapter is trained on top of the best one, so where the shared adapter does not fit a user, the
   personal adapter learns on the bare model as `local`'s does.
3. Early stopping: the personal adapter trains on the rest of the history for the `personal-epochs`
   budget, is evaluated on the held-out slice `personal-gate-evals` times, and the state with the
   lowest loss is kept (training stops after `PATIENCE` evaluations without a gain).
4. The choice: the lowest held-out loss among the shared adapter alone at each weight and the kept
   personal adapter with the shared adapter at each weight (FedDPA's mix of a global and a local
   adapter at answering time, with the weight chosen per user instead of per instance). Ties go to
   no personal adapter and to weight 1.
5. With `personal-gate-refit`, a personal adapter that won is trained again on the whole history
   (held-out items included) for the same share of the budget: the choice is made on the held-out
   slice, the adapter that answers has seen every item. The held-out loss recorded is the choice's.

Everything here stays on the node: the decision is stored with the adapter (client/store.py,
`GateDecision`) and applied when the node answers (client/inference.py). The evaluations run on the
states below the adapters that training caches (client/hidden.py), so they cost a forward pass of
the adapted layers over the held-out items, a fraction of a training epoch.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from client.hidden import HiddenStates
from client.resident import PERSONAL, SHARED, ResidentModel, weighted
from client.store import GateDecision
from client.training import Example, TrainResult, evaluation_loss, train_slot
from common.adapters import StateDict, clone_state
from common.config import RunConfig


def personal_steps(config: RunConfig, examples: Sequence[Example]) -> int:
    """The personal-epochs budget in optimizer steps."""
    return math.ceil(len(examples) * config.personal_epochs / config.batch_size)


def train_personal(
    resident: ResidentModel,
    config: RunConfig,
    examples: Sequence[Example],
    steps: int,
    *,
    start: StateDict | None,
    seed: int,
    autocast_bf16: bool,
    hidden: HiddenStates | None,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> TrainResult:
    """The personal slot trained from `start` (None: a fresh adapter) with the run's personal optimizer
    settings, on top of whatever the shared slot holds."""
    resident.load(PERSONAL, start)
    resident.use(personal=True)
    return train_slot(
        resident,
        PERSONAL,
        examples,
        steps=steps,
        batch_size=config.batch_size,
        micro_batch_size=config.micro_batch_size,
        learning_rate=config.personal_learning_rate,
        seed=seed,
        autocast_bf16=autocast_bf16,
        hidden=hidden,
        on_step=on_step,
    )


MIN_HOLDOUT = 2  # held-out items at least; a user needs twice as many to be split at all
PATIENCE = 2  # held-out evaluations without a gain before personal training stops


@dataclass(frozen=True)
class Split:
    train: tuple[int, ...]  # indices into the user's history
    holdout: tuple[int, ...]


def holdout_split(size: int, fraction: float, seed: int, user_id: str) -> Split | None:
    """The user's held-out history items, drawn from the run's seed and the user id; None when the
    history is too short to hold `MIN_HOLDOUT` items out and train on as many."""
    count = max(MIN_HOLDOUT, round(fraction * size))
    if size - count < MIN_HOLDOUT:
        return None
    rng = random.Random(seed * 1_000_003 + zlib.crc32(user_id.encode()))
    holdout = sorted(rng.sample(range(size), count))
    chosen = set(holdout)
    return Split(tuple(i for i in range(size) if i not in chosen), tuple(holdout))


@dataclass(frozen=True)
class Candidate:
    loss: float
    shared_weight: float
    personal: StateDict | None  # None: the shared adapter alone
    step: int = 0


def evaluation_steps(steps: int, evaluations: int) -> set[int]:
    """`evaluations` steps spread evenly over `steps`, the last one included."""
    return {max(1, round(steps * k / evaluations)) for k in range(1, evaluations + 1)} if steps else set()


def gated_personal_adapter(
    config: RunConfig,
    resident: ResidentModel,
    examples: Sequence[Example],
    shared: StateDict | None,
    start: StateDict,
    *,
    user_id: str,
    seed: int,
    autocast_bf16: bool,
    hidden: HiddenStates | None,
) -> tuple[StateDict, float, GateDecision]:
    """Train one user's personal adapter under the gate (the module's docstring); returns the adapter
    to store (the identity when the shared adapter alone is chosen), its mean training loss and the
    decision. `start` is where personal training begins; `shared` the shared adapter (None: none)."""
    split = holdout_split(len(examples), config.personal_holdout, config.seed, user_id)
    if split is None:
        resident.load(PERSONAL, None)
        return (
            resident.state(PERSONAL),
            math.nan,
            GateDecision(config.gate_setting, uses_personal=False, reason="short-history"),
        )
    if hidden is None and resident.specs.first_layer:
        hidden = HiddenStates(resident, limit_bytes=2**62)  # this user's states, for this call
    train = [examples[i] for i in split.train]
    holdout = [examples[i] for i in split.holdout]
    weights = config.gate_weights if shared is not None else (1.0,)
    shared = None if shared is None else clone_state(shared)  # not a view of a slot this call refills

    def held_out_loss() -> float:
        return evaluation_loss(
            resident, holdout, batch_size=config.batch_size, autocast_bf16=autocast_bf16, hidden=hidden
        )

    def loss_with(weight: float, personal: StateDict | None) -> float:
        resident.load(SHARED, None if shared is None else weighted(shared, weight))
        if personal is not None:
            resident.load(PERSONAL, personal)
        resident.use(personal=personal is not None)
        return held_out_loss()

    candidates = [Candidate(loss_with(w, None), w, None) for w in weights]
    base = min(candidates, key=lambda c: c.loss)  # first of equals: the larger weight
    resident.load(SHARED, None if shared is None else weighted(shared, base.shared_weight))
    steps = personal_steps(config, train)
    checks = evaluation_steps(steps, config.personal_gate_evals)
    best, since_best = None, 0

    def on_step(step: int, _loss: float) -> bool:
        """Early stopping: keep the state with the lowest held-out loss; stop after PATIENCE misses."""
        nonlocal best, since_best
        if step not in checks:
            return False
        loss = held_out_loss()
        if best is None or loss < best.loss:
            best = Candidate(loss, base.shared_weight, clone_state(resident.state(PERSONAL)), step)
            since_best = 0
        else:
            since_best += 1
        return since_best >= PATIENCE

    result = train_personal(
        resident,
        config,
        train,
        steps,
        start=start,
        seed=seed,
        autocast_bf16=autocast_bf16,
        hidden=hidden,
        on_step=on_step,
    )
    if best is not None:  # and the kept adapter with the shared adapter at the other weights
        candidates.append(best)
        candidates += [
            Candidate(loss_with(w, best.personal), w, best.personal, best.step)
            for w in weights
            if w != best.shared_weight
        ]
    chosen = min(candidates, key=lambda c: c.loss)  # first of equals: no personal adapter, larger weight
    resident.load(PERSONAL, chosen.personal)  # None: the identity, which is what is stored
    if chosen.personal is not None and config.personal_gate_refit:
        # The same share of the budget on the whole history: the held-out items are too many of a light
        # user's few to leave out of the adapter that answers.
        budget = personal_steps(config, examples)
        resident.load(SHARED, None if shared is None else weighted(shared, base.shared_weight))
        result = train_personal(
            resident,
            config,
            examples,
            round(budget * chosen.step / steps),
            start=start,
            seed=seed,
            autocast_bf16=autocast_bf16,
            hidden=hidden,
        )
    decision = GateDecision(
        config.gate_setting,
        shared_weight=chosen.shared_weight,
        uses_personal=chosen.personal is not None,
        epochs=chosen.step * config.batch_size / len(train),
        holdout_loss=chosen.loss,
        holdout_items=len(holdout),
    )
    return resident.state(PERSONAL), result.loss, decision
