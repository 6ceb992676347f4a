# The storage domain, managed from dom0, and what a guest may touch in xenstore (issue 18).
#
# 1. An admin in dom0 creates, imports, snapshots, forks, lists, inspects and deletes VDIs in
#    the storage domain with `parallax --connect` (TLS-PSK over the dom0 <-> storage vif); a
#    client whose key the daemon does not know is refused.
# 2. Two guests, each with its own VDI served by the storage domain. The xenstore permissions
#    of their backend and frontend directories are what libxl sets (the backend's owned by the
#    storage domain and readable by its guest; the frontend's owned by the guest and readable by
#    the storage domain), and a guest that tries to write its backend's nodes, or to read or write
#    the other guest's, is refused; its own disk keeps working.
rig_backend_start

# --- management from dom0 ----------------------------------------------------------------------
pattern mgmt 512 >"$RIG_TMP/mgmt.img"
must rig_sd_px vdi import base "$RIG_TMP/mgmt.img"
must rig_sd_px vdi create scratch --size 64M
must rig_sd_px vdi snapshot base gold
must rig_sd_px vdi fork base@gold child
list=$(rig_sd_px vdi list --json) || fail "vdi list --json: $list"
for v in '"base"' '"scratch"' '"child"' '"base@gold"'; do
  echo "$list" | grep -q "$v" || fail "vdi list does not show $v: $list"
done
info=$(rig_sd_px vdi info child --json) || fail "vdi info child: $info"
echo "$info" | grep -q '"origin": *"base@gold"' || fail "child's origin is not base@gold: $info"
must rig_sd_px vdi delete scratch
rig_sd_px vdi list --json | grep -q '"scratch"' && fail "scratch is still listed after delete"
must rig_sd_px df
# The fork's content, read back from dom0 (over NBD with TLS).
rig_vdi_export child "$RIG_TMP/child.out"
pattern_check "$RIG_TMP/child.out" 512 mgmt || fail "the fork does not hold the imported data"
# Another key: refused, in one line.
echo "intruder:$(head -c 32 /dev/urandom | hexdump -ve '1/1 "%02x"')" >"$RIG_TMP/intruder.psk"
if out=$(rig_px_local --connect "$RIG_SD_IP" --connect-psk-file "$RIG_TMP/intruder.psk" \
  --connect-username intruder vdi list 2>&1); then
  fail "a client with an unknown key listed VDIs: $out"
fi
say "unknown key refused: $out"
say "dom0 manages the storage domain's VDIs over --connect"

# --- what guests may touch ---------------------------------------------------------------------
pattern zero 256 >"$RIG_TMP/blank.img"
rig_vdi_new own-1 "$RIG_TMP/blank.img"
rig_vdi_new own-2 "$RIG_TMP/blank.img"
cat >"$RIG_TMP/perm-guest.sh" <<'G'
guest_wait_dev xvda
guest_set ready 1
guest_wait_key go 1 120
me=$(xenstore-read domid)
be=$(xenstore-read device/vbd/51712/backend)
other=$(guest_get other)
[ -n "$be" ] && [ -n "$other" ] || fail "no backend path or other guest"
say "my backend is $be; the other guest is domain $other"
xenstore-read "$be/params" >/dev/null || fail "cannot read my own backend's params"
try_write() {
  if xenstore-write "$1" "$2" 2>/dev/null; then fail "wrote $1"; fi
  say "refused: write $1"
}
try_read() {
  if xenstore-read "$1" >/dev/null 2>&1; then fail "read $1"; fi
  say "refused: read $1"
}
sd_be=${be%/backend/*}/backend/vbd
try_write "$be/params" own-2
try_write "$be/state" 4
try_write "$be/feature-persistent" 0
try_write "$sd_be/$other/51712/params" own-1
try_read "$sd_be/$other/51712/params"
try_write "/local/domain/$other/device/vbd/51712/ring-ref" 1
try_read "/local/domain/$other/device/vbd/51712/ring-ref"
# The storage domain's own nodes.
try_write "${be%/backend/*}/data/rig/ready" 0
# And its own disk still works.
guest_write xvda "perm-$me" 64
guest_verify xvda 64 "perm-$me"
say "every foreign write and read refused; own disk fine"
G
rig_guest p1 "$RIG_TMP/perm-guest.sh" "disk = [ '$(rig_disk own-1 xvda)' ]"
rig_guest p2 "$RIG_TMP/perm-guest.sh" "disk = [ '$(rig_disk own-2 xvda)' ]"
rig_guest_start p1
rig_guest_start p2
rig_guest_wait_key p1 ready 1 120
rig_guest_wait_key p2 ready 1 120
d1=$(rig_domid p1) d2=$(rig_domid p2) sd=$(rig_sd_domid)
# The permissions libxl set: backend owned by the storage domain, readable by its guest only;
# frontend owned by the guest, readable by the storage domain only.
for g in "1 $d1" "2 $d2"; do
  set -- $g
  fe=/local/domain/$2/device/vbd/51712
  be=/local/domain/$sd/backend/vbd/$2/51712
  [ "$(xenstore-read "$fe/backend")" = "$be" ] || fail "p$1's frontend names $(xenstore-read "$fe/backend"), not $be"
  rig_xs_dump "$be" "backend-p$1.txt"
  rig_xs_dump "$fe" "frontend-p$1.txt"
  head -n 1 "$RIG_RESULTS/backend-p$1.txt" | grep -q "(n$sd,r$2)" ||
    fail "p$1's backend directory is not (n$sd,r$2): $(head -n 1 "$RIG_RESULTS/backend-p$1.txt")"
  head -n 1 "$RIG_RESULTS/frontend-p$1.txt" | grep -q "(n$2,r$sd)" ||
    fail "p$1's frontend directory is not (n$2,r$sd): $(head -n 1 "$RIG_RESULTS/frontend-p$1.txt")"
done
say "xenstore permissions: backends (n$sd,r<guest>), frontends (n<guest>,r$sd)"
rig_guest_set p1 other "$d2"
rig_guest_set p2 other "$d1"
rig_guest_set p1 go 1
rig_guest_set p2 go 1
rig_guest_wait p1 180
rig_guest_wait p2 180
# Each VDI holds its own guest's writes only.
rig_vdi_export own-1 "$RIG_TMP/own-1.out"
pattern_check "$RIG_TMP/own-1.out" 64 "perm-$d1" || fail "own-1 does not hold p1's writes"
rig_vdi_export own-2 "$RIG_TMP/own-2.out"
pattern_check "$RIG_TMP/own-2.out" 64 "perm-$d2" || fail "own-2 does not hold p2's writes"
say "each guest reached only its own VDI through its own ring"
