"""The tasks: how a history item becomes a training example, how a query is asked and how answers are read.

The prompt wording and label sets of the LaMP tasks are those OPPU uses (Tan et al., 2024), so results
stay comparable. A history item is trained on as `query_prompt(item.input)` followed by its output; an
item with no input (LaMP-7 tweets, LaMP-1 paper titles) is trained on as the user's own writing after
the task's `free_prompt`, as OPPU does for LaMP-7 ("tweet: <text>"). For LaMP-1, whose profiles hold
only the user's paper titles, this teaches the adapter the user's research topics, which is what the
two-way reference choice turns on.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.data import Item, parse_date, require, require_id
from common.io import DataError

CLASSIFICATION, RATING, GENERATION = "classification", "rating", "generation"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    labels: tuple[str, ...]
    max_new_tokens: int
    primary_metric: str
    higher_is_better: bool
    prompt: str  # query prompt with an {input} slot; the answer follows it
    retrieved: str  # one retrieved history item in a prompt, with {input} and {output} slots
    input_fields: tuple[str, ...]  # profile fields that may hold the input, first found wins; () = none
    output_fields: tuple[str, ...]
    profile_prompt: str  # OPPU's instruction for a model-written user profile, with a {history} slot
    question_marker: str = ""  # in a LaMP question, the item's own text follows this marker
    free_prompt: str = ""  # prompt for an item without input: the user's own writing follows

    def query_prompt(self, input: str) -> str:
        if not input and self.free_prompt:
            return self.free_prompt
        return self.prompt.format(input=input)

    def retrieval_text(self, item: Item) -> str:
        return f"{item.input} {item.output}".strip()

    def format_retrieved(self, item: Item) -> str:
        return self.retrieved.format(input=item.input, output=item.output)

    def extract(self, generated: str) -> str:
        """The label, number or first line of a raw generation; unparseable text comes back as is."""
        if self.kind == CLASSIFICATION:
            match = _label_pattern(self.labels).search(generated)
            return _label_aliases(self.labels)[match.group(0).lower()] if match else _first_line(generated)
        if self.kind == RATING:
            match = re.search(r"[-+]?\d+(?:\.\d+)?", generated)
            return _canonical_number(float(match.group(0))) if match else _first_line(generated)
        return _first_line(generated)

    def input_from_question(self, question: str) -> str:
        """The item text inside a LaMP question, so queries read like history items."""
        if self.question_marker and self.question_marker in question:
            return question.partition(self.question_marker)[2].strip()
        return question

    def check_output(self, text: str, where: str) -> str:
        """A gold or history output, validated for the task's kind and stripped."""
        text = text.strip()
        if self.kind == CLASSIFICATION and text not in self.labels:
            raise DataError(
                f"{where}: {text!r} is not a label of {self.name}; expected one of {list(self.labels)}"
            )
        if self.kind == RATING:
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataError(f"{where}: {text!r} is not a rating; expected a number such as '4'")
            return _canonical_number(value)
        return text

    def item_from_profile(self, record: dict, where: str) -> Item:
        item_id = require_id(record, "id", where)
        where = f"{where} (id {item_id!r})"
        text = _text_field(record, self.input_fields, where) if self.input_fields else ""
        output = _text_field(record, self.output_fields, where)
        # An item without input is the user's own writing (a LaMP-1 title, a tweet), not an answer.
        output = self.check_output(output, where) if self.input_fields else output.strip()
        return Item(item_id, text, output, parse_date(record, where))


def _text_field(record: Mapping[str, Any], names: tuple[str, ...], where: str) -> str:
    for name in names:
        if name in record:
            return require(record, name, str, where)
    alternatives = " or ".join(f"'{name}'" for name in names)
    raise DataError(f"{where}: missing field {alternatives} (expected a string)")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _canonical_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else str(value)


@functools.cache
def _label_aliases(labels: tuple[str, ...]) -> dict[str, str]:
    """Lower-cased spellings of each label; "[1]" may also be answered as "1"."""
    aliases = {label.lower(): label for label in labels}
    aliases.update({label.strip("[]").lower(): label for label in labels if label.strip("[]") != label})
    return aliases


@functools.cache
def _label_pattern(labels: tuple[str, ...]) -> re.Pattern:
    # The earliest label in the text wins; at one position the longest ("dark comedy" over "comedy").
    spellings = sorted(_label_aliases(labels), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, spellings)) + r")(?!\w)", re.IGNORECASE)


_KIND_METRICS = {
    CLASSIFICATION: {"primary_metric": "accuracy", "higher_is_better": True},
    RATING: {"primary_metric": "mae", "higher_is_better": False},
    GENERATION: {"primary_metric": "rouge-1", "higher_is_better": True},
}


def _task(name: str, kind: str, labels: tuple[str, ...] = (), **fields: Any) -> Task:
    prompt = fields.pop("prompt").replace("{labels}", ", ".join(labels))
    return Task(name, kind, labels, prompt=prompt, **_KIND_METRICS[kind], **fields)


_PROFILE_OF_TEMPLATE = (
    "Given this {who}’s previous {items}, try to describe a template for their {outputs}. {goal} "
    "User History: {{history}} Answer:"
)

NEWS_CATEGORIES = (
    "travel", "education", "parents", "style & beauty", "entertainment", "food & drink", "science & technology",
    "business", "sports", "healthy living", "women", "politics", "crime", "culture & arts", "religion",
)  # fmt: skip
MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)  # fmt: skip
# The built-in tagging task's tags: invented words, so its population convention (one tag per movie theme:
# space, crime, romance, war, horror, sports, comedy, music) must be learned (common.synthetic).
BUILTIN_TAGS = ("vexa", "orin", "talu", "kelso", "dravi", "lumo", "pelo", "quon")

_TAGGING = {
    "prompt": "Which tag does this movie relate to among the following tags? Just answer with the tag name "
    "without further explanation. tags: [{labels}]\n description: {input} tag:",
    "retrieved": "description: {input} tag: {output}",
    "input_fields": ("description",),
    "output_fields": ("tag",),
    "max_new_tokens": 8,
    "profile_prompt": "Look at the following past movies this user has watched and determine the most popular "
    "tag they labeled. Answer in the following form: most popular tag: <tag>. User History: {history} Answer:",
}
_HEADLINE = {
    "prompt": "Generate a headline for the following article.\n article: {input} headline:",
    "retrieved": "article: {input} headline: {output}",
    "input_fields": ("text",),
    "output_fields": ("title",),
    "max_new_tokens": 32,
    "profile_prompt": _PROFILE_OF_TEMPLATE.format(
        who="author",
        items="articles",
        outputs="headlines",
        goal="I want to be able to accurately predict the headline gives one of their articles. Be specific "
        "about their style and wording, don’t tell me anything generic.",
    ),
}
_RATING = {
    "prompt": "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
    "without further explanation. review: {input}\n score:",
    "retrieved": "review: {input} score: {output}",
    "input_fields": ("text",),
    "output_fields": ("score",),
    "max_new_tokens": 4,
    "profile_prompt": "Based on this user’s past reviews, what are the most common scores they give for positive "
    "and negative reviews? Answer in the following form: most common positive score: <most common positive "
    "score>, most common negative score: <most common negative score>. User History: {history} Answer:",
}

_LAMP = (
    _task(
        "LaMP-1",
        CLASSIFICATION,
        ("[1]", "[2]"),
        prompt="Identify the most relevant reference for the listed publication by the researcher. Select the "
        "reference paper that is most closely related to the researcher's work. Please respond with only the "
        "number that corresponds to the reference.\n{input}\n reference:",
        retrieved="paper title: {output}",
        input_fields=(),
        output_fields=("title",),
        free_prompt="paper title:",
        max_new_tokens=8,
        profile_prompt="Write a summary, in English, of the research interests and topics of a researcher who has "
        "published the following papers. Only generate the summary, no other text. User History: {history} Answer:",
    ),
    _task(
        "LaMP-2N",
        CLASSIFICATION,
        NEWS_CATEGORIES,
        prompt="Which category does this article relate to among the following categories? Just answer with the "
        "category name without further explanation. categories: [{labels}]\n article: {input} category:",
        retrieved="article: {input} category: {output}",
        input_fields=("text",),
        output_fields=("category",),
        question_marker="article: ",
        max_new_tokens=8,
        profile_prompt="Look at the following past articles this journalist has written and determine the most "
        "popular category they write in. Answer in the following form: most popular category: <category>. "
        "User History: {history} Answer:",
    ),
    _task("LaMP-2M", CLASSIFICATION, MOVIE_TAGS, question_marker="description: ", **_TAGGING),
    _task("LaMP-3", RATING, question_marker="review: ", **_RATING),
    _task("LaMP-4", GENERATION, question_marker="article: ", **_HEADLINE),
    _task(
        "LaMP-5",
        GENERATION,
        prompt="Generate a title for the following abstract of a paper.\n abstract: {input} title:",
        retrieved="abstract: {input} title: {output}",
        input_fields=("abstract",),
        output_fields=("title",),
        question_marker="paper: ",
        max_new_tokens=32,
        profile_prompt=_PROFILE_OF_TEMPLATE.format(
            who="author",
            items="publications",
            outputs="titles",
            goal="I want to be able to accurately predict the title of one of the papers from the abstract. "
            "Only generate the template description, nothing else.",
        ),
    ),
    _task(
        "LaMP-7",
        GENERATION,
        prompt="Paraphrase the following text into tweet without any explanation before or after it.\n"
        " text: {input} tweet:",
        retrieved="tweet: {output}",
        input_fields=(),
        output_fields=("text",),
        free_prompt="tweet:",
        question_marker="after it: ",
        max_new_tokens=48,
        profile_prompt=_PROFILE_OF_TEMPLATE.format(
            who="person",
            items="tweets",
            outputs="tweets",
            goal="I want to take a generic sentence and rephrase it to sound like one of their tweets, with the "
            "same style/punctuation/capitalization/wording/tone/etc. as them. Only give me the template "
            "description, nothing else.",
        ),
    ),
    _task(
        "generic",
        GENERATION,
        prompt="Generate the output for the following input.\n input: {input} output:",
        retrieved="input: {input} output: {output}",
        input_fields=("input", "text"),
        output_fields=("output", "title"),
        max_new_tokens=40,
        profile_prompt=_PROFILE_OF_TEMPLATE.format(
            who="person",
            items="outputs",
            outputs="outputs",
            goal="I want to be able to accurately predict the output they write for a new input. Be specific "
            "about their style and wording, don’t tell me anything generic.",
        ),
    ),
)
# The built-in synthetic tasks (common.synthetic) reuse LaMP's wording for the same kind of question.
_BUILTIN = (
    _task("tagging", CLASSIFICATION, BUILTIN_TAGS, **_TAGGING),
    _task("rating", RATING, **_RATING),
    _task("title", GENERATION, **_HEADLINE),
)
TASKS: dict[str, Task] = {task.name: task for task in _LAMP + _BUILTIN}

# Names used by LaMP's label files ("LaMP_2M") and by OPPU's code ("movie_tagging"), normalized.
_ALIASES = {
    "citation": "LaMP-1",
    "news-categorize": "LaMP-2N",
    "movie-tagging": "LaMP-2M",
    "product-rating": "LaMP-3",
    "news-headline": "LaMP-4",
    "scholarly-title": "LaMP-5",
    "tweet-paraphrase": "LaMP-7",
    "commit-subject": "generic",
    "commit-subjects": "generic",
} | {name.lower(): name for name in TASKS}


def get_task(name: str) -> Task:
    canonical = _ALIASES.get(name.strip().lower().replace("_", "-"))
    if canonical is None:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[canonical]
