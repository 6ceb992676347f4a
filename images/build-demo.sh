#!/usr/bin/env bash
# Builds the small demo disk that `make run` imports: a 32 MiB ext4 file system (no kernel) with
# a motd-style README and a few files, made with `mkfs.ext4 -d` in about a second. The bytes are
# reproducible (fixed UUID, hash seed and timestamps), so the image never needs committing.
#
# Usage: images/build-demo.sh OUT.img
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=images/mkfs-repro.sh
source "$here/mkfs-repro.sh"

[ $# -eq 1 ] || { echo "usage: $0 OUT.img" >&2; exit 2; }
out="$1"
command -v mkfs.ext4 >/dev/null || { echo "build-demo: mkfs.ext4 not found (apt-get install e2fsprogs)" >&2; exit 1; }

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/etc" "$stage/home/demo" "$stage/srv/data"

cat > "$stage/etc/motd" <<'EOF'
Welcome to a Parallax demo disk.

This ext4 file system was imported as the VDI `demo-template`, frozen as the snapshot
`demo-template@gold`, and forked (in O(1)) into the writable VDI `demo` you are looking at.
Anything you write here lands in `demo` only; the template and its snapshot never change.

Try, while `make run` serves the store (name it with --store or PARALLAX_STORE):
  parallax vdi list                      # demo-template, its snapshot and the fork
  parallax vdi info demo                 # how many bytes the fork owns vs shares
  nbdinfo nbd://127.0.0.1:10809/demo     # the export as any NBD client sees it
EOF
cp "$stage/etc/motd" "$stage/README"
echo "parallax-demo" > "$stage/etc/hostname"
cat > "$stage/home/demo/notes.txt" <<'EOF'
Snapshots are immutable: `parallax vdi snapshot demo before-edit`, change files, then
`parallax vdi fork demo@before-edit demo-undo` gives a writable copy of the old state.
EOF
# A little structured data so `vdi info` has something to count: 256 KiB of a repeating pattern.
for i in $(seq 1 4096); do printf 'record %06d: the quick brown fox jumps over the lazy dog\n' "$i"; done \
    | head -c 262144 > "$stage/srv/data/records.txt"
mkdir -p "$(dirname "$out")"
mkfs_repro "$out" 32M pxdemo 5d1a4a11-0000-4000-8000-64656d6f6469 1700000000 "$stage"
echo "build-demo: wrote $out ($(du -h --apparent-size "$out" | cut -f1) apparent, $(du -h "$out" | cut -f1) allocated)" >&2
