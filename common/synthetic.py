"""The built-in benchmark: SYNTHETIC LaMP-like users, generated offline from a seed.

No item comes from a real person: the texts are drawn from templates with many slots and a real
vocabulary. Every answer follows a population rule, replaced by the user's own rule with probability
`personal_strength`, so each part of OPPU has something to learn: the shared adapter the population's
rule (which the base model cannot know), a personal adapter the user's own rule, which only that
user's history shows; users range from light to heavy (geometrically spread history sizes):
- tagging (the default): short movie descriptions whose theme is clear from the wording; the tags are
  invented words (BUILTIN_TAGS), so no model knows the population's convention of one tag per theme
  before it is trained; each user relabels each theme with another tag with probability
  `personal_strength`;
- rating: product reviews whose wording sets a sentiment level of 1 to 5 (the population's rating);
  each user shifts ratings by a personal offset, applied per level;
- title: short local-news blurbs; the population writes a plain headline, each user has a personal
  headline style (prefix, word order, extra details, casing), applied per item.
All random draws are made whatever `personal_strength` is, so the same config at strength 0 gives the same
inputs with the population's answers: the population oracle.

Behaviour shift (`shifted_queries` > 0, tagging only; OPPU's paper, "behavior shift"): each user's
history leaves out the SHIFT_THEMES themes they like least, their usual queries (group `in-history`)
are on themes the history shows, and `shifted_queries` more (group `shifted`) are on themes it never
shows, whose personal tag no retrieval or adapter trained on the history can know. At 0 nothing of this
is drawn: the benchmark is unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from common.config import SHIFT_REASON, SHIFT_TASKS, RunConfig, default_config_values
from common.data import IN_HISTORY, SHIFTED, Dataset, Item, User
from common.io import atomic_write_json, atomic_write_text
from common.tasks import BUILTIN_TAGS, get_task

BUILTIN_TASKS = ("tagging", "rating", "title")
SHIFT_THEMES = 2  # behaviour shift: the themes each user's history leaves out, of 8


# The defaults are the run config's (pyproject.toml), so `fedoppu data make-benchmark` and a run agree.
_RUN_DEFAULTS = default_config_values()


def _default(key: str, help: str):
    return field(default=_RUN_DEFAULTS[key], metadata={"help": help, "run_config_key": key})


@dataclass(frozen=True)
class BenchmarkConfig:
    task: str = _default("task", f"built-in task: one of {', '.join(BUILTIN_TASKS)}")
    num_users: int = _default("benchmark-users", "number of users")
    min_history: int = _default("benchmark-min-history", "history length of the lightest user")
    max_history: int = _default("benchmark-max-history", "history length of the heaviest user")
    queries_per_user: int = _default("benchmark-queries", "held-out queries per user")
    personal_strength: float = _default(
        "benchmark-personal-strength", "0: everyone answers like the population; 1: every answer is personal"
    )
    shifted_queries: int = _default(
        "benchmark-shifted-queries",
        "behaviour shift (tagging): queries per user on themes absent from the user's history; 0 = off",
    )
    seed: int = _default("seed", "random seed; the same config always gives the same data")

    @classmethod
    def from_run_config(cls, config: RunConfig) -> BenchmarkConfig:
        return cls(
            **{f.name: getattr(config, f.metadata["run_config_key"].replace("-", "_")) for f in fields(cls)}
        )

    def __post_init__(self) -> None:
        if self.task not in BUILTIN_TASKS:
            raise ValueError(
                f"unknown built-in task {self.task!r}; expected one of {', '.join(BUILTIN_TASKS)}"
            )
        if self.num_users < 1 or self.queries_per_user < 1 or not 1 <= self.min_history <= self.max_history:
            raise ValueError("need num_users >= 1, queries_per_user >= 1 and 1 <= min_history <= max_history")
        if not 0.0 <= self.personal_strength <= 1.0:
            raise ValueError(f"personal_strength must be in [0, 1], got {self.personal_strength}")
        if self.shifted_queries < 0:
            raise ValueError(f"shifted_queries must be >= 0, got {self.shifted_queries}")
        if self.shifted_queries and self.task not in SHIFT_TASKS:
            raise ValueError(
                f"shifted_queries needs task {' or '.join(SHIFT_TASKS)}, not {self.task!r}: {SHIFT_REASON}"
            )


# An author draws one (input, output) pair from a random generator, in one user's own way.
Author = Callable[[random.Random], tuple[str, str]]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick(rng: random.Random, template: str, **pools: tuple[str, ...]) -> str:
    return _cap(template.format(**{name: rng.choice(pool) for name, pool in pools.items()}))


# --- tagging: movie descriptions --------------------------------------------------------------------------
# Per theme (keyed by its population tag): who, what they do, where. Phrases are unique to their theme.
_MOVIE_THEMES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "space": (
        ("a young pilot", "a stranded astronaut", "a ship's engineer", "a lonely station commander",
         "the captain of a cargo freighter", "a rookie navigator"),
        ("must repair a failing reactor", "picks up a signal from a distant moon", "discovers an alien artifact",
         "races to reach the last colony ship", "loses contact with mission control", "wakes early from cryosleep",
         "plots a course through an asteroid field"),
        ("aboard an orbiting station", "on a frozen moon", "at the edge of the galaxy", "deep in the asteroid belt",
         "on a mining colony near Jupiter", "on a research base on Mars"),
    ),
    "crime": (
        ("a retired detective", "a rookie police officer", "a small-time thief", "a defense lawyer",
         "an undercover agent", "a veteran safecracker"),
        ("reopens a cold murder case", "plans one last bank heist", "tracks a serial killer", "is framed for a robbery",
         "uncovers a corrupt police chief", "chases a stolen diamond", "testifies against a mob boss"),
        ("in the back streets of Chicago", "in a rain-soaked city", "in 1970s Marseille", "in the Naples underworld",
         "in downtown Los Angeles", "in a gritty port city"),
    ),
    "romance": (
        ("a shy bookseller", "a widowed baker", "a wedding planner", "a newly divorced architect",
         "a hopeless romantic", "a young florist"),
        ("falls for a charming stranger", "rekindles a summer love", "writes letters to a secret admirer",
         "must choose between two suitors", "falls in love with her best friend", "gets a second chance at first love",
         "plans a wedding that is not her own"),
        ("in Paris", "on a Greek island", "in a small Vermont town", "in a seaside village",
         "at a vineyard in Tuscany", "in snowy Vienna"),
    ),
    "war": (
        ("a young infantry soldier", "a field medic", "a resistance fighter", "a submarine captain",
         "a wartime nurse", "a weary sergeant"),
        ("holds a bridge against the advancing army", "leads a rescue behind enemy lines", "survives a brutal siege",
         "smuggles refugees across the front", "defends a hill under heavy fire", "deserts after a massacre",
         "guides a battalion through a minefield"),
        ("in the trenches of 1916", "in occupied France", "on the beaches of Normandy", "in the jungles of Vietnam",
         "during the siege of Leningrad", "on the Eastern Front"),
    ),
    "horror": (
        ("a grieving mother", "a night-shift nurse", "a paranormal investigator", "a lonely caretaker",
         "a teenage babysitter", "a skeptical priest"),
        ("moves into a haunted farmhouse", "is stalked by a masked killer", "hears whispers in the walls",
         "awakens an ancient curse", "finds a ghost in the attic", "is hunted by a demon",
         "survives a night of possession"),
        ("in an abandoned asylum", "deep in the woods", "in a fog-covered village", "in a crumbling Victorian mansion",
         "on a deserted island", "in a cursed cabin"),
    ),
    "sports": (
        ("an aging boxer", "a high school basketball coach", "a talented young striker", "a marathon runner",
         "a washed-up baseball pitcher", "a determined swimmer"),
        ("trains for one last title fight", "leads a losing team to the championship", "chases a world record",
         "fights to make the national team", "prepares for the Olympic final", "takes on the league champions",
         "returns to the game after an injury"),
        ("in a small mining town", "in Philadelphia", "at a struggling high school", "in the minor leagues",
         "at the world championships", "in a working-class suburb"),
    ),
    "comedy": (
        ("a clumsy substitute teacher", "a hopeless wedding singer", "an overconfident salesman",
         "a grumpy grandfather", "a lazy roommate", "a bumbling burglar"),
        ("accidentally swaps suitcases with a stranger", "pretends to be a famous chef", "accidentally becomes mayor",
         "gets stuck babysitting six kids", "tries to win back a stolen parrot", "loses a winning lottery ticket",
         "fakes an engagement to impress the boss"),
        ("during a chaotic family reunion", "on a disastrous road trip", "at a summer camp", "in a tiny office",
         "during a holiday weekend", "at a cousin's wedding"),
    ),
    "music": (
        ("a struggling jazz pianist", "a teenage guitarist", "a fading rock star", "a young violin prodigy",
         "a church choir director", "a street drummer"),
        ("prepares for the audition of a lifetime", "tours small clubs with an old band", "writes one last album",
         "enters a national singing contest", "discovers a lost recording", "records a hit song in one night",
         "reunites a broken band"),
        ("in New Orleans", "in 1960s Detroit", "on a cross-country tour", "in a Nashville bar",
         "in the clubs of Berlin", "at a music conservatory"),
    ),
}  # fmt: skip
_MOVIE_TEMPLATES = (
    "{who} {does} {where}.",
    "{where}, {who} {does}.",
    "a {adj} story: {who} {does} {where}.",
    "{who} {does}, {twist}.",
    "in this {adj} film, {who} {does} {where}.",
    "{who} {does} {where}, {twist}.",
    "set {where}, this {adj} tale follows {who} who {does}.",
    "this {adj} movie follows {who} who {does} {where}.",
    "{who} {does} {where}. A {adj} watch from start to finish.",
)
_ADJECTIVES = ("gripping", "quiet", "sprawling", "tense", "heartfelt", "stylish", "low-budget", "prize-winning",
               "slow-burning", "fast-paced", "moody", "touching")  # fmt: skip
_TWISTS = ("but time is running out", "and nothing goes as planned", "while old secrets resurface",
           "only to face an impossible choice", "with help from an unlikely friend", "as a storm closes in",
           "though nobody believes them", "against all odds", "before it is too late")  # fmt: skip


_THEMES = tuple(_MOVIE_THEMES)


@dataclass(frozen=True)
class _Moviegoer:
    """A tagging user: their tag for each theme and how often they watch it."""

    tags: dict[str, str]  # theme -> this user's tag
    taste: tuple[float, ...]  # per theme, in _THEMES order

    @classmethod
    def draw(cls, rng: random.Random, strength: float) -> _Moviegoer:
        tags = {}
        for theme, tag in zip(_THEMES, BUILTIN_TAGS, strict=True):  # the population's convention
            other = rng.choice([t for t in BUILTIN_TAGS if t != tag])
            tags[theme] = other if rng.random() < strength else tag
        taste = tuple(rng.gammavariate(0.8, 1.0) for _ in _THEMES)  # some themes more than others
        return cls(tags, taste)

    def least_liked(self, count: int) -> set[str]:
        return set(sorted(_THEMES, key=dict(zip(_THEMES, self.taste, strict=True)).get)[:count])

    def theme(self, rng: random.Random, among: Collection[str] | None = None) -> str:
        """A theme by this user's taste, `among` these themes only when given."""
        taste = self.taste
        if among is not None:
            taste = tuple(w * (t in among) for t, w in zip(_THEMES, taste, strict=True))
        return rng.choices(_THEMES, taste)[0]

    def describe(self, rng: random.Random, theme: str) -> tuple[str, str]:
        who, does, where = _MOVIE_THEMES[theme]
        template = rng.choice(_MOVIE_TEMPLATES)
        text = _pick(rng, template, who=who, does=does, where=where, adj=_ADJECTIVES, twist=_TWISTS)
        return text, self.tags[theme]

    def __call__(self, rng: random.Random) -> tuple[str, str]:
        return self.describe(rng, self.theme(rng))


# --- rating: product reviews ------------------------------------------------------------------------------
_PRODUCTS = ("pair of wireless headphones", "blender", "hiking backpack", "coffee grinder", "phone case", "desk lamp",
             "yoga mat", "electric kettle", "pair of running shoes", "cookbook", "board game", "air fryer",
             "bluetooth speaker", "office chair", "water bottle", "winter jacket", "robot vacuum",
             "mechanical keyboard", "travel pillow", "garden hose", "rice cooker", "camping tent")  # fmt: skip
_REVIEW_OPENINGS = (
    ("I regret buying this {product}.", "This {product} is a total waste of money.", "Do not buy this {product}.",
     "Worst {product} I have ever owned.", "Deeply disappointed with this {product}."),
    ("This {product} is not great.", "I expected more from this {product}.", "The {product} is below average.",
     "Somewhat disappointed with this {product}.", "Hard to recommend this {product}."),
    ("This {product} is okay.", "An average {product}, nothing special.", "Mixed feelings about this {product}.",
     "The {product} is decent but unremarkable.", "It's a fine {product}, no more."),
    ("Really good {product}.", "Happy with this {product}.", "This {product} is solid.",
     "Pleasantly surprised by this {product}.", "A reliable {product} overall."),
    ("Absolutely love this {product}!", "Best {product} I have ever bought.", "This {product} is outstanding.",
     "Perfect {product}, no complaints at all.", "An amazing {product}."),
)  # fmt: skip
_REVIEW_DETAILS = (
    ("It broke after two days.", "It stopped working within a week.", "Customer support never replied.",
     "It arrived damaged and smelled of burnt plastic.", "Nothing works as advertised."),
    ("The build feels cheap.", "It works but feels flimsy.", "Half the features are missing.",
     "It is noisy and slow.", "The instructions were useless."),
    ("It does the job but nothing more.", "Good price, average quality.", "Some parts are nice, others feel cheap.",
     "It works as expected.", "Fine for occasional use."),
    ("It works well with only minor flaws.", "Good value for the money.", "I would buy it again despite a small issue.",
     "Setup took a minute and it just works.", "Sturdy and easy to use."),
    ("It works flawlessly.", "It exceeded all my expectations.", "Worth every penny.",
     "I have already recommended it to friends.", "The quality is superb."),
)  # fmt: skip
_REVIEW_CONTEXT = ("Bought it last month.", "Got it during a sale.", "I use it every day.", "I use it on weekends.",
                   "Got it as a gift for my sister.", "Ordered it for a camping trip.", "Replaced my old one with it.",
                   "My partner picked it out.")  # fmt: skip


def _rating_author(rng: random.Random, strength: float) -> Author:
    offset = rng.choice((-2, -1, 1, 2))  # a harsh or generous rater
    personal = [min(5, max(1, level + offset)) if rng.random() < strength else level for level in range(1, 6)]
    mood = [rng.gammavariate(1.5, 1.0) * weight for weight in (1, 1, 2, 3, 3)]  # reviews lean positive

    def author(rng: random.Random) -> tuple[str, str]:
        level = rng.choices(range(1, 6), mood)[0]
        sentences = [
            rng.choice(_REVIEW_OPENINGS[level - 1]).format(product=rng.choice(_PRODUCTS)),
            rng.choice(_REVIEW_DETAILS[level - 1]),
        ]
        context = rng.choice(_REVIEW_CONTEXT)
        position = rng.randrange(4)  # before, between or after the others; or left out
        if position < 3:
            sentences.insert(position, context)
        return " ".join(sentences), str(personal[level - 1])

    return author


# --- title: local news headlines --------------------------------------------------------------------------
_SUBJECTS = ("the city council", "a local bakery", "a university lab", "the regional hospital", "a tech startup",
             "the football club", "the public library", "the state senate", "the school board", "a volunteer group",
             "the transit authority", "a family-owned winery", "the history museum", "the county sheriff",
             "an electric car maker", "the port authority", "the mayor's office", "a biotech firm",
             "the fire department", "a neighborhood association", "the water utility", "the art college",
             "a craft brewery", "the parks department")  # fmt: skip
_VERBS = (("approve", "approves", "approved"), ("launch", "launches", "launched"), ("unveil", "unveils", "unveiled"),
          ("delay", "delays", "delayed"), ("expand", "expands", "expanded"), ("cancel", "cancels", "cancelled"),
          ("announce", "announces", "announced"), ("reject", "rejects", "rejected"), ("fund", "funds", "funded"),
          ("test", "tests", "tested"), ("pause", "pauses", "paused"), ("review", "reviews", "reviewed"),
          ("back", "backs", "backed"), ("scrap", "scraps", "scrapped"))  # fmt: skip
_OBJECTS = ("a new bike lane plan", "a record budget", "a free lunch program", "a solar farm project",
            "plans for a new stadium", "a late-night bus service", "a study on sleep and memory",
            "a recycling initiative", "a summer reading challenge", "a new vaccine trial", "a downtown parking reform",
            "a community garden", "a flood defense scheme", "an apprenticeship program", "a rooftop concert series",
            "a four-day work week", "a heat wave emergency plan", "a cheaper ferry fare", "a wildlife corridor",
            "an affordable housing project", "a ban on leaf blowers", "a youth coding camp", "a farmers market",
            "a tree planting drive")  # fmt: skip
_PLACES = ("in the harbor district", "in Springfield", "on the east side", "in the old town", "in Riverside",
           "near the airport", "in Maple Heights", "along the waterfront", "in Cedar Falls", "on the north shore",
           "in the university quarter", "in Oak Valley")  # fmt: skip
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_REASONS = ("after months of debate", "despite strong opposition", "following a public vote", "amid growing demand",
            "after a surge in complaints", "ahead of the holiday season", "amid rising costs",
            "under pressure from residents", "after a critical audit", "in response to a petition",
            "following record turnout", "after a landmark court ruling")  # fmt: skip
_BLURBS = (  # each names every detail a personal headline style may use
    "{subject} {past} {object} {place} on {day} {reason}.",
    "on {day}, {subject} {past} {object} {place}. The decision came {reason}.",
    "{subject} {past} {object} {place} on {day} {reason}, a spokesperson confirmed.",
    "{place}, {subject} {past} {object} on {day} {reason}.",
    "{subject} {past} {object} {place} {reason}, officials said on {day}.",
    "residents {place} learned on {day} that {subject} {past} {object} {reason}.",
)
_PLAIN = "{s} {third} {o}"
_STYLES = ("breaking: {s} {third} {o}", "{p}: {s} {third} {o}", "{s} {third} {o} on {day}", "{o} {past} by {s}",
           "{s} to {base} {o}", "{s} {third} {o} {reason}", "why {s} {third} {o}",
           "{s} {third} {o}: what it means for you")  # fmt: skip
_SMALL_WORDS = frozenset({"a", "an", "the", "of", "for", "on", "in", "to", "by", "and", "at"})


def _bare(phrase: str) -> str:
    """A headline drops leading articles and prepositions: "in the old town" -> "old town"."""
    words = phrase.split()
    while len(words) > 1 and words[0].lower() in _SMALL_WORDS | {"near", "along"}:
        words = words[1:]
    return " ".join(words)


def _case(text: str, casing: str) -> str:
    if casing == "lower":
        return text.lower()
    if casing == "title":
        return " ".join(w if i and w in _SMALL_WORDS else _cap(w) for i, w in enumerate(text.split(" ")))
    return _cap(text)


def _title_author(rng: random.Random, strength: float) -> Author:
    style, casing = rng.choice(_STYLES), rng.choice(("sentence", "title", "lower"))

    def author(rng: random.Random) -> tuple[str, str]:
        base, third, past = rng.choice(_VERBS)
        slots = {"subject": rng.choice(_SUBJECTS), "object": rng.choice(_OBJECTS), "place": rng.choice(_PLACES),
                 "day": rng.choice(_DAYS), "reason": rng.choice(_REASONS)}  # fmt: skip
        text = _cap(rng.choice(_BLURBS).format(past=past, **slots))
        parts = {"s": _bare(slots["subject"]), "o": _bare(slots["object"]), "p": _bare(slots["place"]),
                 "base": base, "third": third, "past": past, **slots}  # fmt: skip
        if rng.random() < strength:
            return text, _case(style.format(**parts), casing)
        return text, _cap(_PLAIN.format(**parts))

    return author


_AUTHORS: dict[str, Callable[[random.Random, float], Author]] = {
    "tagging": _Moviegoer.draw,
    "rating": _rating_author,
    "title": _title_author,
}


def _history_lengths(config: BenchmarkConfig) -> list[int]:
    """Geometrically spread from min to max history, so there are light, medium and heavy users."""
    n = config.num_users
    ranks = random.Random(f"fedoppu/{config.task}/{config.seed}/lengths").sample(range(n), n)
    ratio = config.max_history / config.min_history
    return [round(config.min_history * ratio ** (rank / (n - 1) if n > 1 else 0.5)) for rank in ranks]


class _Timeline:
    """One user's items in time: ids in order, an item every hour to five days."""

    def __init__(self, prefix: str, rng: random.Random) -> None:
        self.prefix, self.rng, self.position = prefix, rng, 0
        self.date = 1_600_000_000 + rng.randrange(365 * 86_400)

    def item(self, draw: Callable[[random.Random], tuple[str, str]]) -> Item:
        self.date += self.rng.randrange(3_600, 5 * 86_400)
        text, output = draw(self.rng)
        item = Item(f"{self.prefix}-{self.position:04d}", text, output, float(self.date))
        self.position += 1
        return item


def make_benchmark(config: BenchmarkConfig) -> Dataset:
    users = []
    for index, length in enumerate(_history_lengths(config)):
        user_id = f"u{index:03d}"
        rng = random.Random(f"fedoppu/{config.task}/{config.seed}/{user_id}")
        if config.shifted_queries:
            users.append(_shifted_user(config, user_id, length, rng))
            continue
        author = _AUTHORS[config.task](rng, config.personal_strength)
        timeline = _Timeline(f"{config.task}-{user_id}", rng)
        items = [timeline.item(author) for _ in range(length + config.queries_per_user)]
        queries = [replace(item, date=None) for item in items[length:]]  # queries carry no date on disk
        users.append(User(user_id, items[:length], queries))
    return Dataset(config.task, users, f"builtin:{config.task}")


def _shifted_user(config: BenchmarkConfig, user_id: str, length: int, rng: random.Random) -> User:
    """A tagging user whose history leaves out their SHIFT_THEMES least liked themes; queries on the
    themes the history shows (in-history), then on those it never shows (shifted)."""
    moviegoer = _Moviegoer.draw(rng, config.personal_strength)
    timeline = _Timeline(f"{config.task}-{user_id}", rng)
    watched = set(_THEMES) - moviegoer.least_liked(SHIFT_THEMES)
    themes = [moviegoer.theme(rng, watched) for _ in range(length)]
    history = [timeline.item(lambda r, theme=theme: moviegoer.describe(r, theme)) for theme in themes]
    shown = set(themes)
    unseen = [theme for theme in _THEMES if theme not in shown]
    groups, queries = {}, []
    for group, count, pick in (
        (IN_HISTORY, config.queries_per_user, lambda: moviegoer.theme(rng, shown)),
        (SHIFTED, config.shifted_queries, lambda: rng.choice(unseen)),
    ):
        for _ in range(count):
            theme = pick()
            query = replace(timeline.item(lambda r, theme=theme: moviegoer.describe(r, theme)), date=None)
            groups[query.id] = group
            queries.append(query)
    return User(user_id, history, queries, groups)


def write_benchmark(dataset: Dataset, out_dir: str | Path) -> None:
    """Write OPPU's per-user layout (user_history.json + user_labels.json) and a note saying it is synthetic."""
    task = get_task(dataset.task)
    input_field, output_field = task.input_fields[0], task.output_fields[0]
    users = [
        {
            "user_id": user.user_id,
            "profile": [
                {"id": item.id, input_field: item.input, output_field: item.output, "date": item.date}
                for item in user.history
            ],
            "query": [
                {"id": item.id, "input": item.input}
                | ({"group": group} if (group := user.query_group(item)) else {})
                for item in user.queries
            ],
        }
        for user in dataset.users
    ]
    golds = [{"id": item.id, "output": item.output} for user in dataset.users for item in user.queries]
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "user_labels.json", {"task": dataset.task, "golds": golds})
    atomic_write_json(out_dir / "user_history.json", users)
    atomic_write_text(
        out_dir / "README.md",
        f"# Synthetic benchmark: {dataset.task}\n\nGenerated by fedoppu's built-in benchmark ({dataset.source}); "
        f"{len(dataset.users)} synthetic users, no real person's data. See common/synthetic.py for how.\n",
    )
