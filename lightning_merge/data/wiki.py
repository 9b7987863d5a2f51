"""A MediaWiki XML dump turned into plain-text articles: parse, strip markup, split by article, cache.

The dump is streamed (``bz2`` + ``xml.etree.ElementTree.iterparse``), so memory stays flat for dumps of any size.
Markup is stripped with balanced-bracket scanners for the nested constructs (templates, tables, links) and regular
expressions for the flat ones; nothing here needs a wiki parser dependency. Cleaned articles are cached as jsonl
under the cache root, keyed by the sha256 of the dump and :data:`CLEANER_VERSION`, so later runs skip the parse.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from lightning_merge.data.offline import cache_dir, fetch, sha256_file
from lightning_merge.errors import DataError
from lightning_merge.io import read_verified, write_verified

# Bump when strip_markup changes output, so stale caches are not reused.
CLEANER_VERSION = 1

# Sections at the end of an article that hold citations and link lists, not prose.
_BACK_MATTER = {
    "see also",
    "references",
    "notes",
    "footnotes",
    "citations",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "notes and references",
}
_DROPPED_NAMESPACES = {"file", "image", "category", "media"}
# Tags whose whole content is dropped (not prose: references, formulas, galleries, code).
_DROP_CONTENT_TAGS = "ref|math|gallery|timeline|imagemap|score|chem|hiero|syntaxhighlight|source|pre|graph|templatedata"

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_SELF_CLOSING_REF = re.compile(r"<ref\b[^<>]*/\s*>", re.IGNORECASE)
_CONTENT_TAGS = re.compile(rf"<({_DROP_CONTENT_TAGS})\b[^<>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]", re.IGNORECASE)
_BARE_URL = re.compile(r"(?:https?|ftp)://\S+", re.IGNORECASE)
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.MULTILINE)
_QUOTES = re.compile(r"'{2,5}")
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*?/?>")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$|^simple$")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_SPACES = re.compile(r"[ \t\u00a0]+")
_DISAMBIGUATION = re.compile(r"\{\{\s*(?:disambig|dab|hndis|geodis|set index)", re.IGNORECASE)
_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)


@dataclass(frozen=True)
class Article:
    """One cleaned article: its title and plain text (paragraphs separated by newlines)."""

    title: str
    text: str


def _replace_balanced(text: str, opener: str, closer: str, replace: Callable[[str], str]) -> str:
    """Replace each outermost ``opener ... closer`` span by ``replace(inner)``; nesting is tracked with a counter.

    An opener that is never closed is kept literally (a stray ``{{`` must not swallow the rest of the article).
    """
    pattern = re.compile(re.escape(opener) + "|" + re.escape(closer))
    out: list[str] = []
    depth, start, last = 0, 0, 0
    for match in pattern.finditer(text):
        if match.group() == opener:
            if depth == 0:
                start = match.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[last:start])
                out.append(replace(text[start + len(opener) : match.start()]))
                last = match.end()
    if depth > 0:  # unclosed: keep the opener, but still clean what follows it
        tail = text[start + len(opener) :]
        out.append(text[last:start] + opener + _replace_balanced(tail, opener, closer, replace))
    else:
        out.append(text[last:])
    return "".join(out)


def _link_text(inner: str) -> str:
    """The visible text of a wiki link ``[[inner]]``: '' for files, categories and interlanguage links."""
    target, _, label = inner.partition("|")
    namespace, colon, _ = target.lstrip(":").partition(":")
    if colon and namespace.strip().lower() in _DROPPED_NAMESPACES and not target.startswith(":"):
        return ""
    if colon and not label and not target.startswith(":") and _INTERLANGUAGE.match(namespace.strip()):
        return ""
    if label:  # the label may itself hold links (rare); the last pipe separates it in file captions
        return _replace_balanced(label.rpartition("|")[2] if "[[" not in label else label, "[[", "]]", _link_text)
    return target.lstrip(":").split("#")[0] if not target.startswith("#") else target[1:]


def _drop_back_matter(text: str) -> str:
    """Remove headings, and whole sections (up to the next heading) such as 'References' or 'External links'."""
    out: list[str] = []
    last, keep = 0, True
    for match in _HEADING.finditer(text):
        if keep:
            out.append(text[last : match.start()])
        keep = match.group(2).strip().lower() not in _BACK_MATTER
        last = match.end()
    if keep:
        out.append(text[last:])
    return "".join(out)


def _tidy_lines(text: str) -> str:
    """Strip list markers and table leftovers, collapse spaces, keep non-empty lines as paragraphs."""
    lines = []
    for raw in text.splitlines():
        line = _LIST_MARKER.sub("", raw.strip())
        if not line or line[0] in "|!{}" or not any(ch.isalnum() for ch in line):
            continue
        line = _SPACES.sub(" ", _EMPTY_BRACKETS.sub("", line))
        lines.append(_SPACE_BEFORE_PUNCT.sub(r"\1", line).strip())
    return "\n".join(line for line in lines if line)


def strip_markup(wikitext: str) -> str:
    """Turn MediaWiki markup into plain text.

    Removes comments, ``<ref>`` (paired and self-closing) and other non-prose tags with their content, templates
    (nested ``{{...}}``), tables (``{| ... |}``), files, categories and interlanguage links; keeps the visible text
    of ``[[target|text]]`` and ``[http://url text]``; drops headings and back-matter sections ('References',
    'External links', ...), bold/italic quotes, remaining HTML tags, magic words and entities.

    Args:
        wikitext: The raw text of one page, XML-unescaped (as the dump parser returns it).

    Returns:
        Plain text, one paragraph per line.
    """
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSING_REF.sub("", text)
    text = _CONTENT_TAGS.sub("", text)
    text = _replace_balanced(text, "{{", "}}", lambda _: "")
    text = _replace_balanced(text, "{|", "|}", lambda _: "")
    text = _replace_balanced(text, "[[", "]]", _link_text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _drop_back_matter(text)
    text = _QUOTES.sub("", text)
    text = _HTML_TAG.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = html.unescape(text)  # entities last: an escaped '&lt;tag&gt;' in prose stays literal text
    return _tidy_lines(text)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]  # '{http://www.mediawiki.org/xml/export-0.10/}page' -> 'page'


def iter_pages(dump: str | Path) -> Iterator[tuple[str, int, bool, str]]:
    """Stream ``(title, namespace, is_redirect, wikitext)`` for every page of a (bz2) MediaWiki XML dump."""
    opener = bz2.open if str(dump).endswith(".bz2") else open
    with opener(dump, "rb") as handle:
        context = ElementTree.iterparse(handle, events=("start", "end"))
        _, root = next(context)
        for event, element in context:
            if event != "end" or _local(element.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in element.iter()}
            title = (fields["title"].text or "") if "title" in fields else ""
            namespace = int(fields["ns"].text or 0) if "ns" in fields else 0
            text = (fields["text"].text or "") if "text" in fields else ""
            yield title, namespace, "redirect" in fields or bool(_REDIRECT.match(text)), text
            root.clear()  # drop finished pages: memory stays flat


def parse_dump(dump: str | Path, min_chars: int = 200) -> list[Article]:
    """Clean every article of a dump: main namespace only, no redirects or disambiguation pages.

    Args:
        dump: Path of the MediaWiki XML dump (``.xml`` or ``.xml.bz2``).
        min_chars: Articles shorter than this after cleaning are dropped (stubs, lists of links).

    Returns:
        The articles in dump order.
    """
    try:
        pages = list(iter_pages(dump))
    except (OSError, EOFError, ElementTree.ParseError) as err:
        raise DataError(f"cannot read the MediaWiki dump {dump} ({err}); pass a valid .xml or .xml.bz2 dump") from err
    articles = []
    for title, namespace, redirect, wikitext in pages:
        if namespace != 0 or redirect or _DISAMBIGUATION.search(wikitext):
            continue
        text = strip_markup(wikitext)
        if len(text) >= min_chars:
            articles.append(Article(title, text))
    return articles


def load_articles(dump: str | Path | None = None, min_chars: int = 200, cache: Path | None = None) -> list[Article]:
    """Cleaned articles of a dump (default: the pinned offline Wikipedia dump), cached as jsonl.

    Args:
        dump: Path of a MediaWiki XML dump; ``None`` fetches the pinned one (``offline.fetch('wikipedia')``).
        min_chars: Minimum cleaned length of an article.
        cache: Cache root; default ``offline.cache_dir()``.

    Raises:
        DataError: The dump is missing or unreadable, or no article survives cleaning.
    """
    path = Path(dump) if dump is not None else fetch("wikipedia", cache)
    if not path.is_file():
        raise DataError(f"MediaWiki dump {path} does not exist; pass an existing .xml/.xml.bz2 file")
    key = f"{sha256_file(path)[:16]}-c{CLEANER_VERSION}-m{min_chars}"
    cached = (cache or cache_dir()) / "wikipedia" / f"articles-{key}.jsonl"
    data = read_verified(cached)  # a damaged or cut copy is rebuilt, never half-read
    if data is not None:
        return [Article(**json.loads(line)) for line in data.decode("utf-8").splitlines()]
    articles = parse_dump(path, min_chars)
    if not articles:
        raise DataError(
            f"no article of {path} is left after cleaning (min_chars={min_chars}); "
            "check that it is a MediaWiki dump with main-namespace pages, or lower min_chars"
        )
    write_verified(cached, "".join(json.dumps(a.__dict__, ensure_ascii=False) + "\n" for a in articles).encode())
    return articles


def is_validation(key: str, validation_fraction: float, salt: str = "") -> bool:
    """Deterministic split: ``key`` (an article title, a text) goes to validation iff its hash falls below the fraction.

    The hash does not depend on the order or number of other items, so adding articles never moves existing ones.
    """
    digest = hashlib.sha256((salt + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def split_articles(articles: list[Article], validation_fraction: float = 0.05) -> tuple[list[Article], list[Article]]:
    """Split articles by title hash into (train, validation)."""
    train = [a for a in articles if not is_validation(a.title, validation_fraction)]
    validation = [a for a in articles if is_validation(a.title, validation_fraction)]
    return train, validation


# A sentence ends at . ! ? (optionally followed by quotes/brackets) before whitespace and an upper-case letter,
# digit or quote; the abbreviation check below vetoes splits after 'Dr.', 'e.g.', initials like 'J.' and so on.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "cf", "al", "no", "vol",
    "fig", "approx", "ca", "c", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "gen", "col", "lt", "sgt", "capt", "gov", "rev", "u.s", "u.k", "b.c", "a.d", "ph.d",
}  # fmt: skip


def _ends_with_abbreviation(chunk: str) -> bool:
    words = chunk.rstrip("\"')]").rstrip(".!?").rsplit(None, 1)
    word = words[-1].lower().lstrip("(\"'") if words else ""
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences (rule-based: punctuation + capital, with an abbreviation list)."""
    sentences: list[str] = []
    buffer, last = "", 0
    for match in _SENTENCE_END.finditer(paragraph):
        buffer += paragraph[last : match.start()]
        last = match.end()
        if _ends_with_abbreviation(buffer):
            buffer += paragraph[match.start() : match.end()]
            continue
        sentences.append((buffer + paragraph[match.start() : match.end()]).strip())
        buffer = ""
    sentences.append((buffer + paragraph[last:]).strip())
    return [s for s in sentences if s]


def article_sentences(text: str, min_words: int = 3) -> list[list[str]]:
    """Sentences of an article, grouped by paragraph (so a "does B follow A" task can keep pairs inside one).

    Args:
        text: A cleaned article (``Article.text``), one paragraph per line.
        min_words: Sentences with fewer words are dropped (list fragments, captions).

    Returns:
        One list of sentences per paragraph that has at least one sentence.
    """
    paragraphs = []
    for line in text.splitlines():
        sentences = [s for s in split_sentences(line) if len(s.split()) >= min_words]
        if sentences:
            paragraphs.append(sentences)
    return paragraphs
