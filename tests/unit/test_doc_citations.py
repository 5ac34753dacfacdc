"""Facts the code relies on are cited from documents inside the repository: every ``docs/NAME.md#ANCHOR`` (or a range
``#X-1..3``) named in code, templates and tests exists in that document, and nothing cites the research notes that
lived outside the repository (``FACTS §n``, ``../shared/``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"docs/([a-z0-9_-]+\.md)#([A-Za-z0-9_-]+?)(?:\.\.(\d+))?(?=[^A-Za-z0-9_-]|$)")
OUTSIDE = re.compile(r"FACTS §|\.\./shared/")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "builder", "quantize", "triton_repo", "benchmarks", "tests", "Makefile",
                            "README.md", "docs"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if Path(n).suffix in (".py", ".md", ".tmpl", ".yaml", ".sh", ".j2", "") and
            (REPO / n).is_file() and n != "tests/unit/test_doc_citations.py"]


def _anchors(doc: str) -> set[str]:
    text = (REPO / "docs" / doc).read_text(encoding="utf-8")
    return set(re.findall(r'<a id="([^"]+)"', text)) | set(re.findall(r"\*\*([A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+)\*\*", text))


def citations(text: str) -> list[tuple[str, str]]:
    """(document, anchor) for each citation in ``text``; a range ``X-1..3`` expands to X-1, X-2, X-3."""
    out = []
    for doc, anchor, last in CITATION.findall(text):
        if last:
            stem, first = anchor.rsplit("-", 1)
            out += [(doc, f"{stem}-{i}") for i in range(int(first), int(last) + 1)]
        else:
            out.append((doc, anchor))
    return out


def test_every_cited_anchor_exists():
    files = _tracked_text_files()
    found, missing = 0, []
    anchors: dict[str, set[str]] = {}
    for path in files:
        for doc, anchor in citations(path.read_text(encoding="utf-8", errors="replace")):
            found += 1
            if not (REPO / "docs" / doc).is_file():
                missing.append(f"{path.relative_to(REPO)}: docs/{doc} does not exist")
                continue
            if anchor not in anchors.setdefault(doc, _anchors(doc)):
                missing.append(f"{path.relative_to(REPO)}: docs/{doc}#{anchor}")
    assert found > 30  # the walk found the citations
    assert missing == []


def test_nothing_cites_notes_outside_the_repository():
    offenders = [str(p.relative_to(REPO)) for p in _tracked_text_files()
                 if OUTSIDE.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []


def test_the_checks_can_fail():
    assert citations("see docs/upstream-facts.md#U-HF-1..3.") == [
        ("upstream-facts.md", "U-HF-1"), ("upstream-facts.md", "U-HF-2"), ("upstream-facts.md", "U-HF-3")]
    assert ("upstream-facts.md", "U-NOPE-9") not in {(d, a) for d, a in citations("docs/upstream-facts.md#U-HF-1")}
    assert "U-NOPE-9" not in _anchors("upstream-facts.md")
    assert OUTSIDE.search("as FACTS §3b says")
