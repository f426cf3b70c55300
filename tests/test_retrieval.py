import logging

from common.data import Item
from common.prompts import build_prompt, cut_text, target_text
from common.retrieval import HistoryRetriever, tokenize_words
from common.tasks import TASKS

TAGGING = TASKS["tagging"]
HISTORY = [
    Item("h0", "A pilot repairs a reactor aboard an orbiting station.", "space"),
    Item("h1", "A detective reopens a cold murder case.", "crime"),
    Item("h2", "A baker falls for a charming stranger in Paris.", "romance"),
    Item("h3", "A medic survives a brutal siege.", "war"),
    Item("h4", "A detective tracks a killer in Chicago.", "crime"),
    Item("h5", "An astronaut repairs the station reactor again.", "space"),
]


def test_tokenize_words_drops_stopwords_and_case():
    assert tokenize_words("The Detective and THE killer, is it?") == ["detective", "killer"]


def test_top_k_ranks_the_most_relevant_first():
    retriever = HistoryRetriever(TAGGING, HISTORY)
    assert [i.id for i in retriever.top_k("a detective and a murder", 2)] == ["h1", "h4"]
    # both share all three words; BM25 favours the shorter item
    assert [i.id for i in retriever.top_k("station reactor repairs", 2)] == ["h5", "h0"]


def test_before_only_sees_older_items_so_the_target_never_leaks():
    retriever = HistoryRetriever(TAGGING, HISTORY)
    for index, item in enumerate(HISTORY):
        found = retriever.top_k(item.input, 3, before=index)
        assert item not in found
        assert all(HISTORY.index(other) < index for other in found)
        prompt = build_prompt(TAGGING, item.input, retrieved=found)
        assert f"{item.input} tag: {item.output}" not in prompt
    assert [i.id for i in retriever.top_k("detective", 1, before=4)] == ["h1"]


def test_edge_cases_do_not_crash():
    retriever = HistoryRetriever(TAGGING, HISTORY)
    assert retriever.top_k("detective", 0) == []
    assert retriever.top_k("detective", 3, before=0) == []
    assert retriever.top_k("detective", 3, before=-2) == []
    assert len(retriever.top_k("detective", 50)) == len(HISTORY)
    assert HistoryRetriever(TAGGING, []).top_k("anything", 3) == []
    single = HistoryRetriever(TAGGING, HISTORY[:1])
    assert single.top_k("reactor", 2) == HISTORY[:1]
    # no shared word (or only stopwords): the newest items still come back, so prompts keep their shape
    assert [i.id for i in retriever.top_k("zebra", 2)] == ["h5", "h4"]
    assert [i.id for i in retriever.top_k("the of and", 2, before=3)] == ["h2", "h1"]
    blank = HistoryRetriever(TASKS["LaMP-7"], [Item("t", "", "")])
    assert blank.top_k("hello", 1) == [Item("t", "", "")]


def test_retrieval_is_deterministic():
    first = HistoryRetriever(TAGGING, HISTORY).top_k("a detective repairs a reactor", 4)
    assert first == HistoryRetriever(TAGGING, HISTORY).top_k("a detective repairs a reactor", 4)


class CharTokenizer:
    """Every character is one token: enough to check that cutting and budgets use the tokenizer."""

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_build_prompt_puts_profile_then_items_then_question():
    prompt = build_prompt(TAGGING, "A ghost story.", retrieved=HISTORY[:2], profile="Likes space.")
    assert prompt == (
        "Likes space.\n"
        "description: A pilot repairs a reactor aboard an orbiting station. tag: space\n"
        "description: A detective reopens a cold murder case. tag: crime\n"
        + TAGGING.query_prompt("A ghost story.")
    )
    assert build_prompt(TAGGING, "x") == TAGGING.query_prompt("x")


def test_build_prompt_cuts_items_and_keeps_to_the_budget():
    long_item = Item("l", " ".join(f"w{i}" for i in range(100)), "space")
    prompt = build_prompt(TAGGING, "q", retrieved=[long_item], max_item_tokens=5)
    assert "description: w0 w1 w2 w3 w4 tag: space\n" in prompt
    # each line costs 8 words here; a budget of 20 fits two, then the question follows regardless
    items = [Item(str(i), f"a{i} b{i} c{i} d{i} e{i}", "war") for i in range(5)]
    prompt = build_prompt(TAGGING, "q", retrieved=items, max_context_tokens=20)
    assert "a0 b0" in prompt and "a1 b1" in prompt and "a2" not in prompt
    assert prompt.endswith(TAGGING.query_prompt("q"))
    # the profile is cut to the budget first and leaves no room for items
    prompt = build_prompt(TAGGING, "q", retrieved=items, profile="p " * 40, max_context_tokens=10)
    assert prompt.split("\n")[0] == " ".join(["p"] * 10) and "a0" not in prompt


def test_build_prompt_counts_tokens_with_a_tokenizer():
    tokenizer = CharTokenizer()
    assert cut_text("abcdef", 3, tokenizer) == "abc"
    assert cut_text("abc", 3, tokenizer) == "abc"
    prompt = build_prompt(
        TAGGING, "q", retrieved=[Item("1", "abcdefgh", "war")], tokenizer=tokenizer, max_item_tokens=4
    )
    assert "description: abcd tag: war" in prompt
    too_small = build_prompt(TAGGING, "q", retrieved=HISTORY[:1], tokenizer=tokenizer, max_context_tokens=20)
    assert too_small == TAGGING.query_prompt("q")


def test_target_follows_the_prompt_after_a_space():
    assert target_text(TAGGING, HISTORY[0]) == " space"
    assert TAGGING.query_prompt("x").endswith("tag:")


def test_building_an_index_logs_nothing_below_a_warning(caplog):
    """bm25s sets its logger to DEBUG: each index would put a line in a run's log (Ray forwards it)."""
    with caplog.at_level(logging.DEBUG):
        HistoryRetriever(TAGGING, HISTORY).top_k("a detective and a murder", 2)
    assert [record.getMessage() for record in caplog.records if record.name.startswith("bm25s")] == []
