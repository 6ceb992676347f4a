#!/usr/bin/env bash
# The VM rig: real Linux guests booting from Parallax forks over NBD (`make vm-test`).
#
#  1. Build (or reuse) the template from Debian packages (images/build-template.sh), import it
#     as the VDI `template` and snapshot it as `template@gold`; start `parallax serve`.
#  2. Fork N VDIs (PX_VM_GUESTS, default 4) from template@gold and boot N guests at once; each
#     writes its identity and PX_VM_MIB MiB of random data, fsyncs and powers off. Exports show
#     that every fork holds exactly its own data and checks clean.
#  3. Snapshot a guest's disk while it writes, fork the snapshot and boot the fork: it mounts,
#     everything the writer had fsynced before the snapshot is there, and it checks clean. The
#     snapshot's bytes do not change while the writer carries on.
#  4. kill -9 the server while a guest writes and fsyncs, then the guest; restart the server and
#     boot the disk again: every file the guest reported as fsynced (over the serial console,
#     with sequence numbers) is there, intact, and the file system checks clean.
#  5. template@gold (and `template`) are byte-identical to the image imported; the store checks.
# Prints PASS/FAIL per check and a table of boot times and bytes unique per fork.
#
# Environment: PX_VM_BACKEND=parallax|qemu-nbd (lib.sh), PARALLAX_BIN (default
# $CARGO_TARGET_DIR/release/parallax, CARGO_TARGET_DIR defaulting to ./target), PX_VM_ACCEL=tcg|kvm|auto (default tcg: nested KVM hangs on these
# machines; auto probes it with a 15 s boot), PX_VM_GUESTS, PX_VM_MIB, PX_VM_KEEP=1 (keep logs even on success), PX_VM_DEBUG=1
# (kernel messages on the consoles). Logs: tests/.work/vm/<run>/, kept when anything fails.
set -Eeuo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
export PARALLAX_BIN="${PARALLAX_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/parallax}"
# shellcheck source=tests/vm/lib.sh
source "$root/tests/vm/lib.sh"

guests="${PX_VM_GUESTS:-4}"
mib="${PX_VM_MIB:-4}"
boot_timeout=240

PX_WORK="$root/tests/.work/vm/$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$PX_WORK"
passed=0
failed=0
t_start="$(now)"

pass() { passed=$((passed + 1)); echo "PASS  $*"; }
fail() {
    failed=$((failed + 1))
    echo "FAIL  $*"
    exit 1
}
on_err() { fail "unexpected error (line $1): $2"; }
trap 'on_err $LINENO "$BASH_COMMAND"' ERR

cleanup() {
    local rc=$?
    trap - ERR
    vm_kill_all
    serve_stop 2>/dev/null || true
    if [ "$rc" -eq 0 ] && [ "$failed" -eq 0 ] && [ -z "${PX_VM_KEEP:-}" ]; then
        rm -rf "$PX_WORK"
    else
        echo "vm-test: logs kept in ${PX_WORK#"$root"/}" >&2
        for f in "$PX_WORK"/serve.log "$PX_WORK"/*.log.qemu; do
            [ -s "$f" ] || continue
            echo "--- tail of ${f#"$root"/}" >&2
            tail -n 20 "$f" >&2
        done
    fi
    echo "vm-test: $passed passed, $failed failed"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log_of() { echo "$PX_WORK/$1.log"; }
# console ID: the guest's serial console so far, without the CRs the tty adds.
console() { tr -d '\r' < "$(log_of "$1")"; }

# The guest's console ends with a clean halt and shows no failure.
expect_clean_halt() {
    local id="$1"
    if console "$id" | grep -q '^PX-FAIL'; then
        fail "$id reported: $(console "$id" | grep '^PX-FAIL' | head -n1)"
    fi
    if ! console "$id" | grep -qx "PX-HALT $id clean"; then
        echo "--- last lines of $id's console:" >&2
        console "$id" | tail -n 8 >&2
        fail "$id did not halt cleanly (see ${PX_WORK#"$root"/}/$id.log)"
    fi
}

# export_fsck NAME[@SNAP] IMG: export the VDI to IMG and require `e2fsck -fn` to find no fault.
export_fsck() {
    local vdi="$1" img="$2"
    vdi_export "$vdi" "$img"
    if ! e2fsck -fn "$img" >"$img.fsck" 2>&1; then
        fail "e2fsck -fn on export of $vdi: $(tail -n 3 "$img.fsck" | tr '\n' ' ')"
    fi
}

# dump_data IMG DIR: copy /data out of the ext4 image IMG (no mount, no root needed).
dump_data() {
    rm -rf "$2"
    mkdir -p "$2"
    debugfs -R "rdump /data $2" "$1" >/dev/null 2>&1
    [ -d "$2/data" ] || fail "no /data in $1"
}

# synced_files ID: the "<i> <sha256>" pairs the guest reported fsynced, one per line.
synced_files() { console "$1" | awk '$1 == "PX-SYNCED" && NF == 3 && length($3) == 64 { print $2, $3 }'; }

# expect_files_present WHAT PAIRS DIR: every file i in PAIRS is DIR/data/seq/i with that sha256;
# sets files_ok to how many there were.
files_ok=0
expect_files_present() {
    local what="$1" pairs="$2" dir="$3" i sum got n=0
    while read -r i sum; do
        [ -n "$i" ] || continue
        [ -f "$dir/data/seq/$i" ] || fail "$what: fsynced file /data/seq/$i is missing"
        got="$(sha256sum "$dir/data/seq/$i" | cut -d' ' -f1)"
        [ "$got" = "$sum" ] || fail "$what: /data/seq/$i has other bytes than the guest fsynced"
        n=$((n + 1))
    done < "$pairs"
    [ "$n" -gt 0 ] || fail "$what: the guest reported no fsynced file, so nothing was checked"
    files_ok="$n"
}

# expect_files_seen WHAT PAIRS ID: guest ID's check task listed every file in PAIRS intact.
expect_files_seen() {
    local what="$1" pairs="$2" id="$3" i sum
    console "$id" > "$PX_WORK/$id.console"
    while read -r i sum; do
        [ -n "$i" ] || continue
        grep -qx "PX-FILE $sum /data/seq/$i" "$PX_WORK/$id.console" || fail "$what: guest does not see /data/seq/$i intact"
    done < "$pairs"
}

# ---------------------------------------------------------------------------------------------
echo "vm-test: backend $PX_VM_BACKEND, accel $PX_VM_ACCEL, $guests guests, work dir ${PX_WORK#"$root"/}"
for tool in qemu-system-x86_64 e2fsck debugfs python3 sha256sum; do
    command -v "$tool" >/dev/null || fail "$tool not installed (run: scripts/deps.sh vm)"
done
if [ "$PX_VM_BACKEND" = parallax ]; then
    [ -x "$PARALLAX_BIN" ] || fail "$PARALLAX_BIN not built (run: make release)"
fi

t0="$(now)"
"$root/images/build-template.sh" > /dev/null
# shellcheck disable=SC1091
source "$root/images/.cache/template/template.env"
pass "template built or reused (kernel $PX_KVER) in $(elapsed "$t0" "$(now)") s"

vm_resolve_accel
store_init "$PX_WORK/store"
vdi_import template "$PX_ROOTFS"
vdi_snapshot template gold
serve_start
pass "imported template, snapshotted template@gold, server up (guests use $PX_VM_ACCEL)"

# --- 2. N forks, N guests at once --------------------------------------------------------------
ids=()
for i in $(seq 1 "$guests"); do
    vdi_fork template@gold "g$i"
    ids+=("g$i")
done
for id in "${ids[@]}"; do
    vm_start "$id" "$(log_of "$id")" "$id" px.task=write "px.mib=$mib"
done
vm_wait_all "$boot_timeout" "${ids[@]}" || fail "not every guest of ${ids[*]} powered off by itself"
for id in "${ids[@]}"; do
    expect_clean_halt "$id"
    read -r _ _ wrote_mib sum < <(console "$id" | grep "^PX-WROTE $id ") || fail "$id wrote nothing"
    [ "$wrote_mib" = "$mib" ] || fail "$id wrote $wrote_mib MiB, not $mib"
    img="$PX_WORK/$id.img"
    export_fsck "$id" "$img"
    dump_data "$img" "$PX_WORK/$id.data"
    [ "$(cat "$PX_WORK/$id.data/data/identity")" = "$id" ] || fail "$id: fork holds another identity"
    [ "$(cd "$PX_WORK/$id.data/data" && ls -A | tr '\n' ' ')" = "blob identity " ] \
        || fail "$id: /data holds more than its own files"
    [ "$(sha256sum "$PX_WORK/$id.data/data/blob" | cut -d' ' -f1)" = "$sum" ] \
        || fail "$id: blob on the export differs from what the guest wrote"
    rm -rf "$img" "$PX_WORK/$id.data"
done
pass "$guests guests booted concurrently from forks; each fork holds exactly its own data and checks clean"

# --- 2b. guests writing the same file store it once (dedup) --------------------------------------
if [ "$PX_VM_BACKEND" = parallax ]; then
    stored() { px df --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["stored_bytes"])'; }
    before="$(stored)"
    for id in d1 d2; do
        vdi_fork template@gold "$id"
        vm_start "$id" "$(log_of "$id")" "$id" px.task=same
    done
    vm_wait_all "$boot_timeout" d1 d2 || fail "the guests writing the same file did not power off"
    sums=()
    for id in d1 d2; do
        expect_clean_halt "$id"
        read -r _ _ bytes sum < <(console "$id" | grep "^PX-WROTE $id ") || fail "$id wrote nothing"
        sums+=("$sum")
    done
    [ "${sums[0]}" = "${sums[1]}" ] || fail "the two guests' files differ"
    grew=$(( $(stored) - before ))
    # One copy of the file, plus what else the two guests' file systems wrote (journal, inodes,
    # bitmaps): well under two copies.
    [ "$grew" -lt $(( bytes * 3 / 2 )) ] \
        || fail "two guests wrote the same $bytes bytes and the store grew by $grew"
    pass "two guests wrote the same $((bytes / 1024)) KiB file: the store grew by $((grew / 1024)) KiB"
fi

# --- 3. snapshot while a guest writes ----------------------------------------------------------
vdi_fork template@gold sw
vm_start sw "$(log_of sw)" sw px.task=seqwrite px.count=48 px.kib=256 px.syncevery=2
vm_wait_line sw '^PX-SYNCED 8 ' "$boot_timeout" || fail "snapshot writer made no progress"
synced_files sw > "$PX_WORK/sw.before"
vdi_snapshot sw mid
if ! kill -0 "${PX_VM_PID[sw]}" 2>/dev/null || console sw | grep -q '^PX-WROTE'; then
    fail "writer finished before the snapshot; the test would prove nothing"
fi
vdi_export sw@mid "$PX_WORK/sw-mid.first.img"
vm_wait_all "$boot_timeout" sw || fail "snapshot writer did not power off"
expect_clean_halt sw
console sw | grep -qx 'PX-WROTE sw 48' || fail "writer did not finish its 48 files"
vdi_fork sw@mid swf
vm_start swf "$(log_of swf)" swf px.task=check
vm_wait_all "$boot_timeout" swf || fail "fork of the snapshot did not boot and power off"
expect_clean_halt swf
expect_files_seen "fork of sw@mid" "$PX_WORK/sw.before" swf
export_fsck swf "$PX_WORK/swf.img"
dump_data "$PX_WORK/swf.img" "$PX_WORK/swf.data"
expect_files_present "fork of sw@mid" "$PX_WORK/sw.before" "$PX_WORK/swf.data"
pass "snapshot taken while writing ($files_ok fsynced files before it): its fork boots, holds them all and checks clean"
vdi_export sw@mid "$PX_WORK/sw-mid.again.img"
cmp -s "$PX_WORK/sw-mid.first.img" "$PX_WORK/sw-mid.again.img" \
    || fail "sw@mid changed after the snapshot (writer kept writing to sw, fork swf booted)"
export_fsck sw "$PX_WORK/sw.img"
dump_data "$PX_WORK/sw.img" "$PX_WORK/sw.data"
synced_files sw > "$PX_WORK/sw.all"
expect_files_present "writer sw" "$PX_WORK/sw.all" "$PX_WORK/sw.data"
pass "snapshot stayed byte-identical while its origin took $files_ok files; origin checks clean"
rm -rf "$PX_WORK"/sw*.img "$PX_WORK"/sw*.data

# --- 4. kill -9 the server under a writing guest ------------------------------------------------
vdi_fork template@gold kc
vm_start kc "$(log_of kc)" kc px.task=seqwrite px.count=100000 px.kib=64 px.syncevery=1
vm_wait_line kc '^PX-SYNCED 12 ' "$boot_timeout" || fail "crash writer made no progress"
serve_kill9
sleep 0.3   # let the console catch up with anything fsynced just before the kill
vm_kill9 kc
synced_files kc > "$PX_WORK/kc.synced"
n_synced="$(wc -l < "$PX_WORK/kc.synced")"
serve_start
vm_start kc-check "$(log_of kc-check)" kc px.task=check
vm_wait_all "$boot_timeout" kc-check || fail "crashed disk did not boot and power off"
expect_clean_halt kc-check
expect_files_seen "after kill -9" "$PX_WORK/kc.synced" kc-check
export_fsck kc "$PX_WORK/kc.img"
dump_data "$PX_WORK/kc.img" "$PX_WORK/kc.data"
expect_files_present "after kill -9" "$PX_WORK/kc.synced" "$PX_WORK/kc.data"
pass "kill -9 of the server mid-write: all $n_synced fsynced files survive, journal replays, fsck clean"
rm -rf "$PX_WORK/kc.img" "$PX_WORK/kc.data"

# --- 5. the template never changed; the store checks -----------------------------------------
for vdi in template@gold template; do
    vdi_export "$vdi" "$PX_WORK/template.img"
    [ "$(sha256sum "$PX_WORK/template.img" | cut -d' ' -f1)" = "$PX_ROOTFS_SHA256" ] \
        || fail "$vdi is no longer byte-identical to the imported image"
done
rm -f "$PX_WORK/template.img"
pass "template and template@gold byte-identical to the imported image"
store_check > "$PX_WORK/check.out" 2>&1 || fail "store check (server running): $(tail -n 3 "$PX_WORK/check.out")"
store_summary > "$PX_WORK/summary.out" 2>&1
serve_stop
store_check > "$PX_WORK/check.out" 2>&1 || fail "store check (server stopped): $(tail -n 3 "$PX_WORK/check.out")"
pass "store checks clean, through the server and opened directly after it stopped"

# --- table -----------------------------------------------------------------------------------
tpl_alloc="$(vdi_allocated_bytes template@gold)"
printf '\n%-10s %-18s %9s %14s %12s\n' guest disk "boot (s)" "unique (KiB)" "% template"
for id in "${ids[@]}" sw swf kc-check; do
    disk="$id"
    [ "$id" = kc-check ] && disk=kc
    u="$(vdi_unique_bytes "$disk")"
    printf '%-10s %-18s %9s %14s %11s%%\n' "$id" "$disk" "${PX_VM_READY[$id]:-?}" \
        "$((u / 1024))" "$(awk -v u="$u" -v t="$tpl_alloc" 'BEGIN { printf "%.1f", 100 * u / t }')"
done
printf 'template@gold: %s MiB virtual, %s KiB allocated; boot = vm start to PX-READY\n' \
    "$(( $(stat -c %s "$PX_ROOTFS") / 1048576 ))" "$((tpl_alloc / 1024))"
echo
cat "$PX_WORK/summary.out"
echo "vm-test: total $(elapsed "$t_start" "$(now)") s"
