# The storage domain destroyed under guest I/O, then started again (issue 18).
#
# A guest writes blocks 0..255 and flushes them, then keeps writing blocks 256..511 with
# O_DIRECT and no flush; a second guest, with no disk from the storage domain, ticks a counter.
# `xl destroy storage` in the middle of the writes: dom0 and the bystander carry on, the
# writer's disk fails (its I/O does not complete). The storage domain starts again on the same
# store: it opens as after any crash (the intent log replayed, nothing repaired), `check` is
# clean, and a new guest on the same VDI finds every flushed block and no torn one. The time
# from the destroy to the guest having its disk back is reported.
rig_backend_start
pattern zero 1024 >"$RIG_TMP/blank.img"
rig_vdi_new iso "$RIG_TMP/blank.img"

cat >"$RIG_TMP/by-guest.sh" <<'G'
i=0
while :; do i=$((i + 1)); guest_set tick $i; sleep 0.5; done
G
cat >"$RIG_TMP/iso-guest.sh" <<'G'
guest_wait_dev xvda
guest_write xvda flushed 256
guest_set phase flushed
n=0
while pattern busy 256 256 | dd of=/dev/xvda bs=65536 seek=$((256 * 4096)) iflag=fullblock \
    oflag=direct,seek_bytes conv=notrunc 2>/dev/null; do
  n=$((n + 1)); guest_set rounds $n
done
guest_set io failed
say "the disk failed after $n rounds"
sleep 3600
G
rig_guest by "$RIG_TMP/by-guest.sh" "memory = 128"
rig_guest iso "$RIG_TMP/iso-guest.sh" "disk = [ '$(rig_disk iso xvda)' ]"
rig_guest_start by
rig_guest_start iso
rig_guest_wait_key iso phase flushed 120
_end=$(( $(now) + 60 ))
until [ "$(rig_guest_get iso rounds)" -ge 2 ] 2>/dev/null; do
  [ "$(now)" -lt $_end ] || fail "the guest did not write after its flush"
  sleep 0.2
done

t0=$(uptime_cs)
must xl destroy "$RIG_SD_NAME"
rig_sd_wait_gone 30 || fail "the storage domain is still there 30s after xl destroy"
_rig_sd_log
say "storage domain destroyed after $(rig_guest_get iso rounds) rounds of unflushed writes"
# dom0 carries on (this script runs), and so does the bystander.
tick=$(rig_guest_get by tick)
sleep 3
[ "$(rig_guest_get by tick)" -gt "$tick" ] || fail "the bystander guest stopped ticking"
rig_guest_alive iso || fail "the writer guest died with its storage domain"
# The writer's disk: no more writes complete.
r0=$(rig_guest_get iso rounds); sleep 3; r1=$(rig_guest_get iso rounds)
[ "$r0" = "$r1" ] || fail "writes still complete after the storage domain is gone ($r0 -> $r1)"
say "dom0 and the bystander carry on; the writer's writes stopped at round $r1 ($(rig_guest_get iso io || echo no) error seen by the guest)"
xenstore-ls -fp "$(rig_fe_path iso 51712)" >"$RIG_RESULTS/frontend-after-destroy.txt" 2>&1 || true

# Back: the same store, the writer rebooted (destroyed and created again) on the same VDI.
rig_sd_start keep
rig_sd_log_has() { grep -q "$1" "/var/log/xen/console/guest-$RIG_SD_NAME.log"; }
if rig_sd_log_has 'replaying the intent log'; then
  say "the store opened with its intent log replayed"
else
  say "the store opened from its last checkpoint (the log held nothing newer)"
fi
# What the store says when it opens after a crash: the last commit, and no repair step.
rig_sd_log_has 'opening the last commit (nothing to repair)' ||
  fail "the store did not open as after a crash from its last commit"
out=$(rig_sd_px check --json) || fail "check after the crash: $out"
say "check after the crash: clean"
must xl destroy iso
rm -f "$RIG_TMP/guest-iso/domid"
cat >"$RIG_TMP/iso2-guest.sh" <<'G'
guest_wait_dev xvda
guest_set attached 1
guest_verify xvda 256 flushed
guest_verify xvda 256 zero,busy 256
guest_verify xvda 512 zero 512
guest_write xvda again 64 768
guest_verify xvda 64 again 768
G
rig_guest iso2 "$RIG_TMP/iso2-guest.sh" "disk = [ '$(rig_disk iso xvda)' ]"
rig_guest_start iso2
rig_guest_wait_key iso2 attached 1 120
t1=$(uptime_cs)
rig_guest_wait iso2 180
secs=$(( (t1 - t0) / 100 )).$(( (t1 - t0) % 100 / 10 ))
echo "destroyed -> restarted -> guest disk back: ${secs}s" >"$RIG_RESULTS/recovery.txt"
say "storage domain destroyed -> restarted -> guest disk back in ${secs}s; every flushed block there, none torn"
must xl destroy by
