import json
import re
from pathlib import Path

import pytest

from common.data import Item
from common.io import DataError
from common.loaders import load_dataset
from simulations import data_commands

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "commit-subjects-flower"
TAG_QUESTION = (
    "Which tag does this movie relate to among the following tags? Just answer with the tag name without "
    "further explanation. tags: [sci-fi, comedy] description: "
)


def _profile(*specs):
    return [{"id": i, "description": d, "tag": t, "date": date} for i, d, t, date in specs]


def oppu_users():
    return [
        {
            "user_id": "u1",
            # out of order on purpose: the history comes back oldest first
            "profile": _profile(
                ("h2", "Robots rebel.", "sci-fi", 20), ("h1", "A clown trips.", "comedy", 10)
            ),
            "query": [{"id": "q1", "input": TAG_QUESTION + "Aliens land."}],
        },
        {
            "user_id": "u2",
            "profile": _profile(("h3", "A pie fight.", "comedy", 5)),
            "query": [{"id": "q2", "input": "A time loop."}, {"id": "q3", "input": "A food fight."}],
        },
    ]


def oppu_labels():
    golds = [
        {"id": "q1", "output": "sci-fi"},
        {"id": "q2", "output": "sci-fi"},
        {"id": "q3", "output": "comedy"},
    ]
    return {"task": "LaMP_2M", "golds": golds}


def write_oppu(directory, users=None, labels=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "user_history.json").write_text(json.dumps(oppu_users() if users is None else users))
    (directory / "user_labels.json").write_text(json.dumps(oppu_labels() if labels is None else labels))
    return directory


def lamp_questions():
    shared = _profile(("h1", "A clown trips.", "comedy", 10), ("h2", "Robots rebel.", "sci-fi", 20))
    return [
        {"id": "q1", "input": TAG_QUESTION + "Aliens land.", "profile": shared},
        {
            "id": "q2",
            "input": TAG_QUESTION + "A pie fight.",
            "profile": _profile(("h3", "War.", "sci-fi", 1)),
        },
        {"id": "q3", "input": TAG_QUESTION + "A time loop.", "profile": shared},
    ]


def write_lamp(directory, questions=None, outputs=None, prefix=""):
    directory.mkdir(parents=True, exist_ok=True)
    golds = [
        {"id": "q1", "output": "sci-fi"},
        {"id": "q2", "output": "comedy"},
        {"id": "q3", "output": "sci-fi"},
    ]
    questions = lamp_questions() if questions is None else questions
    (directory / f"{prefix}questions.json").write_text(json.dumps(questions))
    outputs = {"task": "LaMP_2", "golds": golds} if outputs is None else outputs
    (directory / f"{prefix}outputs.json").write_text(json.dumps(outputs))
    return directory


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_oppu_layout(tmp_path):
    dataset = load_dataset(write_oppu(tmp_path / "d"))
    assert dataset.task == "LaMP-2M"
    assert dataset.source == str(tmp_path / "d")
    first, second = dataset.users
    assert first.user_id == "u1"
    assert first.history == [
        Item("h1", "A clown trips.", "comedy", 10.0),
        Item("h2", "Robots rebel.", "sci-fi", 20.0),
    ]
    # LaMP question wording is stripped, so queries read like history items
    assert first.queries == [Item("q1", "Aliens land.", "sci-fi")]
    assert [q.output for q in second.queries] == ["sci-fi", "comedy"]


def test_oppu_layout_by_file_path_and_task_override(tmp_path):
    write_oppu(tmp_path)
    dataset = load_dataset(tmp_path / "user_history.json", task="LaMP-2M")
    assert [u.user_id for u in dataset.users] == ["u1", "u2"]
    with pytest.raises(DataError, match="task argument: unknown task 'LaMP-99'"):
        load_dataset(tmp_path, task="LaMP-99")


def test_lamp_layout_groups_questions_by_profile(tmp_path):
    dataset = load_dataset(write_lamp(tmp_path))
    assert dataset.task == "LaMP-2M"  # "LaMP_2" with movie descriptions in the profile
    assert [[q.id for q in u.queries] for u in dataset.users] == [["q1", "q3"], ["q2"]]
    assert [h.id for h in dataset.users[0].history] == ["h1", "h2"]
    assert dataset.users[0].queries[0] == Item("q1", "Aliens land.", "sci-fi")


def test_lamp_layout_official_file_names_and_user_ids(tmp_path):
    questions = lamp_questions()
    for question, user in zip(questions, ["a", "b", "a"], strict=True):
        question["user_id"] = user
    write_lamp(tmp_path, questions=questions, prefix="dev_")
    dataset = load_dataset(tmp_path / "dev_questions.json")
    assert [(u.user_id, len(u.queries)) for u in dataset.users] == [("a", 2), ("b", 1)]


def test_lamp_2_with_categories_is_news(tmp_path):
    profile = [{"id": "h", "text": "Vote today.", "category": "politics"}]
    questions = [{"id": "q", "input": "... categories: [politics] article: Polls open.", "profile": profile}]
    outputs = {"task": "LaMP_2", "golds": [{"id": "q", "output": "politics"}]}
    dataset = load_dataset(write_lamp(tmp_path, questions, outputs))
    assert dataset.task == "LaMP-2N"
    assert dataset.users[0].queries == [Item("q", "Polls open.", "politics")]


def test_jsonl_splits_each_user_by_time(tmp_path):
    records = [{"user_id": "ann", "input": f"in{i}", "output": f"out{i}", "date": 100 - i} for i in range(6)]
    records += [{"user_id": "bob", "input": f"b{i}", "output": f"o{i}", "id": f"bob-{i}"} for i in range(4)]
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    dataset = load_dataset(path, queries_per_user=2)
    assert dataset.task == "generic"
    ann, bob = dataset.users
    # ann's dates run backwards in the file: the newest items are the first lines
    assert [i.input for i in ann.history] == ["in5", "in4", "in3", "in2"]
    assert [i.input for i in ann.queries] == ["in1", "in0"]
    assert ann.history[0].id == "ann-6"  # default id: user and line number
    # bob has no dates: file order
    assert [i.id for i in bob.queries] == ["bob-2", "bob-3"]
    by_fraction = load_dataset(tmp_path, query_fraction=0.5)  # a directory holding exactly one .jsonl
    assert [len(u.queries) for u in by_fraction.users] == [3, 2]


def test_jsonl_keeps_at_least_one_history_item_and_honours_task(tmp_path):
    records = [{"user_id": "u", "input": f"r{i}", "output": str(i + 1)} for i in range(3)]
    dataset = load_dataset(write_jsonl(tmp_path / "r.jsonl", records), task="LaMP-3", queries_per_user=5)
    assert dataset.task == "LaMP-3"
    assert [len(dataset.users[0].history), len(dataset.users[0].queries)] == [1, 2]


def _mutate(make, change):
    data = make()
    change(data)
    return data


def _overwrite(path, text):
    path.write_text(text)
    return path


def _oppu_case(users=None, labels=None):
    return lambda tmp: write_oppu(tmp, users, labels)


MALFORMED = {
    "bad json": (
        lambda tmp: _overwrite(write_oppu(tmp) / "user_history.json", '[{"user_id": "u1",'),
        [r"user_history\.json: not valid JSON \(line 1, column"],
    ),
    "missing key": (
        _oppu_case(users=_mutate(oppu_users, lambda u: u[0]["profile"][1].pop("tag"))),
        [r"user_history\.json: user 0 \(user_id 'u1'\), profile\[1\] \(id 'h1'\): missing field 'tag'"],
    ),
    "wrong type": (
        _oppu_case(users=_mutate(oppu_users, lambda u: u[1].update(query="q2"))),
        [r"user_history\.json: user 1 \(user_id 'u2'\): field 'query' must be a list, got str"],
    ),
    "wrong type of input": (
        _oppu_case(users=_mutate(oppu_users, lambda u: u[1]["query"][0].update(input=42))),
        [r"user 1 \(user_id 'u2'\), query\[0\] \(id 'q2'\): field 'input' must be a string, got int"],
    ),
    "duplicate query ids": (
        _oppu_case(users=_mutate(oppu_users, lambda u: u[1]["query"][1].update(id="q1"))),
        [r"user 1 \(user_id 'u2'\), query\[1\] \(id 'q1'\): duplicate query id 'q1'"],
    ),
    "duplicate gold ids": (
        _oppu_case(
            labels=_mutate(oppu_labels, lambda lab: lab["golds"].append({"id": "q2", "output": "comedy"}))
        ),
        [r"user_labels\.json: golds\[3\]: duplicate id 'q2'"],
    ),
    "duplicate users": (
        _oppu_case(users=_mutate(oppu_users, lambda u: u[1].update(user_id="u1"))),
        [r"user_history\.json: user 1 \(user_id 'u1'\): duplicate user_id 'u1'"],
    ),
    "query without gold": (
        _oppu_case(labels=_mutate(oppu_labels, lambda lab: lab["golds"].pop(2))),
        [r"user 1 \(user_id 'u2'\), query\[1\] \(id 'q3'\): query has no gold output", r"user_labels\.json"],
    ),
    "empty history": (
        _oppu_case(users=_mutate(oppu_users, lambda u: u[1].update(profile=[]))),
        [
            r"user_history\.json: user 1 \(user_id 'u2'\): empty history: field 'profile' must hold at least one"
        ],
    ),
    "unknown task": (
        _oppu_case(labels=_mutate(oppu_labels, lambda lab: lab.update(task="LaMP_9"))),
        [r"user_labels\.json: field 'task': unknown task 'LaMP_9'; known tasks: LaMP-1"],
    ),
    "ids that do not match": (
        _oppu_case(
            labels=_mutate(oppu_labels, lambda lab: lab["golds"].append({"id": "zz", "output": "comedy"}))
        ),
        [
            r"user_labels\.json: 1 gold id\(s\) match no query, e\.g\. \['zz'\]; expected exactly one gold per query"
        ],
    ),
    "gold outside the label set": (
        _oppu_case(labels=_mutate(oppu_labels, lambda lab: lab["golds"][0].update(output="thriller"))),
        [r"user_labels\.json: gold for id 'q1': 'thriller' is not a label of LaMP-2M; expected one of"],
    ),
    "missing label file": (
        lambda tmp: (write_oppu(tmp), (tmp / "user_labels.json").unlink())[0],
        [r"user_labels\.json: file not found"],
    ),
    "not a list of users": (
        _oppu_case(users={"user_id": "u1"}),
        [r"user_history\.json: expected a list of users at the top level, got dict"],
    ),
    "lamp question without profile": (
        lambda tmp: write_lamp(tmp, _mutate(lamp_questions, lambda q: q[2].pop("profile"))),
        [r"questions\.json: question 2: missing field 'profile' \(expected a list\)"],
    ),
    "lamp bad profile item": (
        lambda tmp: write_lamp(tmp, _mutate(lamp_questions, lambda q: q[1]["profile"][0].update(date=[1]))),
        [r"questions\.json: question 1, profile\[0\] \(id 'h3'\): field 'date' must be a unix time"],
    ),
    "jsonl bad line": (
        lambda tmp: _overwrite(tmp / "x.jsonl", '{"user_id": "a", "input": "i", "output": "o"}\n{oops\n'),
        [r"x\.jsonl: line 2: not valid JSON"],
    ),
    "jsonl missing output": (
        lambda tmp: write_jsonl(tmp / "x.jsonl", [{"user_id": "a", "input": "i"}]),
        [r"x\.jsonl: line 1: missing field 'output' \(expected a string\)"],
    ),
    "jsonl user with one item": (
        lambda tmp: write_jsonl(tmp / "x.jsonl", [{"user_id": "a", "input": "i", "output": "o"}]),
        [r"x\.jsonl: user 'a' has 1 item; expected at least 2"],
    ),
    "no data set in directory": (lambda tmp: tmp, [r"no data set found: expected user_history\.json"]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_gets_a_precise_message(tmp_path, case):
    make, patterns = MALFORMED[case]
    (tmp_path / "data").mkdir()
    target = make(tmp_path / "data")
    with pytest.raises(DataError) as info:
        load_dataset(target)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), str(info.value)


def _run(*argv):
    return data_commands.main(list(argv))


def test_inspect_summarizes_a_data_set(tmp_path, capsys):
    assert _run("data", "inspect", str(write_oppu(tmp_path / "d"))) == 0
    out = capsys.readouterr().out
    assert "LaMP-2M (classification, metric accuracy)" in out
    assert "min 1 / median 1.5 / max 2" in out
    assert "3 (min 1 / median 1.5 / max 2 per user)" in out
    assert "Robots rebel." in out


def test_inspect_reports_bad_data_on_stderr_with_exit_code_2(tmp_path, capsys):
    target = write_oppu(tmp_path / "d", users=_mutate(oppu_users, lambda u: u[1].update(profile=[])))
    assert _run("data", "inspect", str(target)) == 2
    captured = capsys.readouterr()
    assert "empty history" in captured.err and "user_history.json" in captured.err
    assert captured.out == ""


def _shared_or_skip() -> Path:
    if not SHARED.is_dir():
        pytest.skip("shared data (../shared/data/commit-subjects-flower) is not present")
    return SHARED


def test_both_layouts_of_the_shared_data_agree():
    shared = _shared_or_skip()
    oppu = load_dataset(shared)
    lamp = load_dataset(shared / "questions.json")
    assert oppu.task == lamp.task == "generic"
    by_history = {tuple(u.history): u for u in oppu.users}
    assert len(lamp.users) == len(oppu.users) == len(by_history)
    for user in lamp.users:
        twin = by_history[tuple(user.history)]  # same users with the same history (ids, texts, dates)
        assert set(user.queries) <= set(twin.queries)  # LaMP holds each user's newest queries only
        assert user.queries == twin.queries[-len(user.queries) :]
    assert all(h.date is not None for u in oppu.users for h in u.history)


def test_inspect_the_shared_data(capsys):
    shared = _shared_or_skip()
    assert _run("data", "inspect", str(shared)) == 0
    out = capsys.readouterr().out
    assert "generic (generation, metric rouge-1)" in out
    assert "users            │ 11" in out
