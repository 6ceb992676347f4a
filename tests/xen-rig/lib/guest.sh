# Helpers for guest scripts (sourced in the guest before /guest.sh; pattern.sh comes with it).
# A guest talks to dom0 through its own xenstore directory /local/domain/<domid>/data/rig/ (data/
# is the part of its home a guest may write; libxl makes it so): relative
# xenstore paths resolve to the home directory.

say() { read -r _up _ </proc/uptime; echo "rig-guest [$_up]: $*"; }
# now: whole seconds of uptime, without starting a process.
now() { read -r _up _ </proc/uptime; echo "${_up%.*}"; }
fail() { echo "RIG-GUEST-FAIL: $*"; exit 1; }

# guest_set KEY VALUE / guest_get KEY: the guest's rig/KEY.
guest_set() { xenstore-write "data/rig/$1" "$2"; }
guest_get() { xenstore-read "data/rig/$1" 2>/dev/null; }

# guest_wait_key KEY VALUE [SECONDS]: waits until dom0 sets rig/KEY to VALUE (default 60 s).
guest_wait_key() {
  _end=$(( $(now) + ${3:-60} ))
  while [ "$(guest_get "$1")" != "$2" ]; do
    [ "$(now)" -lt $_end ] || fail "timeout waiting for rig/$1=$2"
    sleep 0.1
  done
}

# guest_wait_dev DEV [SECONDS]: waits until /dev/DEV exists (default 30 s).
guest_wait_dev() {
  _end=$(( $(now) + ${2:-30} ))
  while [ ! -b "/dev/$1" ]; do
    [ "$(now)" -lt $_end ] || fail "/dev/$1 did not appear"
    sleep 0.1
  done
}

# guest_wait_nodev DEV [SECONDS]: waits until /dev/DEV is gone (default 30 s).
guest_wait_nodev() {
  _end=$(( $(now) + ${2:-30} ))
  while [ -b "/dev/$1" ]; do
    [ "$(now)" -lt $_end ] || fail "/dev/$1 did not go away"
    sleep 0.1
  done
}

# guest_write DEV SEED BLOCKS [FIRST]: writes pattern SEED to DEV with O_DIRECT, then flushes
# (fsync on a block device makes blkfront send a cache flush when the backend offers one).
guest_write() {
  pattern "$2" "$3" "${4:-0}" |
    dd of="/dev/$1" bs=262144 seek=$(( ${4:-0} * 4096 )) iflag=fullblock oflag=direct,seek_bytes \
      conv=fsync,notrunc 2>/dev/null ||
    fail "write $2 to $1"
}

# guest_verify DEV BLOCKS SEED[,SEED...] [FIRST]: reads DEV with O_DIRECT and checks the pattern.
guest_verify() {
  PATTERN_DD_FLAGS=direct pattern_check "/dev/$1" "$2" "$3" "${4:-0}" ||
    fail "$1 blocks ${4:-0}+$2 are not $3"
}

# guest_blkinfo DEV: what blkfront negotiated, for the log.
guest_blkinfo() {
  say "$1: size=$(cat /sys/block/$1/size) sectors, hw queues=$(ls /sys/block/$1/mq 2>/dev/null | wc -l)," \
    "max_segments=$(cat /sys/block/$1/queue/max_segments)," \
    "max_hw_sectors_kb=$(cat /sys/block/$1/queue/max_hw_sectors_kb)," \
    "write_cache=$(cat /sys/block/$1/queue/write_cache 2>/dev/null)"
  for p in /sys/module/xen_blkfront/parameters/*; do say "xen_blkfront.${p##*/}=$(cat "$p")"; done
}
