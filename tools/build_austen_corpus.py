"""Rebuild builder/data/corpus/ from Debian's ``r-cran-janeaustenr`` package (Jane Austen's six novels, as
prepared from Project Gutenberg by the janeaustenr R package).

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb pkg
    python tools/build_austen_corpus.py pkg/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb

R's lazy-load database is a run of records (4-byte big-endian length, then a zlib stream); each record is one
serialised R character vector (XDR format 3), one element per line of the novel. No R is needed to read it.
Cleaning: drop the text notes that follow a novel, remove the ``_italic_`` underscores, join each paragraph's
hard-wrapped lines into one line, one blank line between paragraphs. Split: the last 5 % (by characters) of every
novel's paragraphs is held out, the rest is training text; both are deterministic functions of the package.
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "builder" / "data" / "corpus"
HELD_OUT_FRACTION = 0.05
TRAILING_NOTES = ("A NOTE ON THE TEXT",)


def records(rdb: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(rdb):
        d = zlib.decompressobj()
        out.append(d.decompress(rdb[pos + 4:]))
        pos = len(rdb) - len(d.unused_data)
    return out


def character_vector(raw: bytes) -> list[str]:
    assert raw[:2] == b"X\n", "not an XDR-serialised R object"
    p = 2 + 12
    (enc_len,) = struct.unpack(">i", raw[p:p + 4])
    p += 4 + enc_len
    flags, n = struct.unpack(">ii", raw[p:p + 8])
    p += 8
    assert flags & 0xFF == 16, "not a character vector"
    lines = []
    for _ in range(n):
        _, length = struct.unpack(">ii", raw[p:p + 8])
        p += 8
        if length < 0:
            lines.append("")
            continue
        lines.append(raw[p:p + length].decode("utf-8"))
        p += length
    return lines


def paragraphs(lines: list[str]) -> list[str]:
    text = "\n".join(lines)
    for note in TRAILING_NOTES:
        text = text.split("\n" + note + "\n")[0]
    text = re.sub(r"_([^_]+)_", r"\1", text)
    paras = [" ".join(part.split()) for part in re.split(r"\n\s*\n", text)]
    return [p for p in paras if p]


def main(rdb_path: str) -> None:
    train, held = [], []
    for raw in records(Path(rdb_path).read_bytes()):
        paras = paragraphs(character_vector(raw))
        total = sum(len(p) for p in paras)
        cut, acc = len(paras), 0
        while cut > 0 and acc < HELD_OUT_FRACTION * total:
            cut -= 1
            acc += len(paras[cut])
        train.append("\n\n".join(paras[:cut]))
        held.append("\n\n".join(paras[cut:]))
    (CORPUS / "heldout").mkdir(exist_ok=True)
    (CORPUS / "austen-train.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (CORPUS / "heldout" / "austen-heldout.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
