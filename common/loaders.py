"""Per-user data sets: one normalized shape for LaMP's, OPPU's and plain JSONL layouts.

Every layout becomes users with an oldest-first history (what a private adapter trains on) and held-out
queries with gold outputs. Loading is strict (common.data's readers): a malformed record fails with the
file, the record and the field named.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

from common.config import VALIDATION, RunConfig
from common.data import QUERY_GROUPS, Dataset, Item, User, parse_date, require, require_id
from common.io import DataError, read_json
from common.synthetic import BenchmarkConfig, make_benchmark
from common.tasks import Task, get_task


def _oldest_first(items: list[Item]) -> list[Item]:
    """Sort by date when every item has one; otherwise file order is the only time we know."""
    if all(item.date is not None for item in items):
        return sorted(items, key=lambda item: item.date)
    return items


def load_dataset(
    path: str | Path,
    task: str | None = None,
    *,
    queries_per_user: int = 3,
    query_fraction: float | None = None,
) -> Dataset:
    """Load any supported layout; `task` overrides the task named in the data's label file.

    A directory holds user_history.json + user_labels.json (OPPU), questions.json + outputs.json (LaMP),
    or exactly one .jsonl file. Explicit files work too: user_history.json, a LaMP `*questions.json`
    (its labels are the sibling with "questions" replaced by "outputs") or a `.jsonl` file.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "user_history.json").is_file():
            return _load_oppu(path / "user_history.json", path / "user_labels.json", task)
        if (path / "questions.json").is_file():
            return _load_lamp(path / "questions.json", path / "outputs.json", task)
        jsonl = sorted(path.glob("*.jsonl"))
        if len(jsonl) == 1:
            return _load_jsonl(jsonl[0], task, queries_per_user, query_fraction)
        raise DataError(
            f"{path}: no data set found: expected user_history.json + user_labels.json (OPPU layout), "
            f"questions.json + outputs.json (LaMP layout) or exactly one .jsonl file "
            f"(found {len(jsonl)} .jsonl files)"
        )
    if path.suffix == ".jsonl":
        return _load_jsonl(path, task, queries_per_user, query_fraction)
    if path.name.endswith("questions.json"):
        return _load_lamp(path, path.with_name(path.name.replace("questions", "outputs")), task)
    if path.is_file():
        return _load_oppu(path, path.with_name("user_labels.json"), task)
    raise DataError(f"{path}: file not found")


def _resolve_task(name: str | None, labels: Any, labels_path: Path, sample: Any) -> Task:
    """The task from the caller, else from the label file's 'task' field.

    LaMP's own files call both LaMP-2 variants "LaMP_2", so the profile's fields decide between them.
    """
    where = "task argument"
    if name is None:
        name, where = require(labels, "task", str, str(labels_path)), f"{labels_path}: field 'task'"
    if name.strip().lower().replace("_", "-") == "lamp-2":
        name = "LaMP-2M" if isinstance(sample, dict) and "description" in sample else "LaMP-2N"
    try:
        return get_task(name)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def _read_golds(labels: Any, path: Path) -> dict[str, str]:
    """Gold outputs by query id, from LaMP's `{task, golds: [{id, output}]}` shape."""
    golds: dict[str, str] = {}
    for index, record in enumerate(require(labels, "golds", list, str(path))):
        where = f"{path}: golds[{index}]"
        gold_id = require_id(record, "id", where)
        if gold_id in golds:
            raise DataError(f"{where}: duplicate id {gold_id!r}")
        golds[gold_id] = require(record, "output", str, f"{where} (id {gold_id!r})")
    return golds


class _Queries:
    """Builds query Items against the gold file and checks that queries and golds match one to one."""

    def __init__(self, task: Task, golds: dict[str, str], labels_path: Path) -> None:
        self.task, self.golds, self.labels_path = task, golds, labels_path
        self.seen: set[str] = set()

    def item(self, record: Any, where: str) -> Item:
        query_id = require_id(record, "id", where)
        where = f"{where} (id {query_id!r})"
        if query_id in self.seen:
            raise DataError(f"{where}: duplicate query id {query_id!r}")
        self.seen.add(query_id)
        text = self.task.input_from_question(require(record, "input", str, where))
        if query_id not in self.golds:
            raise DataError(
                f"{where}: query has no gold output: id {query_id!r} is missing from {self.labels_path}"
            )
        output = self.task.check_output(self.golds[query_id], f"{self.labels_path}: gold for id {query_id!r}")
        return Item(query_id, text, output)

    def check_all_used(self) -> None:
        unused = [gold_id for gold_id in self.golds if gold_id not in self.seen]
        if unused:
            raise DataError(
                f"{self.labels_path}: {len(unused)} gold id(s) match no query, e.g. {unused[:3]}; "
                f"expected exactly one gold per query"
            )


def _history(task: Task, profile: Any, where: str) -> list[Item]:
    if not isinstance(profile, list):
        raise DataError(f"{where}: field 'profile' must be a list, got {type(profile).__name__}")
    if not profile:
        raise DataError(f"{where}: empty history: field 'profile' must hold at least one item")
    return _oldest_first([task.item_from_profile(p, f"{where}, profile[{j}]") for j, p in enumerate(profile)])


def _first_profile_record(records: Any) -> Any:
    """A sample profile record (or None) used only to tell the LaMP-2 variants apart."""
    for record in records if isinstance(records, list) else []:
        profile = record.get("profile") if isinstance(record, dict) else None
        if isinstance(profile, list) and profile:
            return profile[0]
    return None


def _top_list(data: Any, path: Path, what: str) -> list:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of {what} at the top level, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no {what}")
    return data


def _load_oppu(history_path: Path, labels_path: Path, task_name: str | None) -> Dataset:
    records = _top_list(read_json(history_path), history_path, "users")
    labels = read_json(labels_path)
    task = _resolve_task(task_name, labels, labels_path, _first_profile_record(records))
    queries = _Queries(task, _read_golds(labels, labels_path), labels_path)
    users: list[User] = []
    seen_users: set[str] = set()
    for index, record in enumerate(records):
        user_id = require_id(record, "user_id", f"{history_path}: user {index}")
        where = f"{history_path}: user {index} (user_id {user_id!r})"
        if user_id in seen_users:
            raise DataError(f"{where}: duplicate user_id {user_id!r}")
        seen_users.add(user_id)
        history = _history(task, require(record, "profile", list, where), where)
        query_records = require(record, "query", list, where)
        user_queries = [queries.item(q, f"{where}, query[{j}]") for j, q in enumerate(query_records)]
        groups = {
            query.id: group
            for j, (q, query) in enumerate(zip(query_records, user_queries, strict=True))
            if (group := _query_group(q, f"{where}, query[{j}]")) is not None
        }
        users.append(User(user_id, history, user_queries, groups))
    queries.check_all_used()
    return Dataset(task.name, users, str(history_path.parent))


def _query_group(record: dict, where: str) -> str | None:
    """A query's optional 'group' (common.data.QUERY_GROUPS), e.g. the behaviour-shift benchmark's."""
    if "group" not in record:
        return None
    group = require(record, "group", str, where)
    if group not in QUERY_GROUPS:
        raise DataError(f"{where}: field 'group' is {group!r}; expected one of {list(QUERY_GROUPS)}")
    return group


def _load_lamp(questions_path: Path, outputs_path: Path, task_name: str | None) -> Dataset:
    """LaMP's layout: each question carries its user's whole profile.

    Questions are grouped into users by 'user_id' when present, else by identical profile; a user's
    history is the profile of their first question.
    """
    records = _top_list(read_json(questions_path), questions_path, "questions")
    outputs = read_json(outputs_path)
    task = _resolve_task(task_name, outputs, outputs_path, _first_profile_record(records))
    queries = _Queries(task, _read_golds(outputs, outputs_path), outputs_path)
    users: dict[str, User] = {}
    for index, record in enumerate(records):
        where = f"{questions_path}: question {index}"
        profile = require(record, "profile", list, where)
        if "user_id" in record:
            user_id = require_id(record, "user_id", where)
            key = f"id:{user_id}"
        else:
            user_id = f"u{len(users):03d}"
            key = json.dumps(profile, sort_keys=True)
        if key not in users:
            users[key] = User(user_id, _history(task, profile, where), [])
        users[key].queries.append(queries.item(record, where))
    queries.check_all_used()
    return Dataset(task.name, list(users.values()), str(questions_path.parent))


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lines: list[tuple[int, dict]] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {lineno}: not valid JSON ({err.msg}, column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {lineno}: expected an object, got {type(record).__name__}")
            lines.append((lineno, record))
    if not lines:
        raise DataError(f"{path}: no items")
    return lines


def _load_jsonl(
    path: Path, task_name: str | None, queries_per_user: int, query_fraction: float | None
) -> Dataset:
    """One item per line; each user's newest items (by date, then file order) become the queries."""
    if queries_per_user < 1 or (query_fraction is not None and not 0 < query_fraction < 1):
        raise DataError(f"{path}: need queries_per_user >= 1 and 0 < query_fraction < 1")
    task = _resolve_task(task_name or "generic", None, path, None)
    items: dict[str, list[Item]] = {}
    seen_ids: set[str] = set()
    for lineno, record in _read_jsonl(path):
        where = f"{path}: line {lineno}"
        user_id = require_id(record, "user_id", where)
        item_id = require_id(record, "id", where) if "id" in record else f"{user_id}-{lineno}"
        if item_id in seen_ids:
            raise DataError(f"{where}: duplicate id {item_id!r}")
        seen_ids.add(item_id)
        output = task.check_output(require(record, "output", str, where), f"{where}: field 'output'")
        item = Item(item_id, require(record, "input", str, where), output, parse_date(record, where))
        items.setdefault(user_id, []).append(item)
    users = []
    for user_id, user_items in items.items():
        if len(user_items) < 2:
            raise DataError(
                f"{path}: user {user_id!r} has {len(user_items)} item; expected at least 2 "
                f"(one for the history, one for the queries)"
            )
        ordered = _oldest_first(user_items)
        wanted = round(query_fraction * len(ordered)) if query_fraction is not None else queries_per_user
        split = len(ordered) - min(max(wanted, 1), len(ordered) - 1)
        users.append(User(user_id, ordered[:split], ordered[split:]))
    return Dataset(task.name, users, str(path))


def validation_split(dataset: Dataset) -> Dataset:
    """Each user's newest history items as their queries, as many as the user has test queries and at
    most half the history: LaMP's time-based split taken one step earlier, so settings are chosen on
    data that precedes the test queries and never on them."""
    users = []
    for user in dataset.users:
        held = min(len(user.queries), len(user.history) // 2)
        if held < 1:
            raise DataError(
                f"{dataset.source}: user {user.user_id!r} has {len(user.history)} history item(s); "
                "split = 'validation' takes the newest items (up to half) as the user's queries and "
                "needs at least 2"
            )
        users.append(User(user.user_id, user.history[:-held], user.history[-held:]))
    return Dataset(dataset.task, users, dataset.source)


@functools.lru_cache(maxsize=4)
def _load_cached(data: str, task: str, bench: BenchmarkConfig | None, max_users: int, split: str) -> Dataset:
    dataset = make_benchmark(bench) if bench is not None else load_dataset(data, task or None)
    if max_users > 0:
        dataset.users = dataset.users[:max_users]
    return validation_split(dataset) if split == VALIDATION else dataset


def load_run_dataset(config: RunConfig, data_path: str | None = None) -> Dataset:
    """The run's data set (`data_path` overrides the config's `data`); cached, since every round and
    method of a run reads the same users."""
    data = data_path or config.data
    bench = BenchmarkConfig.from_run_config(config) if data == "builtin" else None
    return _load_cached(data, config.task, bench, config.max_users, config.split)


def num_partitions(num_users: int, users_per_client: int) -> int:
    """Simulation: how many clients host `users_per_client` users each."""
    return math.ceil(num_users / users_per_client)


def partition(users: list[User], partition_id: int, users_per_client: int) -> list[User]:
    """Simulation: the block of users client `partition_id` hosts."""
    return users[partition_id * users_per_client : (partition_id + 1) * users_per_client]
