import pytest
import torch

from common.data import Item
from common.profiles import (
    ProfileCache,
    generated_profile,
    history_fingerprint,
    profile_prompt,
    summary_profile,
)
from common.tasks import TASKS

TAGS = [
    Item(f"t{i}", f"A haunted house story number {i}.", tag)
    for i, tag in enumerate(["horror", "horror", "war"])
]
RATINGS = [Item(f"r{i}", "Solid kettle.", score) for i, score in enumerate(["4", "5", "4", "2"])]
TITLES = [
    Item("a", "The council approved a plan.", "Breaking: council approves plan"),
    Item("b", "The club launched a program.", "Breaking: club launches program"),
    Item("c", "The lab delayed a trial.", "Lab delays trial"),
]


def test_summary_profile_of_labels():
    text = summary_profile(TASKS["tagging"], TAGS)
    assert text.startswith("User profile from 3 past items. Most frequent labels: horror (67%), war (33%).")
    assert "Frequent topics: haunted, house, story, number" in text
    assert text == summary_profile(TASKS["tagging"], TAGS)


def test_summary_profile_of_ratings():
    text = summary_profile(TASKS["rating"], RATINGS)
    assert "Mean rating 3.8; most common ratings: 4 (50%), 5 (25%), 2 (25%)." in text


def test_summary_profile_of_writing_style():
    text = summary_profile(TASKS["title"], TITLES)
    assert "Typical output length 4 words; common first words: breaking: (67%), lab (33%)" in text
    assert "frequent words: breaking, council" in text
    assert summary_profile(TASKS["title"], []) == "No history yet."


def test_profile_prompt_uses_oppus_wording_over_the_newest_items():
    prompt = profile_prompt(TASKS["tagging"], TAGS, max_items=2)
    assert prompt.startswith("Look at the following past movies this user has watched")
    assert "number 0" not in prompt
    assert "description: A haunted house story number 1. tag: horror\ndescription:" in prompt
    assert prompt.endswith("number 2. tag: war Answer:")
    assert "User History:  Answer:" in profile_prompt(TASKS["tagging"], TAGS, max_items=0)


def test_history_fingerprint_tracks_the_history():
    assert history_fingerprint(TAGS) == history_fingerprint(list(TAGS))
    assert len(history_fingerprint(TAGS)) == 64
    assert history_fingerprint(TAGS) != history_fingerprint(TAGS[:2])
    changed = [*TAGS[:2], Item("t2", TAGS[2].input, "space")]
    assert history_fingerprint(TAGS) != history_fingerprint(changed)


def test_profile_cache_builds_once_per_history(tmp_path):
    cache = ProfileCache(tmp_path)
    calls = []

    def build(text):
        def make():
            calls.append(text)
            return text

        return make

    assert cache.get_or_build("u1", "summary", TAGS, build("first")) == "first"
    assert cache.get_or_build("u1", "summary", TAGS, build("again")) == "first"
    assert ProfileCache(tmp_path).get_or_build("u1", "summary", TAGS, build("again")) == "first"  # on disk
    assert calls == ["first"]
    assert cache.get_or_build("u1", "generated", TAGS, build("model")) == "model"  # modes are separate
    assert cache.get_or_build("u1", "summary", TAGS[:2], build("newer")) == "newer"  # history changed
    files = sorted(p.name.split("-")[0] for p in tmp_path.rglob("*.txt"))
    assert files == ["generated", "summary"]  # the stale summary is gone
    cache.delete("u1")
    assert list(tmp_path.rglob("*.txt")) == []
    cache.delete("nobody")  # deleting an unknown user is fine


def test_profile_cache_keeps_odd_user_ids_inside_its_root(tmp_path):
    cache = ProfileCache(tmp_path / "cache")
    cache.get_or_build("../../etc/passwd", "summary", TAGS, lambda: "a")
    cache.get_or_build("a/b", "summary", TAGS, lambda: "b")
    cache.get_or_build("a_b", "summary", TAGS, lambda: "c")
    written = list((tmp_path / "cache").rglob("*.txt"))
    assert len(written) == 3 and all(p.parent.parent == tmp_path / "cache" for p in written)
    with pytest.raises(ValueError, match="profile mode must be letters"):
        cache.get_or_build("u", "../x", TAGS, lambda: "x")


def test_generated_profile_is_the_models_greedy_continuation(tiny_model):
    model, tokenizer = tiny_model
    text = generated_profile(TASKS["tagging"], TAGS, model, tokenizer, max_new_tokens=8)
    assert text == generated_profile(TASKS["tagging"], TAGS, model, tokenizer, max_new_tokens=8)
    prompt_ids = tokenizer(profile_prompt(TASKS["tagging"], TAGS, tokenizer=tokenizer), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt_ids, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, prompt_ids["input_ids"].shape[1] :]
    assert text == tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    assert "User History" not in text
