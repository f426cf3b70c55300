import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, replace

import pytest

from common.config import load_run_config
from common.data import IN_HISTORY, SHIFTED
from common.io import DataError
from common.loaders import load_dataset
from common.metrics import compute_metrics
from common.synthetic import BUILTIN_TASKS, SHIFT_THEMES, BenchmarkConfig, make_benchmark, write_benchmark
from common.tasks import BUILTIN_TAGS, TASKS
from simulations import data_commands


def population_answers(config):
    """The same draws at strength 0 give each item the population's answer: the population oracle."""
    twin = make_benchmark(replace(config, personal_strength=0.0))
    return {item.id: item.output for user in twin.users for item in user.history + user.queries}


def oracle_scores(task, strength, metric):
    """(population oracle, personal oracle) on the queries.

    The personal oracle learns each user's answer per population answer (theme, sentiment level) by
    majority vote over that user's own history, so it shows the personal rule is learnable from history.
    """
    config = BenchmarkConfig(task=task, num_users=40, personal_strength=strength, seed=7)
    dataset, population = make_benchmark(config), population_answers(config)
    golds, by_population, by_history = [], [], []
    for user in dataset.users:
        votes = defaultdict(Counter)
        for item in user.history:
            votes[population[item.id]][item.output] += 1
        for query in user.queries:
            key = population[query.id]
            golds.append(query.output)
            by_population.append(key)
            by_history.append(votes[key].most_common(1)[0][0] if votes[key] else key)
    return tuple(
        compute_metrics(TASKS[task], answers, golds)[metric] for answers in (by_population, by_history)
    )


def test_personal_tags_beat_the_population_only_when_personal():
    population, personal = oracle_scores("tagging", 1.0, "accuracy")
    assert personal - population > 0.4, (population, personal)
    assert population < 0.3 and personal > 0.85
    population, personal = oracle_scores("tagging", 0.0, "accuracy")
    assert population == pytest.approx(personal, abs=0.03) and population == 1.0


def test_personal_ratings_beat_the_population_only_when_personal():
    population, personal = oracle_scores("rating", 1.0, "mae")
    assert population - personal > 0.7, (population, personal)
    population, personal = oracle_scores("rating", 0.0, "mae")
    assert population == personal == 0.0


def test_personal_title_styles_move_away_from_the_population():
    config = BenchmarkConfig(task="title", num_users=20, personal_strength=1.0)
    population = population_answers(config)
    queries = [q for user in make_benchmark(config).users for q in user.queries]
    overlap = compute_metrics(
        TASKS["title"], [population[q.id] for q in queries], [q.output for q in queries]
    )
    assert overlap["rouge-1"] < 0.85
    half = make_benchmark(replace(config, personal_strength=0.5))
    changed = [q.output != population[q.id] for user in half.users for q in user.queries]
    assert 0.3 < sum(changed) / len(changed) < 0.7


@pytest.mark.parametrize("task", BUILTIN_TASKS)
def test_benchmark_shape_and_determinism(task):
    config = BenchmarkConfig(task=task, num_users=8, min_history=16, max_history=96, queries_per_user=5)
    dataset = make_benchmark(config)
    assert dataset.task == task and dataset.source == f"builtin:{task}"
    assert make_benchmark(config) == dataset
    assert make_benchmark(replace(config, seed=1)) != dataset
    lengths = sorted(len(user.history) for user in dataset.users)
    assert lengths[0] == 16 and lengths[-1] == 96 and 25 < lengths[4] < 60  # light, medium and heavy users
    assert all(len(user.queries) == 5 for user in dataset.users)
    labels = set(TASKS[task].labels) or ({"1", "2", "3", "4", "5"} if task == "rating" else None)
    for user in dataset.users:
        dates = [item.date for item in user.history]
        assert dates == sorted(dates) and None not in dates
        if labels:
            assert {item.output for item in user.history + user.queries} <= labels
    # the personal rule changes only the answers, never the inputs
    weaker = make_benchmark(replace(config, personal_strength=0.3))
    assert [[i.input for i in u.history] for u in weaker.users] == [
        [i.input for i in u.history] for u in dataset.users
    ]


# Each task's benchmark as it was drawn before behaviour shift existed (sha256 of every item, users in
# order): what `shifted_queries = 0` must keep drawing, bit for bit.
UNSHIFTED = {"tagging": "cafced17ee29d501", "rating": "7614c26c142070e7", "title": "6c0f8c73dfaccfde"}


@pytest.mark.parametrize("task", BUILTIN_TASKS)
def test_without_shifted_queries_the_benchmark_is_unchanged(task):
    dataset = make_benchmark(BenchmarkConfig(task=task, num_users=20, personal_strength=0.5, seed=3))
    payload = json.dumps([[asdict(i) for i in u.history + u.queries] for u in dataset.users], sort_keys=True)
    assert hashlib.sha256(payload.encode()).hexdigest()[:16] == UNSHIFTED[task]
    assert not any(user.query_groups for user in dataset.users)


def test_shifted_queries_are_on_themes_the_history_never_shows():
    config = BenchmarkConfig(
        num_users=40, queries_per_user=4, shifted_queries=3, personal_strength=1.0, seed=5
    )
    dataset = make_benchmark(config)
    assert make_benchmark(config) == dataset
    theme = population_answers(config)  # the population's tag names the theme: one tag per theme
    for user in dataset.users:
        shown = {theme[item.id] for item in user.history}
        assert len(shown) <= len(BUILTIN_TAGS) - SHIFT_THEMES  # the least liked themes are left out
        groups = [user.query_group(query) for query in user.queries]
        assert groups == [IN_HISTORY] * 4 + [SHIFTED] * 3
        for query, group in zip(user.queries, groups, strict=True):
            assert (theme[query.id] in shown) == (group == IN_HISTORY), (user.user_id, query.id)
            assert query.date is None
        # at strength 1 every theme is relabeled, the unseen ones too: a tag no history shows
        assert all(query.output != theme[query.id] for query in user.queries)
    assert len({len(user.history) for user in dataset.users}) > 10  # light to heavy users, as without


def test_a_shift_needs_tagging():
    with pytest.raises(ValueError, match="shifted_queries needs task tagging, not 'rating'"):
        BenchmarkConfig(task="rating", shifted_queries=2)
    with pytest.raises(ValueError, match="shifted_queries must be >= 0"):
        BenchmarkConfig(shifted_queries=-1)


@pytest.mark.parametrize("task", BUILTIN_TASKS)
def test_text_is_varied_and_short(task):
    dataset = make_benchmark(BenchmarkConfig(task=task, num_users=20))
    texts = [item.input for user in dataset.users for item in user.history + user.queries]
    assert len(set(texts)) / len(texts) > 0.9
    assert len({word.strip(".,!:").lower() for text in texts for word in text.split()}) > 150
    assert all(6 <= len(text.split()) <= 32 for text in texts)


def test_tagging_tags_are_single_short_words():
    assert len(BUILTIN_TAGS) == 8 and all(
        tag.isalpha() and tag.islower() and len(tag) <= 7 for tag in BUILTIN_TAGS
    )
    population = population_answers(BenchmarkConfig(num_users=10))
    assert set(population.values()) == set(BUILTIN_TAGS)


def test_make_benchmark_is_fast():
    for task in BUILTIN_TASKS:
        start = time.perf_counter()
        make_benchmark(BenchmarkConfig(task=task, num_users=100))
        assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "LaMP-2M"}, "unknown built-in task 'LaMP-2M'"),
        ({"personal_strength": 1.5}, r"personal_strength must be in \[0, 1\]"),
        ({"min_history": 50, "max_history": 10}, "1 <= min_history <= max_history"),
        ({"num_users": 0}, "num_users >= 1"),
    ],
)
def test_config_rejects_bad_knobs(change, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkConfig(**change)


@pytest.mark.parametrize(("task", "shifted"), [*((task, 0) for task in BUILTIN_TASKS), ("tagging", 2)])
def test_written_benchmark_loads_back_unchanged(tmp_path, task, shifted):
    config = BenchmarkConfig(task=task, num_users=3, min_history=4, max_history=9, shifted_queries=shifted)
    dataset = make_benchmark(config)
    write_benchmark(dataset, tmp_path / "bench")
    loaded = load_dataset(tmp_path / "bench")
    assert (loaded.task, loaded.users) == (dataset.task, dataset.users)
    assert "Synthetic" in (tmp_path / "bench" / "README.md").read_text()


def test_a_query_group_outside_the_vocabulary_is_refused(tmp_path):
    write_benchmark(make_benchmark(BenchmarkConfig(num_users=2, shifted_queries=1)), tmp_path)
    users = json.loads((tmp_path / "user_history.json").read_text())
    users[1]["query"][0]["group"] = "holiday"
    (tmp_path / "user_history.json").write_text(json.dumps(users))
    with pytest.raises(DataError, match=r"user 1 .*query\[0\].*field 'group' is 'holiday'; expected one of"):
        load_dataset(tmp_path)


def _run(*argv):
    return data_commands.main(list(argv))


def test_make_benchmark_command(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        _run(
            "data",
            "make-benchmark",
            "--task",
            "rating",
            "--num-users",
            "5",
            "--max-history",
            "96",
            "--seed",
            "3",
            "--out",
            str(out),
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "synthetic" in printed and "rating (rating, metric mae)" in printed
    assert "min 16 / median 39 / max 96" in printed
    dataset = load_dataset(out)
    assert (
        dataset.users
        == make_benchmark(BenchmarkConfig(task="rating", num_users=5, max_history=96, seed=3)).users
    )
    assert _run("data", "make-benchmark", "--personal-strength", "-1", "--out", str(out)) == 2
    assert "personal_strength must be in [0, 1]" in capsys.readouterr().err


def test_the_benchmarks_defaults_are_the_run_configs():
    assert BenchmarkConfig() == BenchmarkConfig.from_run_config(load_run_config())


def test_make_benchmark_command_writes_and_shows_query_groups(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        _run("data", "make-benchmark", "--shifted-queries", "2", "--num-users", "3", "--out", str(out)) == 0
    )
    assert "in-history 24, shifted 6" in capsys.readouterr().out
    loaded = load_dataset(out)
    assert Counter(g for user in loaded.users for g in user.query_groups.values()) == {
        IN_HISTORY: 24,
        SHIFTED: 6,
    }
