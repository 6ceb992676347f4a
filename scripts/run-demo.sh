#!/usr/bin/env bash
# `make run`: from a fresh clone to a served demo VDI in one command.
#  1. a store under ./var (created once, 8 GiB sparse),
#  2. a small ext4 demo disk built locally (images/build-demo.sh) imported as demo-template,
#     snapshotted as demo-template@gold and forked as `demo`,
#  3. `parallax serve` in the foreground, with client commands to paste printed first.
# Environment: PARALLAX_PORT (default 10809), PARALLAX_VAR (default ./var).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/release/parallax
var=${PARALLAX_VAR:-var}
port=${PARALLAX_PORT:-10809}
store=$var/parallax.store
sock=$var/nbd.sock
[ -x "$bin" ] || { echo "run-demo: $bin is missing; run 'make release' first" >&2; exit 1; }
mkdir -p "$var"
export PARALLAX_STORE=$store

if [ ! -e "$store" ]; then
  "$bin" init --size 8G
fi
if ! "$bin" vdi info demo-template@gold >/dev/null 2>&1; then
  [ -f "$var/demo.img" ] || images/build-demo.sh "$var/demo.img"
  "$bin" vdi info demo-template >/dev/null 2>&1 || "$bin" vdi import demo-template "$var/demo.img"
  "$bin" vdi snapshot demo-template gold
fi
"$bin" vdi info demo >/dev/null 2>&1 || "$bin" vdi fork demo-template@gold demo

cat <<EOF

Store $store is ready:
$("$bin" vdi tree)

Serving it now (Ctrl-C stops and commits). In another terminal, try:

  qemu-img info nbd://127.0.0.1:$port/demo
  nbdinfo --list nbd://127.0.0.1:$port
  nbdinfo --map nbd://127.0.0.1:$port/demo
  qemu-io -f raw -c 'write -P 0xab 1M 64k' -c 'read -P 0xab 1M 64k' nbd://127.0.0.1:$port/demo
  qemu-img compare nbd://127.0.0.1:$port/demo nbd://127.0.0.1:$port/demo-template@gold
  nbdinfo --map "nbd+unix:///demo?socket=$(realpath -m "$sock")"
  $bin --store $(realpath -m "$store") vdi snapshot demo before-experiment
  $bin --store $(realpath -m "$store") vdi tree
  $bin --store $(realpath -m "$store") df

EOF
exec "$bin" serve --listen "127.0.0.1:$port" --unix "$sock"
