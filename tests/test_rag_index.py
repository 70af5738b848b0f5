"""Document index: chunking with locations, the SQLite store, incremental re-indexing and interruption safety.

These use a hashed bag-of-words stand-in for the embedding model (tests/_rag.py), so they run in seconds; the real
model's retrieval quality is tested in test_rag_retrieval.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _rag import HashEmbedder

from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.rag.chunking import chunk_file, chunk_text, read_document
from llmlab.rag.index import INDEX_FILE, build_index, open_index
from llmlab.rag.store import Store


def write_pdf(path: Path, pages: list[str]) -> Path:
    """A minimal valid PDF with one line of Helvetica text per page (xref offsets computed)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               "<< /Type /Pages /Kids [" + " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages))) +
               f"] /Count {len(pages)} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


@pytest.fixture
def embedder():
    return HashEmbedder()


@pytest.fixture
def docs(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "volcano.md").write_text("# Volcanoes\n\nMount Keldar erupted in 1887.\nIts ash reached the coast.\n")
    (root / "sub" / "tea.txt").write_text("Green tea is steeped at 80 degrees.\nBlack tea needs boiling water.\n")
    (root / ".hidden.md").write_text("secret")
    (root / "image.png").write_bytes(b"\x89PNG")
    write_pdf(root / "manual.pdf", ["The pump starts with the red lever.", "Clean the filter every week."])
    return root


# -- chunking ------------------------------------------------------------------------------------------
def test_chunks_overlap_keep_words_whole_and_know_their_lines(embedder):
    lines = [f"Line {i} talks about topic{i} and nothing else." for i in range(1, 41)]
    text = "\n".join(lines)
    chunks = chunk_text(text, embedder.tokenizer, max_tokens=40, overlap=10)
    assert len(chunks) > 5
    for c in chunks:
        assert c.text in text  # an exact slice of the document
        first, last = c.text.splitlines()[0], c.text.splitlines()[-1]
        assert first in lines[c.line_start - 1] and last in lines[c.line_end - 1]
        assert c.text.split()[0] in lines[c.line_start - 1].split()  # starts at a word boundary
    for a, b in zip(chunks, chunks[1:]):
        assert b.line_start <= a.line_end  # consecutive chunks share text
    with pytest.raises(LLMLabError, match="--overlap must be >= 0 and smaller than --chunk-tokens"):
        chunk_text(text, embedder.tokenizer, max_tokens=40, overlap=40)


def test_pdf_pages_and_file_errors(docs, embedder, tmp_path):
    assert read_document(docs / "manual.pdf") == [(1, "The pump starts with the red lever."),
                                                  (2, "Clean the filter every week.")]
    chunks = chunk_file(docs / "manual.pdf", embedder.tokenizer)
    assert [(c.page, c.line_start) for c in chunks] == [(1, 1), (2, 1)]
    with pytest.raises(LLMLabError, match="unsupported file type '.png'"):
        read_document(docs / "image.png")
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 not really")
    with pytest.raises(LLMLabError, match="bad.pdf: cannot read this PDF"):
        read_document(tmp_path / "bad.pdf")


# -- building and searching ---------------------------------------------------------------------------------
def test_index_and_hybrid_search(docs, embedder, tmp_path):
    stats = build_index([docs], tmp_path / "idx", embedder=embedder, progress=False)
    assert (stats.added, stats.files) == (3, 3)  # .md, .txt, .pdf; hidden and .png skipped
    index = open_index(tmp_path / "idx", embedder=embedder)
    hit = index.search("When did Mount Keldar erupt?", k=2)[0]
    assert hit.path.endswith("volcano.md") and "1887" in hit.text
    assert hit.location.endswith("volcano.md, lines 1-4")
    pdf = index.search("how do I clean the filter", k=1)[0]
    assert pdf.page == 2 and pdf.location.endswith("manual.pdf, page 2, line 1")
    # the keyword side finds an exact rare word even when vectors alone would not rank it first
    assert index.store.keyword_ranking("boiling", 5) and "tea.txt" in index.search("boiling", 1)[0].path
    with pytest.raises(LLMLabError, match="the search query is empty"):
        index.search("  ")


def test_reindex_only_changed_files_and_drop_deleted(docs, embedder, tmp_path):
    out = tmp_path / "idx"
    build_index([docs], out, embedder=embedder, progress=False)
    before = embedder.texts
    again = build_index([docs], out, embedder=embedder, progress=False)
    assert (again.unchanged, again.added, again.updated, again.chunks_embedded) == (3, 0, 0, 0)
    assert embedder.texts == before  # nothing was embedded again

    tea = docs / "sub" / "tea.txt"
    tea.write_text("Oolong tea is steeped at 90 degrees.\n")
    os.utime(docs / "volcano.md")  # touched, same content: not re-embedded
    (docs / "manual.pdf").unlink()
    (docs / "new.md").write_text("Penguins live in the south.\n")
    stats = build_index([docs], out, embedder=embedder, progress=False)
    assert (stats.added, stats.updated, stats.unchanged, stats.removed) == (1, 1, 1, 1)
    assert stats.chunks_embedded == 2 and stats.files == 3
    index = open_index(out, embedder=embedder)
    paths = {Path(p).name for p in index.store.files()}
    assert paths == {"volcano.md", "tea.txt", "new.md"}
    texts = [h.text for h in index.search("tea steeped degrees", 5)]
    assert any("Oolong" in t for t in texts) and not any("Green tea" in t for t in texts)
    assert not any("pump" in h.text for h in index.search("pump lever", 5))
    files, chunks = index.store.count()
    fts = index.store.conn.execute("SELECT count(*) FROM chunks_fts").fetchone()[0]
    vec = index.store.conn.execute("SELECT count(*) FROM chunks_vec").fetchone()[0]
    assert files == 3 and chunks == fts == vec  # no orphaned keywords or vectors


def test_changed_chunk_settings_rechunk_and_other_embedder_is_refused(docs, embedder, tmp_path):
    out = tmp_path / "idx"
    build_index([docs], out, embedder=embedder, progress=False)
    stats = build_index([docs], out, embedder=embedder, chunk_tokens=50, overlap=5, progress=False)
    assert stats.updated == 3

    class Other(HashEmbedder):
        name = "test/other"

    with pytest.raises(LLMLabError, match="built with the embedding model test/hash-bag-of-words, not test/other"):
        build_index([docs], out, embedder=Other(), progress=False)


def test_interrupted_run_leaves_the_previous_index(docs, embedder, tmp_path):
    out = tmp_path / "idx"
    build_index([docs], out, embedder=embedder, progress=False)
    (docs / "volcano.md").write_text("# Volcanoes\n\nMount Keldar is dormant now.\n")
    (docs / "sub" / "tea.txt").unlink()

    class Failing(HashEmbedder):
        def encode(self, texts):
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run

    with pytest.raises(KeyboardInterrupt):
        build_index([docs], out, embedder=Failing(), progress=False)
    index = open_index(out, embedder=embedder)
    assert {Path(p).name for p in index.store.files()} == {"volcano.md", "tea.txt", "manual.pdf"}
    assert "1887" in index.search("Keldar erupted", 1)[0].text
    index.close()
    stats = build_index([docs], out, embedder=embedder, progress=False)
    assert (stats.updated, stats.removed) == (1, 1)


KILLED_RUN = """
import time
from pathlib import Path
from _rag import HashEmbedder
from llmlab.rag.index import build_index

class Slow(HashEmbedder):
    def encode(self, texts):
        print("embedding", flush=True)
        time.sleep(60)

build_index([Path({docs!r})], Path({out!r}), embedder=Slow(), progress=False)
"""


def test_killed_run_leaves_the_previous_index_searchable(docs, embedder, tmp_path):
    out = tmp_path / "idx"
    build_index([docs], out, embedder=embedder, progress=False)
    (docs / "volcano.md").write_text("Mount Keldar is dormant now.\n")
    (docs / "more.md").write_text("Another file.\n")
    script = KILLED_RUN.format(docs=str(docs), out=str(out))
    tests = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(tests)}  # the child imports _rag as the tests do
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "embedding"  # inside the write transaction
        index = open_index(out, embedder=embedder)  # readers still see the last committed index meanwhile
        assert "1887" in index.search("Keldar", 1)[0].text
        index.close()
    finally:
        proc.kill()
        proc.wait()
    index = open_index(out, embedder=embedder)
    assert {Path(p).name for p in index.store.files()} == {"volcano.md", "tea.txt", "manual.pdf"}
    assert "1887" in index.search("Keldar", 1)[0].text
    index.close()
    assert build_index([docs], out, embedder=embedder, progress=False).added == 1


def test_errors(tmp_path, docs, embedder):
    with pytest.raises(LLMLabError, match="missing: no such file or folder"):
        build_index([tmp_path / "missing"], tmp_path / "idx", embedder=embedder)
    with pytest.raises(LLMLabError, match="image.png: unsupported file type '.png'"):
        build_index([docs / "image.png"], tmp_path / "idx", embedder=embedder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMLabError, match="no .txt, .md, .markdown, .rst or .pdf files under"):
        build_index([tmp_path / "empty"], tmp_path / "idx", embedder=embedder)
    with pytest.raises(LLMLabError, match="no index here"):
        open_index(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / INDEX_FILE).write_text("not a database " * 100)
    with pytest.raises(LLMLabError, match="not a usable index database"):
        Store(tmp_path / "junk" / INDEX_FILE)


def test_cli_takes_several_paths(tmp_path, docs, monkeypatch, capsys):
    import llmlab.rag.index as index_module

    monkeypatch.setattr(index_module, "Embedder", HashEmbedder)
    out = tmp_path / "idx"
    assert main(["index", str(docs / "volcano.md"), str(docs / "sub"), "--out", str(out), "--progress", "false"]) == 0
    assert "2 files" in capsys.readouterr().out
    assert main(["index", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err


def test_progress_bar_goes_to_stderr(tmp_path, docs, embedder, capsys):
    build_index([docs], tmp_path / "idx", embedder=embedder, progress=True)
    assert "indexing" in capsys.readouterr().err


# -- result diversity and `llmlab search` ----------------------------------------------------------------
BLENDER_MANUAL = ("# Orion blender: quick start\n\n"
                  "How long should the Orion blender run? Blend soups for one minute and smoothies for forty seconds.\n"
                  "The Orion blender jug holds one and a half litres; fill it no higher than the top line.\n"
                  "How long is the power cord? The Orion blender cord is one metre long.\n"
                  "Clean the Orion blender jug with warm water after each use; the blades are sharp.\n"
                  "If the Orion blender stops, let the motor cool for how long it takes to read this page.\n")
QUESTION = "How long is the guarantee on the Orion blender?"
WARRANTY = "Every Orion blender is covered by a warranty of two years from the date of purchase."


@pytest.fixture
def crowded(tmp_path, embedder):
    """A long page whose chunks all share the question's words, next to the short page that answers it."""
    root = tmp_path / "crowded"
    root.mkdir()
    (root / "blender-manual.md").write_text(BLENDER_MANUAL)
    (root / "warranty.md").write_text(f"# Warranty\n\n{WARRANTY}\n")
    (root / "toaster.md").write_text("# Vega toaster\n\nThe Vega toaster browns bread in two minutes.\n")
    (root / "kettle.md").write_text("# Kettle\n\nThe kettle boils a litre of water in three minutes.\n")
    build_index([root], tmp_path / "crowded-idx", embedder=embedder, chunk_tokens=30, overlap=5, progress=False)
    return tmp_path / "crowded-idx"


def test_search_takes_at_most_two_chunks_of_a_file_while_other_files_match(crowded, embedder):
    index = open_index(crowded, embedder=embedder)
    names = lambda hits: [Path(h.path).name for h in hits]  # noqa: E731
    # ranked by score alone, three chunks of the manual fill the top 3 and the page with the answer is missed
    assert names(index.search(QUESTION, 3, max_per_file=None)) == ["blender-manual.md"] * 3
    hits = index.search(QUESTION, 3)
    assert names(hits) == ["blender-manual.md", "blender-manual.md", "warranty.md"]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert names(index.search(QUESTION, 3, max_per_file=1))[:2] == ["blender-manual.md", "warranty.md"]
    with pytest.raises(LLMLabError, match="at most N passages per file: N must be at least 1, got 0"):
        index.search(QUESTION, 3, max_per_file=0)


def test_one_matching_file_still_gives_k_passages(tmp_path, embedder):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "blender-manual.md").write_text(BLENDER_MANUAL)
    build_index([tmp_path / "only"], tmp_path / "idx", embedder=embedder, chunk_tokens=30, overlap=5,
                progress=False)
    hits = open_index(tmp_path / "idx", embedder=embedder).search(QUESTION, 3)
    assert len(hits) == 3 and len({h.chunk_id for h in hits}) == 3


def test_cli_search_prints_file_lines_score_and_text(crowded, monkeypatch, capsys):
    import llmlab.rag.index as index_module

    monkeypatch.setattr(index_module, "Embedder", HashEmbedder)
    assert main(["search", str(crowded), QUESTION, "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    heads = [line for line in out if not line.startswith("    |")]
    assert len(heads) == 3 and heads[2].startswith("3. ") and "warranty.md, lines 1-3  (score 0.0" in heads[2]
    assert f"    | {WARRANTY}" in out
    assert main(["search", str(crowded), QUESTION, "--k", "2", "--text", "false", "--max-per-file", "null"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("blender-manual.md, lines" in line for line in out)
    assert main(["search", str(crowded.parent / "nope"), QUESTION]) == 2
    assert "nope: no index here" in capsys.readouterr().err
