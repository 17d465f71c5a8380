"""Build ``peft_state_tuning/data/kjv/kjv.tsv.gz`` (the bundled corpus) from Debian's ``bible-kjv-text``.

The King James Version (1611) is in the public domain (outside the UK, where Crown letters patent apply; see
``peft_state_tuning/data/kjv/README.md``). Debian ships it in ``bible-kjv-text`` in its own compressed format, read
by the ``bible`` program of the ``bible-kjv`` package. Run as root on Debian/Ubuntu::

    apt-get update && apt-get install -y bible-kjv        # pulls bible-kjv-text
    python scripts/make_kjv_corpus.py                      # writes the .tsv.gz (about 1.3 MB)

Output: one verse a line, ``book<TAB>chapter<TAB>verse<TAB>text``, 31102 lines, UTF-8 (the text is ASCII), gzip
with a fixed mtime so that the file is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "peft_state_tuning" / "data" / "kjv" / "kjv.tsv.gz"


def parse(listing: str) -> list[tuple[str, int, int, str]]:
    """Parse ``bible -l100000 Gen1:1-Rev22:21``: chapter headers ``"Genesis 1"``, verses ``"  1 text"``."""
    rows, book, chapter = [], None, None
    for line in listing.splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"  (\d+) (.*)", line)
        if m:
            if book is None:
                raise ValueError(f"verse before any chapter header: {line!r}")
            rows.append((book, chapter, int(m.group(1)), m.group(2).strip()))
            continue
        m = re.fullmatch(r"(.+) (\d+)", line.strip())
        if not m:
            raise ValueError(f"unexpected line: {line!r}")
        book, chapter = m.group(1), int(m.group(2))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    listing = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    rows = parse(listing)
    books = list(dict.fromkeys(r[0] for r in rows))
    assert len(books) == 66 and len(rows) == 31102, (len(books), len(rows))
    text = "".join(f"{b}\t{c}\t{v}\t{t}\n" for b, c, v, t in rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="kjv.tsv", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    args.out.write_bytes(buf.getvalue())
    print(f"{len(rows)} verses, {len(books)} books, {len(text.encode())} bytes -> {args.out} ({len(buf.getvalue())} bytes)")


if __name__ == "__main__":
    main()
