# Probe (not a test; runs only when named): rough per-request cost of the backend as a guest sees
# it. The guest issues O_DIRECT requests one at a time (dd: queue depth 1) and times each batch
# with /proc/uptime; run it once per backend and compare:
#   tests/xen-rig/run.sh probe-io; tests/xen-rig/run.sh --backend blkback probe-io
# Everything runs under TCG, so the absolute numbers are those of an emulated machine (and of
# how busy the host is); the difference between backends is what the probe is for. The summary
# is $RIG_RESULTS/io.txt (rig_note keeps it for --save-notes).
rig_backend_start
pattern zero 4096 >"$RIG_TMP/blank.img"        # 16 MiB
rig_vdi_new io "$RIG_TMP/blank.img"

cat >"$RIG_TMP/io-guest.sh" <<'G'
guest_wait_dev xvda
guest_blkinfo xvda
cs() { read -r _up _ </proc/uptime; _s=${_up%.*}; _f=${_up#*.}; echo $(( _s * 100 + 1${_f} - 100 )); }
# timed OP BS N: N requests of BS bytes, one at a time; prints microseconds per request.
timed() {
  _t0=$(cs)
  case "$1" in
    read) dd if=/dev/xvda of=/dev/null bs="$2" count="$3" iflag=direct 2>/dev/null || fail "read $2" ;;
    write) dd if=/dev/zero of=/dev/xvda bs="$2" count="$3" oflag=direct conv=notrunc 2>/dev/null ||
      fail "write $2" ;;
  esac
  _t1=$(cs)
  echo "RIG-IO $1 bs=$2 n=$3 total_ms=$(( (_t1 - _t0) * 10 )) us_per_request=$(( (_t1 - _t0) * 10000 / $3 ))"
}
timed read 4096 1000      # warm: the first pass also faults in the store's metadata
timed read 4096 2000
timed write 4096 2000
timed read 65536 250
timed write 65536 250
timed read 1048576 16
G
rig_guest io "$RIG_TMP/io-guest.sh" "disk = [ '$(rig_disk io xvda)' ]"
rig_guest_run io 300
{
  echo "backend=$RIG_BACKEND"
  grep -E 'RIG-IO|xvda: size' "$RIG_RESULTS/guest-io.log"
} >"$RIG_RESULTS/io.txt"
cat "$RIG_RESULTS/io.txt"
rig_note io.txt
