"""A real single-node SLURM cluster on localhost, for the `slurm` tests.

    python tests/hpc/slurm_cluster.py start  [--state DIR]   # installs Debian packages if missing
    python tests/hpc/slurm_cluster.py status [--state DIR]
    python tests/hpc/slurm_cluster.py stop   [--state DIR]
    eval "$(python tests/hpc/slurm_cluster.py env)"           # SLURM_CONF for sbatch/sacct/...

Daemons (Debian 12 packages, SLURM 22.05): munged, a private MariaDB, slurmdbd (job
accounting, so `sacct` answers: snakemake-executor-plugin-slurm polls job state with
`sacct` by default and validates `slurm_account` with `sacctmgr`), slurmctld and one
slurmd with every CPU and most of the memory of this machine. Everything lives in one
state directory (default /tmp/brainsynth-slurm): configs, munge key, database, spool,
logs, pid files; ports are free ports picked at start; nothing under /etc is written.
Container-friendly settings: proctrack/linuxproc, task/none, no cgroups, daemons as root.

`stop` cancels the cluster's jobs, then ends exactly the processes started here: each
daemon from its pid file, and only when that process carries this state directory's
marker in its environment (so a recycled pid is never hit); then any left-over process
with the marker (job steps). Root is needed (SlurmdUser=root, apt-get).
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STATE = Path(os.environ.get("BRAINSYNTH_SLURM_STATE", "/tmp/brainsynth-slurm"))
CLUSTER = "brainsynth"
PARTITION = "local"
NODE = "brainsynth-node"
ACCOUNT = "brainsynth"
MARKER = "BRAINSYNTH_SLURM_STATE"
# The default config path, linked to the private slurm.conf while the cluster runs:
# inside a job, snakemake-executor-plugin-slurm-jobstep 0.6.1 starts `srun` with every
# SLURM_* variable but a few job ids removed, SLURM_CONF included, so that srun only
# finds the cluster at the default path (as on a real cluster's nodes).
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")

# Debian 12: slurm-wlm 22.05.8, munge 0.5.15, mariadb 10.11
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server"]
BINARIES = ["slurmctld", "slurmd", "slurmdbd", "slurmstepd", "sbatch", "srun", "squeue", "sacct",
            "sacctmgr", "sinfo", "scontrol", "scancel", "munged", "munge", "unmunge", "mariadbd",
            "mariadb-install-db", "mariadb"]
# start order; stop runs it backwards
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]


class EnvironmentUnavailable(RuntimeError):
    """This machine cannot host the cluster (not root, no apt-get, packages unreachable)."""


class ClusterError(RuntimeError):
    """A daemon or client of the local cluster failed; the message carries its log tail."""


def _which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def missing_binaries():
    return [b for b in BINARIES if not _which(b)]


def ensure_packages(log=print):
    """Installs the Debian packages when a binary is missing; returns the seconds it took."""
    missing = missing_binaries()
    if not missing:
        return 0.0
    if os.geteuid() != 0:
        raise EnvironmentUnavailable(f"missing {missing} and not root, cannot apt-get install")
    if not shutil.which("apt-get"):
        raise EnvironmentUnavailable(f"missing {missing} and no apt-get on this machine")
    log(f"installing {' '.join(PACKAGES)} (missing: {', '.join(missing)})")
    t0 = time.monotonic()
    # no init script may start system-wide daemons during the install
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if p.returncode != 0:
                raise EnvironmentUnavailable(
                    f"`{' '.join(cmd)}` failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    except subprocess.TimeoutExpired as e:
        raise EnvironmentUnavailable(f"`{' '.join(e.cmd)}` timed out after {e.timeout} s") from None
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    still = missing_binaries()
    if still:
        raise EnvironmentUnavailable(f"installed {PACKAGES} but still missing {still}")
    return time.monotonic() - t0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware():
    """CPUs and memory as slurmd sees them (`slurmd -C`), memory minus 2 GiB headroom."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True).stdout
    hw = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    cpus = int(hw.get("CPUs", os.cpu_count() or 1))
    mem = int(hw.get("RealMemory", 4096))
    return cpus, max(1024, mem - 2048)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _has_marker(pid, state):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{MARKER}={state}".encode() in env


def _marked_pids(state):
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid() and _has_marker(int(d.name), state):
            pids.append(int(d.name))
    return pids


class Cluster:
    def __init__(self, state=DEFAULT_STATE):
        self.state = Path(state).resolve()
        self.etc = self.state / "etc"
        self.logs = self.state / "log"
        self.run = self.state / "run"
        self.conf = self.etc / "slurm.conf"
        self.info_file = self.state / "cluster.json"
        self._procs = {}  # daemons started by this process: reaped on stop (no zombies)

    # -- environment for clients (sbatch, sacct, snakemake) -------------------------------
    def env(self, base=None):
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for k in list(env):  # a test started inside a SLURM job must not leak into ours
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del env[k]
        return env

    def _daemon_env(self):
        env = self.env()
        env[MARKER] = str(self.state)
        return env

    def client(self, *cmd, check=True, timeout=60):
        p = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                           env=self.env(), timeout=timeout)
        if check and p.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def _ok(self, *cmd):
        """True when the client command succeeds, else its output (for the timeout message)."""
        p = self.client(*cmd, check=False)
        return True if p.returncode == 0 else f"rc {p.returncode}: {p.stdout}{p.stderr}".strip()

    # -- configuration ------------------------------------------------------------------
    def _write_configs(self):
        cpus, mem = _node_hardware()
        ports = {k: _free_port() for k in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}
        info = {"cluster": CLUSTER, "partition": PARTITION, "account": ACCOUNT, "node": NODE,
                "cpus": cpus, "real_memory_mb": mem, "ports": ports,
                "db_password": secrets.token_hex(12)}
        for d in (self.etc, self.logs, self.run, self.state / "munge", self.state / "mysql",
                  self.state / "ctld", self.state / "slurmd"):
            d.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o755)
        (self.state / "munge").chmod(0o700)
        munge_sock = self.state / "munge" / "munge.socket"
        self.conf.write_text(f"""\
# written by tests/hpc/slurm_cluster.py: single-node cluster on localhost
ClusterName={CLUSTER}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_sock}
StateSaveLocation={self.state / 'ctld'}
SlurmdSpoolDir={self.state / 'slurmd'}
SlurmctldPidFile={self.run / 'slurmctld.internal.pid'}
SlurmdPidFile={self.run / 'slurmd.internal.pid'}
SlurmctldLogFile={self.logs / 'slurmctld.log'}
SlurmdLogFile={self.logs / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups in a container: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
SwitchType=switch/none
LaunchType=launch/slurm
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
MinJobAge=300
SlurmdTimeout=120
InactiveLimit=0
KillWait=10
# accounting through slurmdbd: sacct (job state polling) and sacctmgr (accounts)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports['slurmdbd']}
# the munge socket for the slurmdbd connection (AuthInfo is not used for it)
AccountingStoragePass={munge_sock}
AccountingStorageEnforce=associations
# sacct shows the job comment (the executor plugin writes rule and wildcards there)
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName={NODE} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
        dbd = self.etc / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge_sock}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports['slurmdbd']}
SlurmUser=root
DebugLevel=info
LogFile={self.logs / 'slurmdbd.log'}
PidFile={self.run / 'slurmdbd.internal.pid'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser=slurm
StoragePass={info['db_password']}
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)  # slurmdbd refuses a config readable by others
        # not read with the plugins above (no cgroup plugin); kept explicit for sites that copy it
        (self.etc / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        self.info_file.write_text(json.dumps(info, indent=1))
        return info

    def info(self):
        return json.loads(self.info_file.read_text())

    def _link_system_conf(self):
        if SYSTEM_CONF.is_symlink():
            target = Path(os.readlink(SYSTEM_CONF))
            owner = Cluster(target.parent.parent)
            if target.name == "slurm.conf" and target.parent.name == "etc" and not owner.running():
                SYSTEM_CONF.unlink()  # left by a cluster of this module that was not stopped
        if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
            raise EnvironmentUnavailable(
                f"{SYSTEM_CONF} exists ({os.path.realpath(SYSTEM_CONF)}): this machine has its own SLURM "
                "configuration (or another test cluster runs); jobs' srun would read that one")
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)

    def _unlink_system_conf(self):
        if SYSTEM_CONF.is_symlink() and Path(os.readlink(SYSTEM_CONF)) == self.conf:
            SYSTEM_CONF.unlink()

    # -- daemons ---------------------------------------------------------------------------
    def _spawn(self, name, cmd):
        log = open(self.logs / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self._daemon_env(), start_new_session=True, cwd=self.state)
        (self.run / f"{name}.pid").write_text(str(proc.pid))
        self._procs[name] = proc
        return proc

    def _log_tail(self, name, n=3000):
        text = ""
        for f in sorted(self.logs.glob(f"{name}*")):
            text += f"--- {f}\n" + f.read_text(errors="replace")[-n:]
        return text

    def _wait(self, what, ok, name, proc=None, timeout=60):
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < timeout:
            try:
                last = ok()
                if last is True:
                    return
            except ClusterError:
                raise
            except Exception as e:  # noqa: BLE001 - report the last failure
                last = e
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{name} exited ({proc.returncode}) before {what}:\n"
                                   f"{self._log_tail(name)}")
            time.sleep(0.5)
        raise ClusterError(f"timed out after {timeout} s waiting for {what} (last: {last}):\n"
                           f"{self._log_tail(name)}")

    def _sql(self, sql):
        sock = self.state / "mysql" / "mysqld.sock"
        return subprocess.run([_which("mariadb"), "--no-defaults", "-S", str(sock), "-u", "root",
                               "-e", sql], capture_output=True, text=True, timeout=30)

    def start(self, log=print):
        """Starts every daemon and returns timings; the cluster is ready to take jobs."""
        if os.geteuid() != 0:
            raise EnvironmentUnavailable("the local SLURM cluster needs root (SlurmdUser=root)")
        times = {"apt_install_s": round(ensure_packages(log), 1)}
        if self.running():
            raise ClusterError(f"a cluster is already running from {self.state}: stop it first")
        t0 = time.monotonic()
        if self.state.exists():
            shutil.rmtree(self.state)
        info = self._write_configs()
        self._link_system_conf()
        ports = info["ports"]

        # munge: private key and socket
        key = self.state / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        sock = self.state / "munge" / "munge.socket"
        p = self._spawn("munged", [_which("munged"), "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                                   f"--pid-file={self.run / 'munged.internal.pid'}",
                                   f"--log-file={self.logs / 'munged.log'}",
                                   f"--seed-file={self.state / 'munge' / 'munged.seed'}"])

        def munge_ok():
            cred = subprocess.run([_which("munge"), "-n", "-S", str(sock)], capture_output=True)
            return cred.returncode == 0 and subprocess.run(
                [_which("unmunge"), "-S", str(sock)], input=cred.stdout, capture_output=True).returncode == 0
        self._wait("munge credentials", munge_ok, "munged", p)

        # MariaDB: private data directory, TCP on 127.0.0.1 only
        data = self.state / "mysql" / "data"
        r = subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
                            "--auth-root-authentication-method=socket", "--skip-test-db"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
        p = self._spawn("mariadbd", [
            _which("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
            f"--socket={self.state / 'mysql' / 'mysqld.sock'}", f"--port={ports['mariadb']}",
            "--bind-address=127.0.0.1", "--skip-name-resolve", f"--pid-file={self.run / 'mariadbd.internal.pid'}",
            f"--log-error={self.logs / 'mariadbd.log'}", "--innodb-buffer-pool-size=128M",
            "--innodb-log-file-size=64M", "--innodb-lock-wait-timeout=900", "--max-connections=50"])
        self._wait("MariaDB", lambda: self._sql("SELECT 1").returncode == 0, "mariadbd", p, timeout=120)
        pw = info["db_password"]
        r = self._sql(f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}'; "
                      "CREATE DATABASE slurm_acct_db; "
                      "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        if r.returncode != 0:
            raise ClusterError(f"MariaDB setup failed: {r.stderr}")

        # slurmdbd, then the cluster and its account in the database
        p = self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: self._ok("sacctmgr", "-n", "list", "cluster"), "slurmdbd", p,
                   timeout=120)
        self.client("sacctmgr", "-i", "add", "cluster", CLUSTER)
        self.client("sacctmgr", "-i", "add", "account", ACCOUNT, f"cluster={CLUSTER}",
                    "description=brainsynth tests", "organization=brainsynth")
        self.client("sacctmgr", "-i", "add", "user", "root", f"account={ACCOUNT}", f"cluster={CLUSTER}")

        p = self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: "UP" in self.client("scontrol", "ping", check=False).stdout,
                   "slurmctld", p)
        p = self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])

        def node_idle():
            st = self.client("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            return True if st == "idle" else f"node state {st!r}"
        self._wait("the node to be idle in sinfo", node_idle, "slurmd", p)
        self._wait("sacct", lambda: self._ok("sacct", "-X", "-n"), "slurmdbd")
        times["cluster_start_s"] = round(time.monotonic() - t0, 1)

        # smoke test: one batch job with a job step started as the executor plugin starts it
        # (without SLURM_CONF), seen by sacct
        t0 = time.monotonic()
        out = self.client("sbatch", "--parsable", "-A", ACCOUNT, "-p", PARTITION, "-t", "2", "--mem", "100",
                          "-o", str(self.logs / "smoke-%j.out"), "--wrap", "env -u SLURM_CONF srun -n1 true",
                          timeout=180).stdout.strip()
        jobid = out.split(";")[0]

        def smoke_done():
            st = self.client("sacct", "-X", "-n", "-P", "-j", jobid, "-o", "State", check=False).stdout.strip()
            if st and st not in ("PENDING", "RUNNING", "COMPLETING"):
                if st != "COMPLETED":
                    raise ClusterError(f"smoke job {jobid}: {st}\n{self._log_tail('smoke')}{self._log_tail('slurmd')}")
                return True
            return st
        self._wait(f"smoke job {jobid} in sacct", smoke_done, "slurmd", timeout=60)
        times["smoke_job_s"] = round(time.monotonic() - t0, 1)
        info["times"] = times
        self.info_file.write_text(json.dumps(info, indent=1))
        return times

    def _pidfile_pids(self):
        pids = {}
        for name in DAEMONS:
            f = self.run / f"{name}.pid"
            if f.exists():
                try:
                    pids[name] = int(f.read_text().strip())
                except ValueError:
                    pass
        return pids

    def running(self):
        """Daemon name -> pid for the daemons of this state directory that are alive."""
        return {n: pid for n, pid in self._pidfile_pids().items()
                if _pid_alive(pid) and _has_marker(pid, self.state)}

    def status(self):
        st = {"state": str(self.state), "daemons": self.running(),
              "other_processes": sorted(set(_marked_pids(self.state)) - set(self.running().values()))}
        if "slurmctld" in st["daemons"]:
            st["sinfo"] = self.client("sinfo", "-h", "-N", "-o", "%N %P %T %c %m", check=False).stdout.strip()
            st["squeue"] = self.client("squeue", "-h", "-o", "%i %j %T %k", check=False).stdout.strip()
        return st

    def stop(self, log=print):
        """Cancels the cluster's jobs and ends every process started from this state dir."""
        alive = self.running()
        if "slurmctld" in alive:
            ids = self.client("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if ids:
                self.client("scancel", *ids, check=False)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 30 and self.client(
                        "squeue", "-h", "-o", "%i", check=False).stdout.strip():
                    time.sleep(1)
        for name in reversed(DAEMONS):
            pid = alive.get(name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            t0 = time.monotonic()
            while _pid_alive(pid) and time.monotonic() - t0 < 30:
                time.sleep(0.2)
            if _pid_alive(pid):
                log(f"{name} ({pid}) ignored SIGTERM, killing")
                os.kill(pid, signal.SIGKILL)
            proc = self._procs.pop(name, None)
            if proc is not None and proc.pid == pid:
                proc.wait(timeout=10)
            log(f"stopped {name} ({pid})")
        # left-overs carrying our marker (job steps of a killed slurmd, ...)
        for _ in range(3):
            rest = _marked_pids(self.state)
            if not rest:
                break
            for pid in rest:
                log(f"killing left-over process {pid}: {_cmdline(pid)}")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        self._unlink_system_conf()
        rest = [p for p in _marked_pids(self.state) if _pid_alive(p)]
        if rest:
            raise ClusterError(f"processes still running after stop: {rest}")


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["start", "stop", "status", "env"])
    ap.add_argument("--state", type=Path, default=DEFAULT_STATE, help=f"state directory [{DEFAULT_STATE}]")
    args = ap.parse_args(argv)
    c = Cluster(args.state)
    if args.command == "env":
        print(f"export SLURM_CONF={c.conf}")
    elif args.command == "start":
        try:
            times = c.start(log=lambda m: print(m, file=sys.stderr))
        except EnvironmentUnavailable as e:
            print(f"cannot host a SLURM cluster here: {e}", file=sys.stderr)
            return 2
        except Exception:
            c.stop(log=lambda m: print(m, file=sys.stderr))
            raise
        print(json.dumps({"state": str(c.state), "slurm_conf": str(c.conf), **times}))
    elif args.command == "status":
        st = c.status()
        print(json.dumps(st, indent=1))
        return 0 if st["daemons"] else 3
    else:
        c.stop(log=lambda m: print(m, file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
