# The Xen rig's driver in dom0 (the dom0 /init runs it from the host share as /host/dom0-main.sh).
# Runs each scenario named in /host/scenarios.list in its own shell with a time limit, tees its
# output to the console and /host/results/NAME/log, and records /host/results/NAME/status as
# "rc=N secs=S". Console markers: RIG-SCENARIO-BEGIN NAME, RIG-SCENARIO-END NAME rc=N secs=S.
set -o pipefail
. /host/rig.env
export RIG_BACKEND RIG_SCENARIO_TIMEOUT

uptime_cs() { awk '{ printf "%d", $1 * 100 }' /proc/uptime; }

mkdir -p /host/results
failed=0
for name in $(cat /host/scenarios.list); do
  dir=/host/results/$name
  mkdir -p "$dir"
  echo "RIG-SCENARIO-BEGIN $name"
  t0=$(uptime_cs)
  RIG_RESULTS=$dir timeout -s KILL "${RIG_SCENARIO_TIMEOUT:-300}" \
    sh -c '. /host/rig/lib.sh; set -e; . "/host/scenarios/$1.sh"' sh "$name" 2>&1 | tee "$dir/log"
  rc=$?
  if [ $rc = 137 ]; then
    echo "RIG-FAIL: scenario $name killed after ${RIG_SCENARIO_TIMEOUT:-300}s"
  elif [ $rc != 0 ] && ! grep -q 'RIG-FAIL' "$dir/log"; then
    echo "RIG-FAIL: scenario $name exited with status $rc" | tee -a "$dir/log"
  fi
  t1=$(uptime_cs)
  secs=$(( (t1 - t0) / 100 )).$(( (t1 - t0) % 100 / 10 ))
  # Leave nothing behind for the next scenario.
  RIG_RESULTS=$dir sh -c '. /host/rig/lib.sh; rig_cleanup; rig_backend_stop' 2>&1 | tee -a "$dir/log"
  echo "rc=$rc secs=$secs" >"$dir/status"
  echo "RIG-SCENARIO-END $name rc=$rc secs=$secs"
  [ $rc = 0 ] || failed=$((failed + 1))
done
sync
exit $failed
