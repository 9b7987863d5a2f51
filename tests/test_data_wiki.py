"""MediaWiki markup stripping, dump parsing, the article split and sentence splitting, on small inline fixtures."""

from __future__ import annotations

import bz2
from xml.sax.saxutils import escape

import pytest

from lightning_merge.data import wiki
from lightning_merge.errors import DataError

PROSE = "The quick brown fox jumps over the lazy dog near the river bank every single morning. " * 4


def _page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    redirect_tag = f'<redirect title="{redirect}" />' if redirect else ""
    return (
        f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>{redirect_tag}"
        f'<revision><id>2</id><text xml:space="preserve">{escape(text)}</text></revision></page>'
    )


def _dump(path, pages: list[str]):
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">' + "".join(pages)
    path.write_bytes(bz2.compress((xml + "</mediawiki>").encode("utf-8")))
    return path


@pytest.mark.parametrize(
    "markup, expected",
    [
        ("a {{cite web|url=x|title={{nested|y}}}} b", "a b"),
        ("[[Political philosophy|political]] [[anarchy]] [[bus]]es", "political anarchy buses"),
        ("x[[File:A.jpg|thumb|A [[caption]] here]] y [[Category:Things]] [[de:Anarchismus]]", "x y"),
        ('a<ref>cite {{x}}</ref> b<ref name="n"/> c<ref name=m>more</ref>.', "a b c."),
        ('before\n{| class="wikitable"\n|-\n| cell || {{t}} \n|}\nafter', "before\nafter"),
        ("== History ==\nText here.\n=== Early ===\nMore.", "Text here.\nMore."),
        ("Body.\n== References ==\n* a citation\n== Later ==\nKept.", "Body.\nKept."),
        ("a <!-- hidden {{x}} --> b", "a b"),
        ("'''Bold''' and ''italic'' and '''''both'''''", "Bold and italic and both"),
        ("see [http://example.com the site] and [http://bare.org] or http://x.y/z now", "see the site and or now"),
        ('H<sub>2</sub>O<br/> is <span class="x">water</span>', "H2O is water"),
        ("a&nbsp;b &amp; c &lt;d&gt;", "a b & c <d>"),
        ("__NOTOC__\n* item one\n# item two", "item one\nitem two"),
        ("an unclosed {{ template stays [[link]]", "an unclosed {{ template stays link"),
        ("x ({{lang|grc|ἀν}}) y, ( ; ) z", "x y, z"),
        ("x <math>a^2</math> y", "x y"),
    ],
)
def test_strip_markup(markup, expected):
    assert wiki.strip_markup(markup) == expected


def test_parse_dump_keeps_articles_only(tmp_path):
    dump = _dump(
        tmp_path / "dump.xml.bz2",
        [
            _page("Fox", "{{Infobox|a=b}}\n'''Fox''' " + PROSE + "<ref>c</ref>"),
            _page("Old fox", "#REDIRECT [[Fox]]", redirect="Fox"),
            _page("Talk:Fox", PROSE, ns=1),
            _page("Fox (disambiguation)", "{{disambiguation}}\n" + PROSE),
            _page("Stub", "Too short."),
        ],
    )
    articles = wiki.parse_dump(dump)
    assert [a.title for a in articles] == ["Fox"]
    assert articles[0].text.startswith("Fox The quick brown fox")


def test_load_articles_caches(tmp_path, monkeypatch):
    dump = _dump(tmp_path / "dump.xml.bz2", [_page(f"A{i}", PROSE) for i in range(3)])
    first = wiki.load_articles(dump, cache=tmp_path / "cache")
    monkeypatch.setattr(wiki, "parse_dump", lambda *a, **k: pytest.fail("cache not used"))
    assert wiki.load_articles(dump, cache=tmp_path / "cache") == first


@pytest.mark.parametrize("damage", ["cut_at_a_line_end", "no_digest"])
def test_a_damaged_article_cache_is_rebuilt_with_one_line(tmp_path, capsys, damage):
    dump = _dump(tmp_path / "dump.xml.bz2", [_page(f"A{i}", PROSE) for i in range(4)])
    first = wiki.load_articles(dump, cache=tmp_path / "cache")
    (cached,) = (tmp_path / "cache" / "wikipedia").glob("*.jsonl")
    if damage == "cut_at_a_line_end":  # still valid JSONL: read as it is, it would silently lose half the articles
        lines = cached.read_text().splitlines(keepends=True)
        cached.write_text("".join(lines[: len(lines) // 2]))
    else:
        cached.with_name(cached.name + ".sha256").unlink()
    capsys.readouterr()
    assert wiki.load_articles(dump, cache=tmp_path / "cache") == first
    out = capsys.readouterr().out
    assert f"cache file {cached}" in out and "rebuilding it" in out
    assert wiki.load_articles(dump, cache=tmp_path / "cache") == first  # and the rebuilt one is trusted again


def test_empty_corpus_after_cleaning(tmp_path):
    dump = _dump(tmp_path / "dump.xml.bz2", [_page("R", "#REDIRECT [[X]]"), _page("T", "{{only a template}}")])
    with pytest.raises(DataError, match="no article .* left after cleaning.*lower min_chars"):
        wiki.load_articles(dump, cache=tmp_path / "cache")


def test_missing_dump(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        wiki.load_articles(tmp_path / "nope.xml.bz2", cache=tmp_path)


def test_split_is_deterministic_and_by_article():
    articles = [wiki.Article(f"Title {i}", f"text {i}") for i in range(400)]
    train, validation = wiki.split_articles(articles, 0.1)
    assert 20 < len(validation) < 60 and len(train) + len(validation) == 400
    # Membership depends on the title only: shuffled or subset input gives the same assignment.
    again_train, again_val = wiki.split_articles(list(reversed(articles[:200])), 0.1)
    assert {a.title for a in again_val} == {a.title for a in validation if int(a.title.split()[1]) < 200}
    assert not {a.title for a in train} & {a.title for a in validation}


def test_sentences():
    text = "Dr. Smith met J. Doe in the U.S. in 1990. They talked, e.g. about foxes! Did it rain? Yes.\nA new one."
    assert wiki.split_sentences(text.splitlines()[0]) == [
        "Dr. Smith met J. Doe in the U.S. in 1990.",
        "They talked, e.g. about foxes!",
        "Did it rain?",
        "Yes.",
    ]
    assert wiki.article_sentences(text) == [
        ["Dr. Smith met J. Doe in the U.S. in 1990.", "They talked, e.g. about foxes!", "Did it rain?"],
        ["A new one."],
    ]
