# Issue 9, scenario 6: a guest whose disk names a VDI that does not exist. `xl create` must fail
# with a message that names the VDI (the hotplug script's hotplug-error, which libxl prints),
# and leave no domain and no backend directory behind.
rig_backend_start
echo 'say "this guest should never run"' >"$RIG_TMP/nope-guest.sh"
rig_guest nope "$RIG_TMP/nope-guest.sh" "disk = [ '$(rig_disk no-such-vdi xvda)' ]"
if rig_guest_create nope; then
  fail "xl create succeeded with a disk on a VDI that does not exist"
fi
grep -q 'no-such-vdi' "$RIG_RESULTS/xl-create-nope.log" ||
  fail "xl create's error does not name the missing VDI"
n=0
while rig_guest_alive nope && [ $n -lt 100 ]; do n=$((n + 1)); sleep 0.1; done
rig_guest_alive nope && fail "domain nope still exists"
[ -z "$(xenstore-list /local/domain/0/backend/vbd 2>/dev/null)" ] ||
  fail "backend directories left: $(xenstore-list /local/domain/0/backend/vbd)"
say "readable error: $(grep -i 'no-such-vdi' "$RIG_RESULTS/xl-create-nope.log" | head -n1)"
