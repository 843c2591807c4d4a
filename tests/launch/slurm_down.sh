#!/bin/bash
# Stop what slurm_up.sh started (by PID file; munged is left running for other users of it).
STATE=${1:?state dir}
stop() { [ -f "$1" ] || return 0; p=$(cat "$1"); kill -TERM "$p" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$p" 2>/dev/null && kill -KILL "$p"; rm -f "$1"; }
stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
exit 0
