# Teardown when the frontend vanishes: `xl destroy` of a guest in the middle of O_DIRECT writes.
# The backend must let go of everything the dead guest granted (or Xen keeps it as a dying
# "(null)" domain for as long as a mapping is held), of its event channels, and of the VDI: a
# new guest then attaches the same VDI writable and finds every block either untouched or a
# whole block of what the first guest was writing, never torn.
rig_backend_start
pattern zero 1024 >"$RIG_TMP/blank.img"
rig_vdi_new dx "$RIG_TMP/blank.img"

cat >"$RIG_TMP/dx-guest.sh" <<'G'
guest_wait_dev xvda
guest_set phase writing
# 64 KiB O_DIRECT writes over the first 4 MiB, round and round, until dom0 destroys us.
while :; do
  pattern busy 1024 | dd of=/dev/xvda bs=65536 oflag=direct conv=notrunc 2>/dev/null ||
    fail "write"
done
G
rig_guest dx "$RIG_TMP/dx-guest.sh" "disk = [ '$(rig_disk dx xvda)' ]"
rig_guest_start dx
rig_guest_wait_key dx phase writing 120
sleep 2
id=$(rig_domid dx)
be=$(rig_be_path dx 51712)
[ -n "$be" ] || fail "no backend path for dx's xvda"
must xl destroy dx
rm -f "$RIG_TMP/guest-dx/domid"
_rig_guest_log dx >/dev/null
# libxl removes the backend directory itself; the domain must then really go away (no dying
# "(null)" domain left holding pages the backend still maps).
n=0
while { xenstore-exists "$be" || xl list 2>/dev/null | grep -q '(null)'; } && [ $n -lt 100 ]; do
  n=$((n + 1)); sleep 0.2
done
xenstore-exists "$be" && fail "backend directory $be still there after xl destroy"
if xl list | grep -q '(null)'; then
  xl list
  fail "domain $id is still dying 20 s after xl destroy: the backend holds its grants"
fi
say "domain $id gone, backend directory gone"

# The same VDI, writable, in a new guest.
cat >"$RIG_TMP/dx2-guest.sh" <<'G'
guest_wait_dev xvda
guest_verify xvda 1024 zero,busy
guest_write xvda after 256
guest_verify xvda 256 after
G
rig_guest dx2 "$RIG_TMP/dx2-guest.sh" "disk = [ '$(rig_disk dx xvda)' ]"
rig_guest_run dx2 120
rig_vdi_export dx "$RIG_TMP/dx.out"
pattern_check "$RIG_TMP/dx.out" 256 after || fail "the second guest's write is missing"
pattern_check "$RIG_TMP/dx.out" 768 zero,busy 256 || fail "blocks 256.. are torn or foreign"
say "the VDI survived its guest's destruction and serves the next one"
