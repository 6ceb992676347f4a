# shellcheck shell=bash
# Storage and guest helpers for the VM rig (tests/vm/run.sh). Sourced, not run.
#
# Storage backends, chosen by PX_VM_BACKEND:
#   parallax  (default) the real thing: `parallax` CLI + `parallax serve` over NBD on TCP.
#   qemu-nbd  a stand-in that checks the rig itself: raw files, one qemu-nbd per export on a
#             unix socket, snapshots as copies taken while the server is paused (SIGSTOP).
# Every storage operation the rig needs goes through the functions below, so the two backends
# differ only here:
#   store_init DIR · vdi_import NAME FILE · vdi_snapshot NAME SNAP · vdi_fork NAME@SNAP NEW
#   vdi_export NAME[@SNAP] FILE · vdi_unique_bytes NAME · vdi_allocated_bytes NAME[@SNAP]
#   store_check · store_summary · serve_start · serve_stop · serve_kill9 · vdi_blockdev NAME[@SNAP]
# Guests: vm_start ID LOG DISK KERNEL_ARGS... · vm_wait ID TIMEOUT · vm_kill9 ID · vm_wait_line
#
# Globals the caller sets: PX_WORK (scratch dir), PX_KERNEL, PX_INITRD (images/build-template.sh).

PX_VM_BACKEND="${PX_VM_BACKEND:-parallax}"
PX_VM_ACCEL="${PX_VM_ACCEL:-tcg}"
PX_VM_MEM="${PX_VM_MEM:-192}"
PARALLAX_BIN="${PARALLAX_BIN:-parallax}"

PX_STORE=""
PX_SERVE_PID=""
PX_NBD_PORT=""
declare -A PX_VM_PID=()
declare -A PX_VM_LOG=()
declare -A PX_VM_T0=()

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
note() { echo "vm-test: $*" >&2; }

# A TCP port nobody listens on right now (the kernel picks it).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait until a TCP port or unix socket accepts connections (max $2 seconds).
wait_listening() {
    local target="$1" timeout="$2" t=0
    while [ "$t" -lt $((timeout * 10)) ]; do
        if python3 - "$target" <<'EOF' 2>/dev/null; then return 0; fi
import socket, sys
t = sys.argv[1]
if t.startswith("/"):
    s = socket.socket(socket.AF_UNIX); s.connect(t)
else:
    h, p = t.rsplit(":", 1); s = socket.create_connection((h, int(p)), timeout=1)
EOF
        sleep 0.1
        t=$((t + 1))
    done
    return 1
}

# Bytes of a file that are not holes (what a sparse copy really occupies).
file_allocated_bytes() { echo $(( $(stat -c %b "$1") * $(stat -c %B "$1") )); }

# ---------------------------------------------------------------------------------------------
# parallax backend

px() { "$PARALLAX_BIN" --store "$PX_STORE" "$@"; }
# pxq ARGS...: px with its chatter kept in $PX_WORK/cli.log, shown only if the command fails.
pxq() {
    local out rc=0
    out="$(px "$@" 2>&1)" || rc=$?
    printf '$ parallax %s\n%s\n' "$*" "$out" >> "$PX_WORK/cli.log"
    [ "$rc" -eq 0 ] || { printf 'parallax %s failed (%s):\n%s\n' "$*" "$rc" "$out" >&2; return "$rc"; }
}

_px_store_init() { pxq init --size "${PX_VM_STORE_SIZE:-4G}"; }
_px_vdi_import() { pxq vdi import "$1" "$2"; }
_px_vdi_snapshot() { pxq vdi snapshot "$1" "$2"; }
_px_vdi_fork() { pxq vdi fork "$1" "$2"; }
_px_vdi_export() { pxq vdi export --force "$1" "$2"; }
_px_info_field() {   # NAME[@SNAP] FIELD -> integer field of `vdi info --json`
    px vdi info "$1" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
if sys.argv[1] not in v:
    sys.exit("vdi info --json has no field " + sys.argv[1] + ": " + json.dumps(v))
print(int(v[sys.argv[1]]))' "$2"
}
_px_vdi_unique_bytes() { _px_info_field "$1" unique; }
_px_vdi_allocated_bytes() { _px_info_field "$1" allocated; }
_px_store_check() { px check; }
_px_store_summary() { px df; }
_px_serve_start() {
    [ -n "$PX_NBD_PORT" ] || PX_NBD_PORT="$(free_port)"
    cat > "$PX_WORK/serve.ron" <<EOF
(
    store: "$PX_STORE",
    nbd: (listen: ["127.0.0.1:$PX_NBD_PORT"], unix: None),
)
EOF
    "$PARALLAX_BIN" serve --config "$PX_WORK/serve.ron" >>"$PX_WORK/serve.log" 2>&1 &
    PX_SERVE_PID=$!
    wait_listening "127.0.0.1:$PX_NBD_PORT" 30 || { note "parallax serve did not listen"; return 1; }
}
_px_serve_stop() {
    [ -n "$PX_SERVE_PID" ] || return 0
    kill -TERM "$PX_SERVE_PID" 2>/dev/null || true
    wait "$PX_SERVE_PID" 2>/dev/null || true
    PX_SERVE_PID=""
}
_px_serve_kill9() {
    kill -KILL "$PX_SERVE_PID"
    wait "$PX_SERVE_PID" 2>/dev/null || true
    PX_SERVE_PID=""
}
_px_vdi_blockdev() {
    echo "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$PX_NBD_PORT,export=$1"
}

# ---------------------------------------------------------------------------------------------
# qemu-nbd stand-in backend: $PX_STORE/NAME.raw and $PX_STORE/NAME@SNAP.raw (+ .origin files)

declare -A _QN_PID=()
_qn_serving=0

_qn_file() { echo "$PX_STORE/$1.raw"; }
_qn_sock() { echo "$PX_STORE/$1.sock"; }
_qn_serve_one() {
    local name="$1" ro=()
    [[ "$name" == *@* ]] && ro=(--read-only)
    rm -f "$(_qn_sock "$name")"
    qemu-nbd --persistent --shared=4 --format=raw --cache=writeback "${ro[@]}" \
        --socket="$(_qn_sock "$name")" --export-name="$name" "$(_qn_file "$name")" \
        >>"$PX_WORK/serve.log" 2>&1 &
    _QN_PID[$name]=$!
    wait_listening "$(_qn_sock "$name")" 10 || { note "qemu-nbd for $name did not listen"; return 1; }
}
_qn_store_init() { mkdir -p "$PX_STORE"; }
_qn_vdi_import() {
    cp --sparse=always "$2" "$(_qn_file "$1")"
    [ "$_qn_serving" -eq 0 ] || _qn_serve_one "$1"
}
_qn_vdi_snapshot() {
    local name="$1" snap="$1@$2" pid="${_QN_PID[$1]:-}"
    # Pausing the server gives a point-in-time copy: every acknowledged write is in the file.
    [ -z "$pid" ] || kill -STOP "$pid"
    cp --sparse=always "$(_qn_file "$name")" "$(_qn_file "$snap")"
    [ -z "$pid" ] || kill -CONT "$pid"
    echo "$name" > "$PX_STORE/$snap.origin"
    [ "$_qn_serving" -eq 0 ] || _qn_serve_one "$snap"
}
_qn_vdi_fork() {
    cp --sparse=always "$(_qn_file "$1")" "$(_qn_file "$2")"
    echo "$1" > "$PX_STORE/$2.origin"
    [ "$_qn_serving" -eq 0 ] || _qn_serve_one "$2"
}
_qn_vdi_export() { cp --sparse=always "$(_qn_file "$1")" "$2"; }
_qn_vdi_unique_bytes() {   # 4 KiB blocks that differ from the snapshot the VDI was forked from
    local origin
    origin="$(cat "$PX_STORE/$1.origin")"
    python3 - "$(_qn_file "$1")" "$(_qn_file "$origin")" <<'EOF'
import sys
a, b = (open(p, "rb") for p in sys.argv[1:3])
n = 0
while True:
    x, y = a.read(1 << 20), b.read(1 << 20)
    if not x and not y:
        break
    for i in range(0, max(len(x), len(y)), 4096):
        if x[i:i + 4096] != y[i:i + 4096]:
            n += 4096
print(n)
EOF
}
_qn_vdi_allocated_bytes() { file_allocated_bytes "$(_qn_file "$1")"; }
_qn_store_check() { true; }
_qn_store_summary() { echo "store: $(du -sh "$PX_STORE" | cut -f1) allocated in $PX_STORE"; }
_qn_serve_start() {
    local f name
    _qn_serving=1
    for f in "$PX_STORE"/*.raw; do
        name="$(basename "$f" .raw)"
        _qn_serve_one "$name"
    done
    PX_SERVE_PID="${_QN_PID[*]}"
}
_qn_kill_all() {
    local sig="$1" name
    for name in "${!_QN_PID[@]}"; do
        kill "-$sig" "${_QN_PID[$name]}" 2>/dev/null || true
        wait "${_QN_PID[$name]}" 2>/dev/null || true
    done
    _QN_PID=()
    _qn_serving=0
    PX_SERVE_PID=""
}
_qn_serve_stop() { _qn_kill_all TERM; }
_qn_serve_kill9() { _qn_kill_all KILL; }
_qn_vdi_blockdev() { echo "driver=nbd,server.type=unix,server.path=$(_qn_sock "$1"),export=$1"; }

# ---------------------------------------------------------------------------------------------
# dispatch

case "$PX_VM_BACKEND" in
    parallax) _b=_px ;;
    qemu-nbd) _b=_qn ;;
    *) echo "PX_VM_BACKEND must be parallax or qemu-nbd, not $PX_VM_BACKEND" >&2; exit 2 ;;
esac
store_init() { PX_STORE="$1"; "${_b}_store_init"; }
vdi_import() { "${_b}_vdi_import" "$@"; }
vdi_snapshot() { "${_b}_vdi_snapshot" "$@"; }
vdi_fork() { "${_b}_vdi_fork" "$@"; }
vdi_export() { "${_b}_vdi_export" "$@"; }
vdi_unique_bytes() { "${_b}_vdi_unique_bytes" "$@"; }
vdi_allocated_bytes() { "${_b}_vdi_allocated_bytes" "$@"; }
store_check() { "${_b}_store_check"; }
store_summary() { "${_b}_store_summary"; }
serve_start() { "${_b}_serve_start"; }
serve_stop() { "${_b}_serve_stop"; }
serve_kill9() { "${_b}_serve_kill9"; }
vdi_blockdev() { "${_b}_vdi_blockdev" "$@"; }

# ---------------------------------------------------------------------------------------------
# guests

# vm_resolve_accel: turn PX_VM_ACCEL=auto into kvm or tcg. Nested KVM on these machines hangs
# rather than failing, so the probe boots the template (read-only) under KVM and settles for
# TCG unless the guest reaches userspace within 15 s.
vm_resolve_accel() {
    [ "$PX_VM_ACCEL" = auto ] || return 0
    PX_VM_ACCEL=tcg
    [ -w /dev/kvm ] || return 0
    local log="$PX_WORK/kvm-probe.log"
    # (The subshell keeps bash's "Killed" job message off the terminal.)
    (timeout -s KILL 15 qemu-system-x86_64 -accel kvm -cpu host -m "$PX_VM_MEM" -nodefaults \
        -no-user-config -display none -no-reboot -serial "file:$log" \
        -kernel "$PX_KERNEL" -initrd "$PX_INITRD" -append "console=ttyS0 quiet panic=-1 no_timer_check px.task=none" \
        -drive "file=$PX_ROOTFS,format=raw,if=virtio,snapshot=on" >/dev/null 2>&1) 2>/dev/null || true
    if grep -q '^PX-READY' "$log" 2>/dev/null; then PX_VM_ACCEL=kvm; fi
}

# vm_start ID LOG DISK [px.key=value ...]: boot the template kernel with DISK (a VDI name, or
# NAME@SNAP) as its virtio disk, served over NBD; its serial console goes to LOG.
# no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can fail and panic
# ("IO-APIC + timer doesn't work"); the check proves nothing about storage, so skip it.
vm_start() {
    local id="$1" log="$2" disk="$3"
    shift 3
    local quiet=quiet
    [ -z "${PX_VM_DEBUG:-}" ] || quiet=""
    : > "$log"
    PX_VM_T0[$id]="$(now)"
    PX_VM_LOG[$id]="$log"
    local cpu=()
    [ "$PX_VM_ACCEL" != kvm ] || cpu=(-cpu host)
    qemu-system-x86_64 -accel "$PX_VM_ACCEL" "${cpu[@]}" -m "$PX_VM_MEM" -smp 1 -nodefaults -no-user-config \
        -display none -no-reboot -serial "file:$log" \
        -kernel "$PX_KERNEL" -initrd "$PX_INITRD" \
        -append "console=ttyS0 $quiet panic=-1 no_timer_check px.id=$id $*" \
        -blockdev "$(vdi_blockdev "$disk"),node-name=disk0" \
        -device virtio-blk-pci,drive=disk0 \
        >"$log.qemu" 2>&1 &
    PX_VM_PID[$id]=$!
}

# vm_wait_line ID REGEX TIMEOUT: wait until the guest's console shows a line matching REGEX.
vm_wait_line() {
    local id="$1" re="$2" timeout="$3" deadline
    deadline=$(( $(date +%s) + timeout ))
    while ! grep -qE "$re" "${PX_VM_LOG[$id]}"; do
        if ! kill -0 "${PX_VM_PID[$id]}" 2>/dev/null; then
            grep -qE "$re" "${PX_VM_LOG[$id]}" && return 0
            note "$id exited before printing /$re/"
            return 1
        fi
        [ "$(date +%s)" -lt "$deadline" ] || { note "$id: no /$re/ after ${timeout}s"; return 1; }
        sleep 0.1
    done
}

# vm_wait ID TIMEOUT: wait for the guest to power off; kill it (and fail) after TIMEOUT seconds.
vm_wait() {
    local id="$1" timeout="$2" pid="${PX_VM_PID[$1]}" deadline
    deadline=$(( $(date +%s) + timeout ))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            note "$id still running after ${timeout}s; killing it"
            vm_kill9 "$id"
            return 1
        fi
        sleep 0.2
    done
    wait "$pid" 2>/dev/null || { note "$id: qemu exited with an error (${PX_VM_LOG[$id]}.qemu)"; unset "PX_VM_PID[$id]"; return 1; }
    unset "PX_VM_PID[$id]"
}

vm_kill9() {
    local pid="${PX_VM_PID[$1]:-}"
    [ -n "$pid" ] || return 0
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PX_VM_PID[$1]"
}

vm_kill_all() {
    local id
    for id in "${!PX_VM_PID[@]}"; do
        vm_kill9 "$id"
    done
}

# vm_wait_all TIMEOUT ID...: wait for all the guests to power off, noting in PX_VM_READY[ID]
# the seconds from vm_start to each guest's PX-READY line (its boot time). Fails if any guest
# fails or is still running after TIMEOUT seconds (those are killed).
declare -A PX_VM_READY=()
vm_wait_all() {
    local timeout="$1" id deadline running rc=0
    shift
    deadline=$(( $(date +%s) + timeout ))
    while :; do
        running=0
        for id in "$@"; do
            if [ -z "${PX_VM_READY[$id]:-}" ] && grep -q '^PX-READY' "${PX_VM_LOG[$id]}"; then
                PX_VM_READY[$id]="$(elapsed "${PX_VM_T0[$id]}" "$(now)")"
            fi
            [ -n "${PX_VM_PID[$id]:-}" ] || continue
            if kill -0 "${PX_VM_PID[$id]}" 2>/dev/null; then
                running=$((running + 1))
            else
                vm_wait "$id" 1 || rc=1
            fi
        done
        [ "$running" -gt 0 ] || break
        if [ "$(date +%s)" -ge "$deadline" ]; then
            for id in "$@"; do
                [ -z "${PX_VM_PID[$id]:-}" ] || { note "$id still running after ${timeout}s"; vm_kill9 "$id"; }
            done
            return 1
        fi
        sleep 0.1
    done
    return "$rc"
}
