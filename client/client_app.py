"""fedoppu ClientApp: trains the shared adapter, trains and keeps personal adapters, evaluates.

One handler per message type of the protocol (common/protocol.py):
- `train`: train the shared adapter on this node's users' history; reply with it and scalar metrics.
- `train.personalize`: train each user's personal adapter for one method and store it on this
  node's disk; reply with scalar metrics only.
- `evaluate`: answer every user's queries with one method; reply with metric counts only.
Around it all, `error_code_mod` turns any exception into a generic code. The mods, outermost first:
`audit_mod` logs what leaves, `privacy_layer_mod` admits the run's privacy setting under the node's
policy and clips, noises or masks the shared adapter of a `train` reply, and `PrivacyGuard` checks
every reply the handlers produce against the allowlist (client/mods.py): personal tensors and text
never leave. The node's policy (client/policy.py) also decides what evaluation reveals per user: a
pseudonym instead of the id, no history size or per-label counts unless allowed, and no record that
sums fewer than `min-group-size` answers. Under any privacy setting the metrics that depend on the
users' data (loss, tokens, time) stay on the node.
"""

from __future__ import annotations

import functools
import math
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from client.gate import gated_personal_adapter, personal_steps, train_personal
from client.hidden import HIDDEN_DIR, HiddenStates, HiddenStore, persisted
from client.inference import answer_users
from client.mods import GuardedClientApp, PrivacyGuard, ReplyRules, audit_mod, privacy_layer_mod
from client.policy import (
    BadRequest,
    NodePolicy,
    PrivacyLedger,
    node_policy,
    node_secret,
    pseudonym,
    release_multiplier,
)
from client.prefill import PromptPrefills
from client.resident import PERSONAL, SHARED, ResidentModel
from client.store import AdapterRecord, GateDecision, PersonalAdapterStore
from client.training import train_slot
from client.users import NodeUsers, UserContext, node_users
from common import protocol
from common.accounting import noise_multiplier
from common.adapters import FFA_FROZEN, AdapterSpecs, StateDict, frozen_lora_a, state_digest
from common.config import RunConfig
from common.device import bound_gpu_memory, resolve_device
from common.methods import METHODS, Method
from common.metrics import group_counts, grouped_metric_counts, merge_counts, split_groups
from common.model import load_base_model
from common.precision import compute_precision
from common.profiles import history_fingerprint

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def resident_model(model: str, dtype: str, specs: AdapterSpecs, device: str) -> ResidentModel:
    """The base model on the run's `device` (auto: this node's GPU if it has one), loaded once per
    process and reused by every round, user and method."""
    where = resolve_device(device)
    bound_gpu_memory(where)
    base, tokenizer = load_base_model(model, dtype)
    return ResidentModel(base, tokenizer, specs, where)


@functools.lru_cache(maxsize=1)
def hidden_states(resident: ResidentModel, limit_mb: int) -> HiddenStates | None:
    """The states below the adapters, kept for the life of the process; None with adapters on every layer."""
    return HiddenStates(resident, limit_mb * 2**20) if resident.specs.first_layer else None


@functools.lru_cache(maxsize=1)
def prompt_prefills(resident: ResidentModel, limit_mb: int) -> PromptPrefills | None:
    """The query prompts' prefill below the adapters, kept for the life of the process (client/prefill.py)."""
    return PromptPrefills(resident, limit_mb * 2**20) if resident.specs.first_layer else None


# A simulation worker serves every partition, each round and phase in turn: the cache holds them all
# (measured: about 170 KB per user of 100 history items, so 45 MB for commit-subjects-sympy's 266),
# since an LRU smaller than the federation misses on every message.
@functools.lru_cache(maxsize=4096)
def _node(config: RunConfig, node_items: tuple, run_dir: str, policy: NodePolicy) -> NodeUsers:
    return node_users(config, dict(node_items), run_dir, policy)


def setup(context: Context) -> tuple[RunConfig, ResidentModel, NodeUsers]:
    config = RunConfig.from_mapping(context.run_config)
    policy = node_policy(context.node_config)
    node = _node(config, tuple(sorted(context.node_config.items())), config.run_dir, policy)
    resident = resident_model(config.model, config.dtype, AdapterSpecs.from_config(config), config.device)
    return config, resident, node


def requested_method(msg: Message) -> Method:
    name = str(protocol.config_value(msg, protocol.METHOD, ""))
    if name not in METHODS:
        raise BadRequest(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def released(message_type: str, privacy: str, metrics: dict[str, float]) -> MetricRecord:
    """The reply's metrics that may leave under this privacy setting (protocol.reply_metric_names)."""
    allowed = protocol.reply_metric_names(message_type, privacy)
    return MetricRecord({k: v for k, v in metrics.items() if k in allowed})


def user_names(node: NodeUsers, msg: Message) -> list[str]:
    """How each user appears in this evaluate reply: a pseudonym in the run's scope, or the raw id
    where the node's policy allows it."""
    ids = [ctx.user.user_id for ctx in node.contexts]
    if node.policy.user_ids == "raw":
        return ids
    scope = str(protocol.config_value(msg, protocol.USER_SCOPE, "")) or str(msg.metadata.run_id)
    secret = node_secret(node.state_dir)
    return [pseudonym(secret, scope, user_id) for user_id in ids]


def node_metric_names(node: NodeUsers) -> frozenset[str]:
    """The node's own evaluate record: its per-label counts only where they cover two users or more
    (or the policy allows them per user anyway)."""
    labels = len(node.contexts) >= 2 or node.policy.per_user_label_counts
    return protocol.evaluate_metric_names(node.task, labels=labels, history=False) | {protocol.NUM_EXAMPLES}


def user_metric_names(node: NodeUsers) -> frozenset[str]:
    policy = node.policy
    return protocol.evaluate_metric_names(
        node.task, labels=policy.per_user_label_counts, history=policy.per_user_history
    )


def personal_tensors(resident: ResidentModel, node: NodeUsers) -> Iterator[torch.Tensor]:
    """Every personal adapter tensor this node holds: the personal slot and each stored adapter."""
    yield from resident.state(PERSONAL).values()
    store = PersonalAdapterStore(node.state_dir)
    for record in store.records():
        stored = store.load(record.variant, record.user_id)
        if stored is not None:
            yield from stored[1].values()


def reply_rules(msg: Message, context: Context) -> ReplyRules:
    config, resident, node = setup(context)
    evaluate = msg.metadata.message_type == protocol.EVALUATE
    return ReplyRules(
        privacy=config.privacy,
        node_metrics=node_metric_names(node),
        user_metrics=user_metric_names(node),
        user_records=frozenset(protocol.user_record(n) for n in user_names(node, msg))
        if evaluate
        else frozenset(),
        personal_tensors=lambda: personal_tensors(resident, node),
    )


app = GuardedClientApp(mods=[audit_mod, privacy_layer_mod, PrivacyGuard(reply_rules)])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of the shared adapter on every user this node hosts."""
    config, resident, node = setup(context)
    sent = protocol.shared_adapter(msg)
    if sent is None:
        raise BadRequest(f"train message carries no '{protocol.ARRAYS}' record (the shared adapter)")
    # FFA-LoRA: only B travels; A is this node's own derivation of the run's seeded draw.
    frozen = (FFA_FROZEN,) if config.shared_ffa_lora else ()
    shared = {**sent, **frozen_lora_a(config.model, resident.specs.shared, config.seed)} if frozen else sent
    resident.load(SHARED, shared)  # a malformed adapter fails here, before it costs any budget
    resident.use(personal=False)
    server_round = int(protocol.config_value(msg, protocol.SERVER_ROUND)) + int(
        protocol.config_value(msg, protocol.ROUND_OFFSET, 0)
    )
    num_weights = sum(t.numel() for t in sent.values())
    multiplier = release_multiplier(
        config.privacy, noise_multiplier(config), config.clipping_norm, num_weights
    )
    ledger = PrivacyLedger(node.state_dir)
    ledger.admit(node.policy, msg.metadata.run_id, server_round, config.privacy, multiplier)
    per_user = {ctx.user.user_id: ctx.examples(resident, rag=False, profile=False) for ctx in node.contexts}
    examples = [e for user_examples in per_user.values() for e in user_examples]
    bf16 = compute_precision(config).bf16
    hidden = hidden_states(resident, config.hidden_cache_mb)
    # Simulation numbers nodes by partition; a deployed node has only its node id.
    pid = int(context.node_config.get("partition-id", context.node_id))
    started = time.perf_counter()
    with persisted(hidden, HiddenStore(node.state_dir / HIDDEN_DIR), per_user, bf16):
        result = train_slot(
            resident,
            SHARED,
            examples,
            steps=config.local_steps,
            batch_size=config.batch_size,
            micro_batch_size=config.micro_batch_size,
            learning_rate=config.learning_rate,
            seed=config.seed * 100_003 + server_round * 7_919 + pid,
            autocast_bf16=bf16,
            proximal_mu=float(protocol.config_value(msg, protocol.PROXIMAL_MU, 0.0)),
            hidden=hidden,
            frozen=frozen,
            optimizer=config.shared_optimizer,
        )
    wire = WIRE_DTYPES[config.wire_dtype]
    trained = resident.state(SHARED)
    arrays = ArrayRecord({k: trained[k].detach().to(wire) for k in sent})  # exactly the tensors received
    metrics = released(
        protocol.TRAIN,
        config.privacy,
        {
            # Under a privacy setting every client weighs the same (user-level sensitivity).
            protocol.NUM_EXAMPLES: 1 if config.uniform_client_weights else len(examples),
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-tokens": result.tokens,
            "train-seconds": time.perf_counter() - started,
            "bytes-sent": sum(a.numpy().nbytes for a in arrays.values()),
        },
    )
    return Message(RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics}), reply_to=msg)


@app.train(protocol.PERSONALIZE_ACTION)
def personalize(msg: Message, context: Context) -> Message:
    """Train and store each user's personal adapter for one method, unless a stored one is current."""
    config, resident, node = setup(context)
    method = requested_method(msg)
    shared = protocol.shared_adapter(msg) if method.shared else None
    resident.load(SHARED, shared)
    shared_digest = state_digest(shared) if shared is not None else "none"
    shared_round = protocol.config_value(msg, protocol.SHARED_ROUND) if shared is not None else None
    gate_setting = gate_setting_for(config, method)
    store = PersonalAdapterStore(node.state_dir)
    losses, reused, started = [], 0, time.perf_counter()
    for ctx in node.contexts:
        stored = store.load(method.name, ctx.user.user_id)
        fingerprint = history_fingerprint(ctx.user.history)
        # A stored adapter of another layout (e.g. from a run with other adapter-layers or lora-r) is
        # neither current nor continued, nor is the identity kept for a user answered without one:
        # the user starts afresh.
        fits = stored is not None and resident.mismatch(PERSONAL, stored[1]) is None
        current = fits and (
            stored[0].shared_digest,
            stored[0].data_fingerprint,
            stored[0].gate.setting,
        ) == (shared_digest, fingerprint, gate_setting)
        if current:
            reused += 1
            continue
        continued = fits and stored[0].gate.uses_personal
        start = stored[1] if continued else None
        state, loss, gate = personal_adapter(config, resident, ctx, method, start, node.state_dir, shared)
        store.save(
            method.name,
            ctx.user.user_id,
            state,
            resident.specs.personal.peft_config(),
            shared_digest=shared_digest,
            data_fingerprint=fingerprint,
            shared_version=None if shared_round is None else int(shared_round),
            gate=gate,
        )
        if not math.isnan(loss):
            losses.append(loss)
    metrics = {
        "num-users": len(node.contexts),
        "users-trained": len(node.contexts) - reused,
        "users-reused": reused,
        "personal-seconds": time.perf_counter() - started,
    }
    if losses:
        metrics["personal-loss"] = sum(losses) / len(losses)
    reply = released(protocol.PERSONALIZE, config.privacy, metrics)
    return Message(RecordDict({protocol.METRICS: reply}), reply_to=msg)


def gate_setting_for(config: RunConfig, method: Method) -> str:
    """The gate a method's personal adapters are decided under: the run's for the methods built on
    the shared adapter; `local` trains as OPPU's original does."""
    return config.gate_setting if method.shared else GateDecision().setting


def personal_adapter(
    config: RunConfig,
    resident: ResidentModel,
    ctx: UserContext,
    method: Method,
    start: StateDict | None,
    state_dir: Path,
    shared: StateDict | None = None,
) -> tuple[StateDict, float, GateDecision]:
    """Train one user's personal adapter (from `start`, or a fresh one seeded by the user id) with the
    context its method answers with, on top of the shared adapter (`shared`, also in the shared slot);
    returns it, its mean training loss and how the user is answered with it. Under the run's gate
    (client/gate.py) the methods built on the shared adapter keep it only as far as it helps on the
    user's held-out history."""
    seed = config.seed * 1_000_003 + zlib.crc32(ctx.user.user_id.encode())
    start = start if start is not None else resident.fresh(PERSONAL, seed)
    examples = ctx.examples(resident, rag=method.rag, profile=method.profile)
    bf16 = compute_precision(config).bf16
    hidden = hidden_states(resident, config.hidden_cache_mb)
    with persisted(hidden, HiddenStore(state_dir / HIDDEN_DIR), {ctx.user.user_id: examples}, bf16):
        if gate_setting_for(config, method) != GateDecision().setting:
            return gated_personal_adapter(
                config,
                resident,
                examples,
                shared,
                start,
                user_id=ctx.user.user_id,
                seed=seed,
                autocast_bf16=bf16,
                hidden=hidden,
            )
        result = train_personal(
            resident,
            config,
            examples,
            personal_steps(config, examples),
            start=start,
            seed=seed,
            autocast_bf16=bf16,
            hidden=hidden,
        )
    return resident.state(PERSONAL), result.loss, GateDecision()


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Answer every user's queries with one method; reply with metric counts per user and in total."""
    config, resident, node = setup(context)
    method = requested_method(msg)
    resident.load(SHARED, protocol.shared_adapter(msg) if method.shared else None)
    personal, weights = None, None
    if method.personal:
        store = PersonalAdapterStore(node.state_dir)
        stored = [_stored_personal(store, method, ctx.user.user_id) for ctx in node.contexts]
        personal = [state if record.gate.uses_personal else None for record, state in stored]
        weights = [record.gate.shared_weight for record, _ in stored]
    answers = answer_users(
        resident,
        [ctx.query_prompts(resident, rag=method.rag, profile=method.profile) for ctx in node.contexts],
        personal,
        shared_weights=weights,
        max_new_tokens=node.task.max_new_tokens,
        max_prompt_tokens=config.max_seq_len,
        autocast_bf16=compute_precision(config).bf16,
        prefills=prompt_prefills(resident, config.hidden_cache_mb),
    )
    replies: dict[str, MetricRecord] = {}
    user_counts: list[dict[str, float]] = []
    minimum, per_user = node.policy.min_group_size, user_metric_names(node)
    for ctx, name, user_answers in zip(node.contexts, user_names(node, msg), answers, strict=True):
        queries = ctx.queries()
        golds, groups = [q.output for q in queries], [ctx.user.query_group(q) for q in queries]
        counts = grouped_metric_counts(node.task, user_answers, golds, groups)
        user_counts.append(counts)
        if counts["n"] >= minimum:  # a smaller group is counted in the node's total only
            record = {**releasable(counts, minimum), protocol.HISTORY_SIZE: len(ctx.user.history)}
            replies[protocol.user_record(name)] = MetricRecord(
                {k: v for k, v in record.items() if k in per_user}
            )
    total = merge_counts(*user_counts) if user_counts else {"n": 0}
    own = {protocol.NUM_EXAMPLES: int(total["n"])}
    if total["n"] >= minimum:
        own |= {k: v for k, v in releasable(total, minimum).items() if k in node_metric_names(node)}
    replies[protocol.METRICS] = MetricRecord(own)
    return Message(RecordDict(replies), reply_to=msg)


def releasable(counts: dict[str, float], minimum: int) -> dict[str, float]:
    """A record's counts without the query groups that sum fewer than `minimum` answers (the node's
    min-group-size holds for every count a record carries)."""
    plain, groups = split_groups(counts)
    for group, own in groups.items():
        if own["n"] >= minimum:
            plain |= group_counts(group, own)
    return plain


def _stored_personal(
    store: PersonalAdapterStore, method: Method, user_id: str
) -> tuple[AdapterRecord, StateDict]:
    stored = store.load(method.name, user_id)
    if stored is None:
        raise RuntimeError(
            f"no valid personal adapter '{method.name}' for user {user_id} in {store.root}: personalize before evaluating"
        )
    return stored
