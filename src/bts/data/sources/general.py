"""``general`` domain: English prose.

Sources (all offline):

* **Wikipedia** — the ~100 real articles of gensim's test dump
  (``gensim/test/test_data/enwiki-*-shortened.bz2`` inside the pinned gensim wheel, read as a zip; the wheel is
  never installed). Main-namespace pages only, redirects skipped. Wiki markup is removed with
  ``mwparserfromhell``: ``<ref>``/``<gallery>``/table/comment nodes, file/image/category/interlanguage links and
  templates are dropped, then ``strip_code()``; the trailing reference-like sections (References, External links,
  See also, Notes, Further reading, Bibliography, Sources) are removed. Licence: CC BY-SA 3.0 (text of Wikipedia).
* **Python standard-library docstrings** — module/class/function docstrings of the same files as the ``code``
  domain (``inspect.cleandoc``-ed, at least ``min_docstring_chars`` long), grouped per file. Licence: PSF.
* **pydoc topics** — ``pydoc_data.topics.topics`` (the language reference sections ``help()`` shows). PSF.

Long texts are cut at paragraph boundaries into chunks of about ``chunk_min_chars``..``chunk_max_chars``
characters; each chunk is one document (record fields: ``source``, ``title``, ``part``).
"""

from __future__ import annotations

import bz2
import inspect
import io
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from . import EmbeddedConfig, Provenance, chunk_paragraphs, package_version, paragraphs, wheels
from . import code as code_source

WIKI_MEMBER = re.compile(r"gensim/test/test_data/enwiki-.*-shortened\.bz2$")
DROP_SECTIONS = frozenset({"references", "external links", "see also", "notes", "further reading", "bibliography",
                           "sources", "footnotes", "citations", "notes and references", "works cited"})
DROP_TAGS = frozenset({"ref", "gallery", "table", "math", "timeline", "imagemap", "references", "score", "syntaxhighlight"})
_LINK_DROP = re.compile(r"^\s*:?\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\u00a0]+")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_LEADING_PUNCT_IN_PARENS = re.compile(r"\(\s*(?:[;,]\s*)+")


def clean_wikitext(wikitext: str) -> str:
    """Plain text of one article (see the module docstring for what is removed).

    A single recursive walk over the parse tree (much faster than removing nodes one by one): templates,
    comments, arguments, dropped tags and file/category/interlanguage links produce nothing; other tags and links
    produce their (stripped) contents; HTML entities are decoded; reference-like level-2 sections are skipped.
    """
    import mwparserfromhell as mw

    return _postprocess(_strip(mw.parse(wikitext), top=True))


def _strip(code, top: bool = False) -> str:
    from mwparserfromhell import nodes as n

    out: list[str] = []
    skipping = False
    for node in code.nodes:
        if isinstance(node, n.Heading):
            title = _strip(node.title).strip()
            if top and node.level <= 2:
                skipping = title.lower() in DROP_SECTIONS
            if not skipping:
                out.append(f"\n\n{title}\n\n")
            continue
        if skipping:
            continue
        if isinstance(node, n.Text):
            out.append(node.value)
        elif isinstance(node, n.Tag):
            tag = str(node.tag).strip().lower()
            if tag in DROP_TAGS:
                continue
            if tag == "br":
                out.append("\n")
            elif tag == "li" or tag == "dd" or tag == "dt":
                out.append("")
            elif node.contents is not None:
                out.append(_strip(node.contents))
        elif isinstance(node, n.Wikilink):
            if _LINK_DROP.match(str(node.title)):
                continue
            out.append(_strip(node.text) if node.text is not None else _strip(node.title))
        elif isinstance(node, n.ExternalLink):
            if node.title is not None:
                out.append(_strip(node.title))
        elif isinstance(node, n.HTMLEntity):
            out.append(node.normalize())
        # Template, Comment, Argument and anything else: dropped
    return "".join(out)


_RESIDUAL_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.IGNORECASE | re.DOTALL)
_RESIDUAL_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")
_RESIDUAL_MARKUP = re.compile(r"'{2,}|\[\[|\]\]|\{\{|\}\}")


def _postprocess(text: str) -> str:
    # markup the parser left as text (e.g. inside unbalanced constructs)
    text = _RESIDUAL_MARKUP.sub("", _RESIDUAL_TAG.sub("", _RESIDUAL_REF.sub("", text)))
    lines = []
    for line in text.splitlines():
        line = _SPACES.sub(" ", line).strip()
        line = _LEADING_PUNCT_IN_PARENS.sub("(", _EMPTY_PARENS.sub("", line)).replace(" ,", ",").replace(" .", ".")
        if "|" in line or line.startswith(("{", "!")):  # table/markup debris
            continue
        lines.append(line)
    return "\n".join(lines)


def wiki_pages(data: bytes):
    """``(title, wikitext)`` of the main-namespace, non-redirect pages of a MediaWiki XML dump."""
    for _, el in ET.iterparse(io.BytesIO(data)):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {c.tag.rsplit("}", 1)[-1]: c for c in el}
        title = fields["title"].text or ""
        ns = fields["ns"].text if "ns" in fields else "0"
        text = ""
        rev = fields.get("revision")
        if rev is not None:
            for c in rev:
                if c.tag.rsplit("}", 1)[-1] == "text":
                    text = c.text or ""
        el.clear()
        if ns != "0" or "redirect" in fields or text.lstrip().lower().startswith("#redirect"):
            continue
        yield title, text


def wiki_records(wheel: Path, config: EmbeddedConfig, progress=None) -> tuple[list[dict], list[str]]:
    from tqdm.auto import tqdm

    records: list[dict] = []
    members: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if WIKI_MEMBER.search(n))
        for name in names:
            members.append(name)
            pages = list(wiki_pages(bz2.decompress(zf.read(name))))
            for title, wikitext in tqdm(pages, desc="general: wikipedia", unit="page",
                                        disable=None if progress is None else not progress):
                paras = [p for p in paragraphs(clean_wikitext(wikitext)) if len(p) >= 40 or p.endswith((".", ":"))]
                for i, chunk in enumerate(chunk_paragraphs(paras, config.chunk_min_chars, config.chunk_max_chars)):
                    if len(chunk) < 100:
                        continue
                    records.append({"text": chunk, "domain": "general", "source": "wikipedia", "title": title,
                                    "part": i})
    return records, members


def docstring_records(config: EmbeddedConfig) -> tuple[list[dict], int]:
    root = code_source.stdlib_root()
    records: list[dict] = []
    files = code_source.stdlib_files(root)
    for path in files:
        found = code_source.file_docstrings(path, root)
        if found is None:
            continue
        docs = []
        for _, raw in found:
            doc = inspect.cleandoc(raw).strip()
            if len(doc) >= config.min_docstring_chars:
                docs.append(doc)
        if not docs:
            continue
        name = code_source.module_name(path, root)
        chunks = chunk_paragraphs(docs, config.chunk_min_chars, config.chunk_max_chars)
        for i, chunk in enumerate(chunks):
            records.append({"text": chunk, "domain": "general", "source": "stdlib_docstrings", "title": name,
                            "part": i})
    return records, len(files)


def pydoc_topic_records(config: EmbeddedConfig) -> list[dict]:
    from pydoc_data import topics

    records: list[dict] = []
    for name in sorted(topics.topics):
        for i, chunk in enumerate(chunk_paragraphs(paragraphs(topics.topics[name]), config.chunk_min_chars,
                                                   config.chunk_max_chars)):
            records.append({"text": chunk, "domain": "general", "source": "pydoc_topics", "title": name, "part": i})
    return records


def build(config: EmbeddedConfig, wheel_dir: Path, progress: bool | None = None):
    """Return ``(records, provenance)`` of the general domain."""
    import sys

    wheel = wheels.fetch_wheel("gensim", wheel_dir)
    wiki, members = wiki_records(wheel, config, progress)
    docs, n_files = docstring_records(config)
    topics = pydoc_topic_records(config)
    prov = Provenance(
        sources=[
            {"name": "wikipedia (gensim test data)", **wheels.wheel_record("gensim", wheel), "members": members,
             "records": len(wiki), "text_licence": "CC BY-SA 3.0"},
            {"name": "python-stdlib docstrings", "python": ".".join(map(str, sys.version_info[:3])),
             "files": n_files, "records": len(docs), "licence": "PSF-2.0"},
            {"name": "pydoc_data.topics", "python": ".".join(map(str, sys.version_info[:3])), "records": len(topics),
             "licence": "PSF-2.0"},
        ],
        packages={"mwparserfromhell": package_version("mwparserfromhell")},
    )
    return wiki + docs + topics, prov
