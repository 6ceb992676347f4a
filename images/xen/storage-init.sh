#!/bin/sh
# /init of the Xen rig's storage (driver) domain (packed by images/xen/build.sh as storage.cpio).
# It does what xen-configs/README.md, "In a storage domain", tells an admin to do in one: the
# user-space grant and event-channel devices, its network, `xl devd` (runs block-parallax for the
# vbds whose backend is this domain), and `parallax serve` with its store on the disk dom0 gives
# it (xvda). dom0 appends /usr/local/bin/parallax (+ libraries), /etc/parallax/parallax.ron and
# the TLS keys as a second archive. Everything goes to the console (hvc0), which dom0's
# xenconsoled keeps as guest-NAME.log.
#
# A clean shutdown (`xl shutdown`: the kernel runs /sbin/poweroff, which signals PID 1) stops the
# daemon with SIGTERM (it detaches the rings and closes the store cleanly), then powers off.
# Kernel command line: rig.ip=ADDR/PREFIX (eth0's address; default 10.99.0.2/24).
# Console markers: RIG-SD-UP, RIG-SD-READY, RIG-SD-STOPPING, RIG-SD-DONE rc=N. Once serving it
# also sets its own xenstore data/rig/ready = 1 (dom0 waits for that).
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/usr/lib/xen-4.17/bin
export HOME=/root
export LD_LIBRARY_PATH=/usr/local/lib/parallax

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run/xen /run/lock /var/log/xen
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
echo "RIG-SD-UP uptime=$(cut -d' ' -f1 /proc/uptime)"

ip=10.99.0.2/24
debug=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    rig.ip=*) ip=${arg#rig.ip=} ;;
    rig.debug=1) debug=1 ;;
  esac
done

done_rc() {
  echo "RIG-SD-DONE rc=$1"
  sync
  poweroff -f
}
fail() { echo "rig-sd: FATAL: $*"; done_rc 99; }

modprobe -a xen-evtchn xen-gntdev xen-privcmd xenfs xen-blkfront xen-netfront || fail "modules"
mount -t xenfs xenfs /proc/xen || fail "mount xenfs"
i=0
until [ -b /dev/xvda ] && [ -e /sys/class/net/eth0 ]; do
  i=$((i + 1)); [ $i -gt 300 ] && fail "no store disk xvda or no eth0"; sleep 0.1
done
ip link set lo up
ip addr add "$ip" dev eth0 || fail "ip addr add $ip dev eth0"
ip link set eth0 up || fail "eth0 up"

# xl devd runs the hotplug scripts of the devices whose backend this domain is.
xl devd -p /run/xldevd.pid || fail "xl devd"

[ -x /usr/local/bin/parallax ] || fail "no parallax binary (dom0 appends it)"
stopping=0
trap 'stopping=1' USR1 USR2 TERM INT
# Its log to the console and to /tmp/serve.log (to see when it serves), every line of it: tee
# ends when the daemon does, and is waited for before power-off.
mkfifo /tmp/serve.fifo
tee /tmp/serve.log </tmp/serve.fifo &
teepid=$!
parallax serve --config /etc/parallax/parallax.ron >/tmp/serve.fifo 2>&1 &
pid=$!
i=0
until grep -q 'xen: serving vbds' /tmp/serve.log; do
  kill -0 $pid 2>/dev/null || fail "parallax serve died"
  i=$((i + 1)); [ $i -gt 600 ] && fail "parallax serve did not come up in 60s"
  sleep 0.1
done
# rig.debug=1: every 20 s, the kernel stacks of the xenstore threads, the daemon's and xl
# devd's threads, on the console (no xenstore needed to see them).
if [ $debug = 1 ]; then
  (
    while sleep 20; do
      echo "rig-sd-debug: uptime $(cut -d' ' -f1 /proc/uptime)"
      for t in /proc/[0-9]*; do
        read -r comm <"$t/comm" 2>/dev/null || continue
        case "$comm" in
          xenwatch|xenbus|parallax*|xl|tokio*|xenbus_*)
            for k in "$t"/task/*; do
              echo "rig-sd-debug: ${t#/proc/}/${k##*/} $(cat "$k/comm" 2>/dev/null) [$(cut -d' ' -f3 "$k/stat" 2>/dev/null)]"
              sed 's/^/rig-sd-debug:    /' "$k/stack" 2>/dev/null | head -n 12
            done ;;
        esac
      done
    done
  ) &
fi
xenstore-write data/rig/ready 1
echo "RIG-SD-READY uptime=$(cut -d' ' -f1 /proc/uptime)"

# Wait for a shutdown request (or the daemon's end).
while [ $stopping = 0 ] && kill -0 $pid 2>/dev/null; do sleep 0.2; done
echo "RIG-SD-STOPPING"
rc=0
if kill -0 $pid 2>/dev/null; then
  kill -TERM $pid
  wait $pid
  rc=$?
else
  wait $pid
  rc=$?
  echo "rig-sd: parallax serve exited by itself"
fi
wait $teepid
done_rc $rc
