# The Xen rig's driver in dom0 (the dom0 /init runs it from the host share as /host/dom0-main.sh).
# Runs each scenario named in /host/scenarios.list in a shell of its own (own session, `set -e`,
# dom0/lib.sh loaded) with a time limit, shows its output on the console, keeps it in
# /host/results/NAME/log, and records /host/results/NAME/status as "rc=N secs=S". An entry
# NAME@BACKEND runs scenarios/NAME.sh with RIG_BACKEND=BACKEND (e.g. 02-two-forks@storage: the
# same scenario with the daemon in a storage domain); its results are under NAME@BACKEND.
# Console markers: RIG-SCENARIO-BEGIN NAME, RIG-SCENARIO-END NAME rc=N secs=S.
. /host/rig.env
export RIG_BACKEND RIG_SCENARIO_TIMEOUT RIG_DEBUG
limit=${RIG_SCENARIO_TIMEOUT:-300}

uptime_cs() { read -r _up _ </proc/uptime; _s=${_up%.*}; _f=${_up#*.}; echo $(( _s * 100 + 1${_f} - 100 )); }

mkdir -p /host/results
failed=0
for name in $(cat /host/scenarios.list); do
  script=${name%@*}
  backend=$RIG_BACKEND
  case "$name" in
    *@*) backend=${name#*@} ;;
    sd-*) backend=storage ;;  # they test the storage domain itself
  esac
  dir=/host/results/$name
  mkdir -p "$dir"
  # Each scenario's scratch files start afresh: /tmp is dom0's RAM.
  rm -rf /tmp/rig
  : >"$dir/log"
  echo "RIG-SCENARIO-BEGIN $name"
  t0=$(uptime_cs)
  tail -f "$dir/log" &
  tailpid=$!
  # setsid: the scenario leads its own process group, so whatever it leaves running in the
  # background (watch loops, daemons) is killed with it.
  RIG_BACKEND=$backend RIG_RESULTS=$dir setsid sh -c '. /host/rig/lib.sh; set -e; . "/host/scenarios/$1.sh"' sh "$script" \
    >>"$dir/log" 2>&1 </dev/null &
  pid=$!
  while kill -0 $pid 2>/dev/null && [ $(( $(uptime_cs) - t0 )) -lt $((limit * 100)) ]; do sleep 0.2; done
  if kill -0 $pid 2>/dev/null; then
    kill -KILL $pid 2>/dev/null
    wait $pid
    rc=137
    echo "RIG-FAIL: scenario $name killed after ${limit}s" >>"$dir/log"
  else
    wait $pid
    rc=$?
    [ $rc = 0 ] || grep -q 'RIG-FAIL' "$dir/log" ||
      echo "RIG-FAIL: scenario $name exited with status $rc" >>"$dir/log"
  fi
  # Leave nothing behind for the next scenario: the guests first, while the backend still serves
  # them; then the backend, stopped as an admin would (it fails the scenario unless it stops
  # cleanly); then whatever else the scenario left running in its process group.
  RIG_BACKEND=$backend RIG_RESULTS=$dir sh -c '. /host/rig/lib.sh; rig_cleanup; rig_backend_stop' >>"$dir/log" 2>&1 || {
    [ $rc != 0 ] || rc=1
    grep -q 'RIG-FAIL' "$dir/log" || echo "RIG-FAIL: the backend did not stop cleanly" >>"$dir/log"
  }
  kill -KILL -$pid 2>/dev/null
  sleep 0.3
  kill $tailpid
  t1=$(uptime_cs)
  secs=$(( (t1 - t0) / 100 )).$(( (t1 - t0) % 100 / 10 ))
  echo "rc=$rc secs=$secs" >"$dir/status"
  echo "RIG-SCENARIO-END $name rc=$rc secs=$secs"
  [ $rc = 0 ] || failed=$((failed + 1))
done
sync
exit $failed
