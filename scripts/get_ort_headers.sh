#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (Debian trixie's libonnxruntime-dev, ORT 1.21, API version 21)
# into ./.deps/ortdev without touching the system's apt configuration, and print the include dir.
# Needs root (apt-get download with a private state dir) on a Debian/Ubuntu machine with Debian's
# archive keyring. Idempotent: does nothing when the headers are already there.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${FFSPLIT_DEPS_DIR:-$root/.deps/ortdev}
inc="$prefix/usr/include/onnxruntime"

if [[ -f "$inc/onnxruntime_lite_custom_op.h" ]]; then
  echo "$inc"
  exit 0
fi

for tool in apt-get dpkg awk; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $keyring ]] || { echo "error: $keyring missing (apt-get install debian-archive-keyring)" >&2; exit 1; }

uri=""
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
uri=${uri:-${DEBIAN_MIRROR:-http://deb.debian.org/debian}}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/archives/partial"
echo "deb [signed-by=$keyring] $uri trixie main" >"$tmp/sources.list"
o=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
   -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache::Archives=$tmp/archives" -o "APT::Sandbox::User=root")
apt-get "${o[@]}" -qq update >&2
(cd "$tmp" && apt-get "${o[@]}" -qq download libonnxruntime-dev >&2)
mkdir -p "$prefix"
dpkg -x "$tmp"/libonnxruntime-dev_*.deb "$prefix"
[[ -f "$inc/onnxruntime_lite_custom_op.h" ]] || { echo "error: headers not found in the package" >&2; exit 1; }
echo "$inc"
