"""fedoppu ClientApp: trains the shared adapter, trains and keeps personal adapters, evaluates.

Three message types arrive from the ServerApp:
- `train`: train the shared adapter on this node's users' history; reply with it and scalar metrics.
- `train.personalize`: train each user's personal adapter for one method and store it on this
  node's disk; reply with scalar metrics only.
- `evaluate`: answer every user's queries with one method; reply with metric counts only.
`privacy_guard_mod` checks every reply before it leaves: personal tensors and text never do.
"""

from __future__ import annotations

import functools
import math
import time
import zlib

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.adapters import PERSONAL, SHARED, AdapterSpec, ResidentModel, state_digest
from client.inference import answer_users
from client.mods import audit_mod, privacy_guard_mod, privacy_layer_mod
from client.store import PersonalAdapterStore
from client.training import train_slot
from client.users import NodeUsers, node_users
from common.config import RunConfig
from common.methods import METHODS, Method
from common.metrics import merge_counts, metric_counts
from common.model import load_base_model
from common.profiles import history_fingerprint

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def resident_model(model: str, dtype: str, spec: AdapterSpec) -> ResidentModel:
    """The base model, loaded once per process and reused by every round, user and method."""
    base, tokenizer = load_base_model(model, dtype)
    return ResidentModel(base, tokenizer, spec)


@functools.lru_cache(maxsize=256)  # a simulation worker serves many partitions, every round
def _node(config: RunConfig, node_items: tuple, run_dir: str) -> NodeUsers:
    return node_users(config, dict(node_items), run_dir)


def setup(msg: Message, context: Context) -> tuple[RunConfig, ResidentModel, NodeUsers]:
    config = RunConfig.from_mapping(context.run_config)
    resident = resident_model(config.model, config.dtype, AdapterSpec.from_config(config))
    node = _node(config, tuple(sorted(context.node_config.items())), config.run_dir)
    return config, resident, node


def shared_from(msg: Message) -> dict[str, torch.Tensor] | None:
    if "arrays" not in msg.content.array_records:
        return None
    return msg.content.array_records["arrays"].to_torch_state_dict()


def build_client_app(mods=()) -> ClientApp:
    app = ClientApp(mods=[*mods, privacy_guard_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config, resident, node = setup(msg, context)
        shared = shared_from(msg)
        if shared is None:
            raise ValueError("train message carries no 'arrays' record (the shared adapter)")
        resident.load(SHARED, shared)
        resident.use(personal=False)
        examples = [e for ctx in node.contexts for e in ctx.examples(resident, rag=False, profile=False)]
        train_config = msg.content["config"]
        server_round = int(train_config["server-round"]) + int(train_config.get("round-offset", 0))
        # Simulation numbers nodes by partition; a deployed node has only its node id.
        pid = int(context.node_config.get("partition-id", context.node_id))
        started = time.perf_counter()
        result = train_slot(
            resident,
            SHARED,
            examples,
            steps=config.local_steps,
            batch_size=config.batch_size,
            micro_batch_size=config.micro_batch_size,
            learning_rate=config.learning_rate,
            seed=config.seed * 100_003 + server_round * 7_919 + pid,
            autocast_bf16=config.autocast_bf16,
            proximal_mu=float(train_config.get("proximal-mu", 0.0)),
        )
        wire = WIRE_DTYPES[config.wire_dtype]
        arrays = ArrayRecord({k: v.detach().to(wire) for k, v in resident.state(SHARED).items()})
        metrics = MetricRecord(
            {
                # Under a privacy setting every client weighs the same (user-level sensitivity).
                "num-examples": 1 if config.uniform_client_weights else len(examples),
                "train-loss": result.loss,
                "train-steps": result.steps,
                "train-tokens": result.tokens,
                "train-seconds": time.perf_counter() - started,
                "bytes-sent": sum(a.numpy().nbytes for a in arrays.values()),
            }
        )
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.train("personalize")
    def personalize(msg: Message, context: Context) -> Message:
        config, resident, node = setup(msg, context)
        method = _method(msg)
        shared = shared_from(msg) if method.shared else None
        resident.load(SHARED, shared)
        shared_digest = state_digest(shared) if shared is not None else "none"
        store = PersonalAdapterStore(node.state_dir)
        shared_round = msg.content["config"].get("shared-round") if shared is not None else None
        losses, trained, reused, started = [], 0, 0, time.perf_counter()
        for ctx in node.contexts:
            uid = ctx.user.user_id
            examples = ctx.examples(resident, rag=method.rag, profile=method.profile)
            fingerprint = history_fingerprint(ctx.user.history)
            stored = store.load(method.name, uid)
            if stored and (stored[0].shared_digest, stored[0].data_fingerprint) == (
                shared_digest,
                fingerprint,
            ):
                reused += 1
                continue
            seed = config.seed * 1_000_003 + zlib.crc32(uid.encode())
            resident.load(PERSONAL, stored[1] if stored else resident.fresh(PERSONAL, seed))
            resident.use(personal=True)
            result = train_slot(
                resident,
                PERSONAL,
                examples,
                steps=math.ceil(len(examples) * config.personal_epochs / config.batch_size),
                batch_size=config.batch_size,
                micro_batch_size=config.micro_batch_size,
                learning_rate=config.personal_learning_rate,
                seed=seed,
                autocast_bf16=config.autocast_bf16,
            )
            store.save(
                method.name,
                uid,
                resident.state(PERSONAL),
                resident.spec.peft_config(),
                shared_digest=shared_digest,
                data_fingerprint=fingerprint,
                shared_version=None if shared_round is None else int(shared_round),
            )
            losses.append(result.loss)
            trained += 1
        metrics = {
            "num-users": len(node.contexts),
            "users-trained": trained,
            "users-reused": reused,
            "personal-seconds": time.perf_counter() - started,
        }
        if losses:
            metrics["personal-loss"] = sum(losses) / len(losses)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        config, resident, node = setup(msg, context)
        method = _method(msg)
        resident.load(SHARED, shared_from(msg) if method.shared else None)
        personal = None
        if method.personal:
            store = PersonalAdapterStore(node.state_dir)
            personal = [_stored_personal(store, method, ctx.user.user_id) for ctx in node.contexts]
        answers = answer_users(
            resident,
            [ctx.query_prompts(resident, rag=method.rag, profile=method.profile) for ctx in node.contexts],
            personal,
            max_new_tokens=node.task.max_new_tokens,
            max_prompt_tokens=config.max_seq_len,
            autocast_bf16=config.autocast_bf16,
        )
        replies: dict[str, MetricRecord] = {}
        user_counts: list[dict[str, float]] = []
        for ctx, user_answers in zip(node.contexts, answers, strict=True):
            counts = metric_counts(node.task, user_answers, [q.output for q in ctx.queries()])
            user_counts.append(counts)
            replies[f"user:{ctx.user.user_id}"] = MetricRecord({**counts, "history": len(ctx.user.history)})
        total = merge_counts(*user_counts) if user_counts else {"n": 0}
        replies["metrics"] = MetricRecord({**total, "num-examples": int(total["n"])})
        return Message(RecordDict(replies), reply_to=msg)

    return app


def _stored_personal(store: PersonalAdapterStore, method: Method, user_id: str) -> dict[str, torch.Tensor]:
    stored = store.load(method.name, user_id)
    if stored is None:
        raise RuntimeError(
            f"no valid personal adapter '{method.name}' for user {user_id} in {store.root}: personalize before evaluating"
        )
    return stored[1]


def _method(msg: Message) -> Method:
    name = str(msg.content["config"]["method"])
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


app = build_client_app(mods=[audit_mod, privacy_layer_mod])
