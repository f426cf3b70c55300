"""A node's users: which users it hosts, and their prompts with context, built once per process.

In simulation a partition id picks a block of `users-per-client` users; a deployed node instead
reads every user in its own data directory, with the task its data names (or its node config's
`task`, for data that names none): the run config cannot make a node read its users' outputs as
another task's. Prompts with retrieval or a profile are built here, on the client, so history and
profile text never leave it.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from client.policy import BadRequest, NodePolicy
from client.resident import ResidentModel
from client.store import PROFILES, node_state_dir
from client.training import Example, encode_example
from common.config import RunConfig
from common.data import Item, User
from common.loaders import load_run_dataset, partition
from common.profiles import ProfileCache, generated_profile, summary_profile
from common.prompts import build_prompt, target_text
from common.retrieval import HistoryRetriever
from common.tasks import Task, get_task


@dataclass
class UserContext:
    """One user's prompts under each context setting, memoized for the life of the process."""

    task: Task
    user: User
    config: RunConfig
    profiles: ProfileCache
    _cache: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def retriever(self) -> HistoryRetriever:
        return HistoryRetriever(self.task, self.user.history)

    def profile_text(self, resident: ResidentModel) -> str:
        mode = self.config.profile
        if mode == "summary":
            return self.profiles.get_or_build(self.user.user_id, mode, self.user.history, self._summary)
        with resident.peft.disable_adapter():
            return self.profiles.get_or_build(
                self.user.user_id,
                mode,
                self.user.history,
                lambda: generated_profile(self.task, self.user.history, resident.peft, resident.tokenizer),
            )

    def _summary(self) -> str:
        return summary_profile(self.task, self.user.history)

    def _prompt(self, text: str, retrieved, profile: str | None, tokenizer) -> str:
        return build_prompt(
            self.task,
            text,
            retrieved=retrieved,
            profile=profile,
            tokenizer=tokenizer,
            max_item_tokens=self.config.max_item_tokens,
            max_context_tokens=self.config.max_context_tokens,
        )

    def examples(self, resident: ResidentModel, *, rag: bool, profile: bool) -> list[Example]:
        """History items as training examples; with RAG, item i only retrieves items before it."""
        key = ("examples", rag, profile)
        if key not in self._cache:
            profile_text = self.profile_text(resident) if profile else None
            tokenizer = resident.tokenizer
            self._cache[key] = [
                encode_example(
                    tokenizer,
                    self._prompt(
                        item.input,
                        self.retriever.top_k(item.input, self.config.rag_k, before=i) if rag else (),
                        profile_text,
                        tokenizer,
                    ),
                    target_text(self.task, item),
                    self.config.max_seq_len,
                )
                for i, item in enumerate(self.user.history)
            ]
        return self._cache[key]

    def queries(self) -> list[Item]:
        """The queries answered: all, or the first `max-queries-per-user` of each query group."""
        limit = self.config.max_queries_per_user
        if limit <= 0:
            return self.user.queries
        taken: Counter[str | None] = Counter()
        kept = []
        for query in self.user.queries:
            group = self.user.query_group(query)
            if taken[group] < limit:
                taken[group] += 1
                kept.append(query)
        return kept

    def query_prompts(self, resident: ResidentModel, *, rag: bool, profile: bool) -> list[str]:
        key = ("queries", rag, profile)
        if key not in self._cache:
            profile_text = self.profile_text(resident) if profile else None
            self._cache[key] = [
                self._prompt(
                    q.input,
                    self.retriever.top_k(q.input, self.config.rag_k) if rag else (),
                    profile_text,
                    resident.tokenizer,
                )
                for q in self.queries()
            ]
        return self._cache[key]


@dataclass
class NodeUsers:
    task: Task
    contexts: list[UserContext]
    state_dir: Path
    policy: NodePolicy


PARTITION_DIR = "partition-"  # a simulated node's state directory: partition-<id>


def simulated_state_root(config: RunConfig, run_dir: str | Path) -> Path:
    """Where the simulated nodes keep their state, each in its own partition-<id> directory."""
    return Path(config.state_dir) if config.state_dir else Path(run_dir) / "clients"


def node_users(config: RunConfig, node_config: dict, run_dir: str, policy: NodePolicy) -> NodeUsers:
    """The users this node hosts, from its node config (deployment) or its partition id (simulation)."""
    data_path = node_config.get("data-path")
    if data_path:
        own_task = str(node_config.get("task", ""))
        dataset = load_run_dataset(config.replace(task=own_task), str(data_path))
        if config.task and get_task(config.task).name != dataset.task:
            raise BadRequest(f"the run asks for task {config.task!r}; this node's data is {dataset.task!r}")
        users = dataset.users
        state_dir = node_state_dir(str(data_path), node_config.get("state-dir"))
    else:
        dataset = load_run_dataset(config)
        pid = int(node_config.get("partition-id", 0))
        users = partition(dataset.users, pid, config.users_per_client)
        state_dir = simulated_state_root(config, run_dir) / f"{PARTITION_DIR}{pid}"
    task = get_task(dataset.task)
    profiles = ProfileCache(state_dir / PROFILES)
    return NodeUsers(task, [UserContext(task, u, config, profiles) for u in users], state_dir, policy)
