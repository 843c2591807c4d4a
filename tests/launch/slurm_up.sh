#!/bin/bash
# A one-host SLURM (Debian's slurmctld/slurmd/munge, no systemd, no cgroups) for launch tests. Root only.
# Usage: tests/launch/slurm_up.sh STATE_DIR   (writes /etc/slurm/slurm.conf; stop with slurm_down.sh STATE_DIR)
set -euo pipefail
STATE=${1:?state dir}
command -v slurmctld >/dev/null || { echo "slurmctld not installed" >&2; exit 3; }
HOST=$(hostname -s); NCPU=$(nproc)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge && chmod 0755 /run/munge
if ! { [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; }; then
  runuser -u munge -- /usr/sbin/munged --force
fi
munge -n | unmunge >/dev/null
rm -rf "$STATE" && mkdir -p "$STATE"/{state,spool,log}
mkdir -p /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=mmpretrain-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
KillWait=30
MinJobAge=600
NodeName=$HOST CPUs=$NCPU Sockets=1 CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld
slurmd
for _ in $(seq 1 150); do sinfo -h -o '%T' 2>/dev/null | grep -q '^idle' && exit 0; sleep 0.2; done
echo "slurm did not come up: $(sinfo 2>&1)" >&2
exit 4
