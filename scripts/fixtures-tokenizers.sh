#!/usr/bin/env bash
# Fetches the tokenizer fixtures into the git-ignored .fixtures/ folder:
#   .fixtures/cl100k_base.tiktoken   (from the crates.io package tiktoken-rs 0.12.1)
#
# The rank file ships inside a crates.io package, so we let cargo itself fetch
# the package (a throwaway project depending on it, then `cargo fetch`) and copy
# the asset out of cargo's registry source cache. Every file is checked against
# its recorded sha256; a mismatch is an error, not a warning.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fixtures="$root/.fixtures"
mkdir -p "$fixtures"

CL100K_SHA256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

check() { # file expected-sha256
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  if [[ "$got" != "$2" ]]; then
    echo "sha256 mismatch for $1: expected $2, got $got" >&2
    return 1
  fi
}

target="$fixtures/cl100k_base.tiktoken"
if [[ -f "$target" ]] && check "$target" "$CL100K_SHA256" 2>/dev/null; then
  echo "ok: $target"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/fetch/src"
cat > "$tmp/fetch/Cargo.toml" <<'TOML'
[package]
name = "caramba-fixture-fetch"
version = "0.0.0"
edition = "2021"

[dependencies]
tiktoken-rs = "=0.12.1"

[workspace]
TOML
echo "fn main() {}" > "$tmp/fetch/src/main.rs"
(cd "$tmp/fetch" && cargo fetch --quiet)

cargo_home="${CARGO_HOME:-$HOME/.cargo}"
src=""
for d in "$cargo_home"/registry/src/*/tiktoken-rs-0.12.1; do
  if [[ -f "$d/assets/cl100k_base.tiktoken" ]]; then src="$d/assets/cl100k_base.tiktoken"; break; fi
done
if [[ -z "$src" ]]; then
  echo "cargo fetch succeeded but tiktoken-rs-0.12.1/assets/cl100k_base.tiktoken was not found under $cargo_home/registry/src" >&2
  exit 1
fi
cp "$src" "$target.tmp"
check "$target.tmp" "$CL100K_SHA256"
mv "$target.tmp" "$target"
echo "fetched: $target"
