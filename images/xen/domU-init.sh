#!/bin/sh
# /init of the Xen rig's PV guests (packed by images/xen/build.sh). Loads xen-blkfront, then runs
# /guest.sh, which the dom0 side appends per guest as a second cpio archive (the kernel unpacks
# concatenated archives in order), and powers the guest off. Output goes to hvc0, which dom0's
# xenconsoled logs. Markers: RIG-GUEST-UP, RIG-GUEST-DONE rc=N.
#
# Helpers for guest scripts come the same way (/guest-lib.sh, sourced first), so both can change
# without rebuilding this image.
export PATH=/usr/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "RIG-GUEST-UP uptime=$(cut -d' ' -f1 /proc/uptime)"

modprobe xen-blkfront || echo "rig-guest: modprobe xen-blkfront failed"

rc=0
if [ -f /guest.sh ]; then
  # A subshell, so that `exit` or `set -e` in the script ends the script, not init.
  (
    [ -f /guest-lib.sh ] && . /guest-lib.sh
    . /guest.sh
  )
  rc=$?
else
  echo "rig-guest: no /guest.sh"
  rc=97
fi
sync
echo "RIG-GUEST-DONE rc=$rc"
poweroff -f
