import pytest

from common.data import Item
from common.io import DataError
from common.tasks import MOVIE_TAGS, NEWS_CATEGORIES, TASKS, get_task


def test_registry_holds_the_lamp_tasks_generic_and_builtin_tasks():
    expected = {"LaMP-1", "LaMP-2N", "LaMP-2M", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7", "generic"}
    assert set(TASKS) == expected | {"tagging", "rating", "title"}
    kinds = {name: task.kind for name, task in TASKS.items()}
    assert kinds["LaMP-1"] == kinds["LaMP-2N"] == kinds["LaMP-2M"] == kinds["tagging"] == "classification"
    assert kinds["LaMP-3"] == kinds["rating"] == "rating"
    assert TASKS["LaMP-3"].primary_metric == "mae" and not TASKS["LaMP-3"].higher_is_better
    assert TASKS["LaMP-4"].primary_metric == "rouge-1" and TASKS["LaMP-4"].higher_is_better


def test_label_sets_are_lamps():
    assert TASKS["LaMP-1"].labels == ("[1]", "[2]")
    assert len(NEWS_CATEGORIES) == len(set(NEWS_CATEGORIES)) == 15
    assert len(MOVIE_TAGS) == len(set(MOVIE_TAGS)) == 15
    assert {"food & drink", "science & technology", "women"} <= set(TASKS["LaMP-2N"].labels)
    assert {"sci-fi", "twist ending", "true story"} <= set(TASKS["LaMP-2M"].labels)
    for task in TASKS.values():  # the prompt offers exactly the task's labels
        if task.kind == "classification" and task.name != "LaMP-1":
            assert "[" + ", ".join(task.labels) + "]" in task.query_prompt("x")


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("LaMP_2M", "LaMP-2M"),
        ("lamp-2n", "LaMP-2N"),
        ("movie_tagging", "LaMP-2M"),
        ("product_rating", "LaMP-3"),
        ("commit_subject", "generic"),
        (" LaMP_7 ", "LaMP-7"),
        ("tagging", "tagging"),
    ],
)
def test_get_task_accepts_lamp_and_oppu_names(name, canonical):
    assert get_task(name).name == canonical


def test_unknown_task_lists_the_known_names():
    with pytest.raises(DataError, match=r"unknown task 'LaMP-9'; known tasks: LaMP-1, LaMP-2N.*generic"):
        get_task("LaMP-9")


def test_query_prompts_use_oppus_wording():
    assert TASKS["LaMP-3"].query_prompt("Nice pan.") == (
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
        "without further explanation. review: Nice pan.\n score:"
    )
    assert TASKS["LaMP-4"].query_prompt("Rain today.") == (
        "Generate a headline for the following article.\n article: Rain today. headline:"
    )
    assert TASKS["LaMP-2M"].query_prompt("A heist.").endswith("\n description: A heist. tag:")
    # Items without input are the user's own writing, as OPPU trains tweets ("tweet: <text>").
    assert TASKS["LaMP-7"].query_prompt("") == "tweet:"
    assert TASKS["LaMP-1"].query_prompt("") == "paper title:"
    assert TASKS["LaMP-7"].query_prompt("hello").endswith("text: hello tweet:")


def test_format_retrieved_uses_oppus_history_templates():
    item = Item("1", "A heist goes wrong.", "action")
    assert TASKS["LaMP-2M"].format_retrieved(item) == "description: A heist goes wrong. tag: action"
    assert TASKS["LaMP-7"].format_retrieved(Item("2", "", "so tired")) == "tweet: so tired"
    assert TASKS["LaMP-3"].retrieval_text(Item("3", "Great kettle", "5")) == "Great kettle 5"


@pytest.mark.parametrize(
    ("task", "generated", "expected"),
    [
        ("LaMP-2M", " dark comedy", "dark comedy"),  # the longer label wins at one position
        ("LaMP-2M", "Comedy, maybe dark comedy", "comedy"),  # the earliest label wins, any case
        ("LaMP-2M", "tag: sci-fi\ndescription: ...", "sci-fi"),
        ("LaMP-2N", " science & technology.", "science & technology"),
        ("LaMP-2M", "I cannot tell", "I cannot tell"),  # unparseable: not a label, so it scores as wrong
        ("LaMP-1", " [2]", "[2]"),
        ("LaMP-1", "Reference 1 is related.", "[1]"),
        ("tagging", "Dravi!", "dravi"),
        ("LaMP-3", " 4", "4"),
        ("LaMP-3", "score: 4/5", "4"),
        ("LaMP-3", "3.5 stars", "3.5"),
        ("LaMP-3", "4.0", "4"),
        ("LaMP-3", "\n great", "great"),
        ("LaMP-4", "  Storm hits coast \n article: more", "Storm hits coast"),
        ("generic", "\n\n  fix: typo\n", "fix: typo"),
        ("generic", "", ""),
    ],
)
def test_extract(task, generated, expected):
    assert TASKS[task].extract(generated) == expected


@pytest.mark.parametrize(
    ("task", "question", "text"),
    [
        (
            "LaMP-2N",
            "Which category does this article relate to among the following categories? Just answer with the "
            "category name without further explanation. categories: [women, religion] article: Vote today.",
            "Vote today.",
        ),
        (
            "LaMP-4",
            "Generate a headline for the following article: Storm hits the coast.",
            "Storm hits the coast.",
        ),
        ("LaMP-5", "Generate a title for the following abstract of a paper: We study X.", "We study X."),
        (
            "LaMP-7",
            "Paraphrase the following tweet without any explanation before or after it: so tired",
            "so tired",
        ),
        ("LaMP-3", "What is the score ... without further explanation. review: Fine pan.", "Fine pan."),
        ("generic", "changed files: modified a.py", "changed files: modified a.py"),
        ("LaMP-1", 'For an author who has written the paper with the title "T" ... [1]: "A" [2]: "B"', None),
    ],
)
def test_input_from_question_keeps_the_items_own_text(task, question, text):
    assert TASKS[task].input_from_question(question) == (question if text is None else text)


def test_item_from_profile_reads_each_tasks_fields():
    where = "f.json: user 0, profile[0]"
    assert TASKS["LaMP-2M"].item_from_profile(
        {"id": 7, "description": "A heist.", "tag": "action"}, where
    ) == Item("7", "A heist.", "action")
    tweet = TASKS["LaMP-7"].item_from_profile({"id": "t", "text": "so tired"}, where)
    assert (tweet.input, tweet.output) == ("", "so tired")
    paper = TASKS["LaMP-1"].item_from_profile({"id": "p", "title": "On BM25", "abstract": "..."}, where)
    assert (paper.input, paper.output) == ("", "On BM25")
    review = TASKS["LaMP-3"].item_from_profile(
        {"id": "r", "text": "ok", "score": "4.0", "date": "2020-01-02"}, where
    )
    assert (review.output, review.date) == ("4", 1577923200.0)
    commit = TASKS["generic"].item_from_profile({"id": "c", "text": "diff", "title": "fix", "date": 5}, where)
    assert commit == Item("c", "diff", "fix", 5.0)


@pytest.mark.parametrize(
    ("task", "record", "message"),
    [
        (
            "LaMP-2M",
            {"id": "a", "description": "x"},
            r"f\.json: profile\[3\] \(id 'a'\): missing field 'tag'",
        ),
        (
            "generic",
            {"id": "a", "title": "x"},
            r"\(id 'a'\): missing field 'input' or 'text' \(expected a string\)",
        ),
        (
            "LaMP-2M",
            {"id": "a", "description": 3, "tag": "action"},
            r"field 'description' must be a string, got int",
        ),
        (
            "LaMP-2M",
            {"id": "a", "description": "x", "tag": "thriller"},
            r"'thriller' is not a label of LaMP-2M",
        ),
        ("LaMP-3", {"id": "a", "text": "x", "score": "five"}, r"'five' is not a rating; expected a number"),
        ("LaMP-3", {"id": "a", "text": "x", "score": "nan"}, r"'nan' is not a rating; expected a number"),
        ("LaMP-2M", {"description": "x", "tag": "action"}, r"f\.json: profile\[3\]: missing field 'id'"),
        ("LaMP-2M", ["x"], r"profile\[3\]: expected an object, got list"),
        (
            "LaMP-4",
            {"id": "a", "text": "x", "title": "y", "date": "soon"},
            r"'date' must be a unix time or an ISO",
        ),
    ],
)
def test_item_from_profile_errors_name_the_record_and_field(task, record, message):
    with pytest.raises(DataError, match=message):
        TASKS[task].item_from_profile(record, "f.json: profile[3]")
