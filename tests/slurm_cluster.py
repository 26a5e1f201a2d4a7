"""A real single-node SLURM (munged + slurmctld + slurmd) on this machine, for tests/test_slurm.py.

Debian's `slurm-wlm` and `munge` are installed with apt-get when missing (root only). The slurm.conf is written
into a temporary directory and selected with `SLURM_CONF`, so no system file is written or overwritten; the one
system state touched is munge's own (`/run/munge`, started from the key the package installed). Daemons that are
already running are reused and left alone; `stop()` ends only the processes `start()` launched.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
PROGRAMS = ("sbatch", "squeue", "sinfo", "scontrol", "srun", "slurmctld", "slurmd", "munged", "munge", "unmunge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")


class SlurmUnavailable(Exception):
    """SLURM cannot be installed or started here (the message says why): the test is skipped with it."""


def ensure_installed(timeout: float = 600) -> None:
    """Install slurm-wlm and munge with apt-get if any of their programs is missing."""
    if all(shutil.which(program, path=_sbin_path()) for program in PROGRAMS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed and installing {' '.join(PACKAGES)} needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise SlurmUnavailable(f"`{' '.join(command)}` failed: {' / '.join(tail)}")
    missing = [program for program in PROGRAMS if not shutil.which(program, path=_sbin_path())]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but still missing: {', '.join(missing)}")


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(program: str) -> str:
    return shutil.which(program, path=_sbin_path())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _running(name: str) -> list[int]:
    """Process ids whose command name is exactly `name` (read from /proc, nothing is signalled)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _config_of(pid: int) -> Path:
    """The slurm.conf a running slurm daemon uses: its `-f` argument, its SLURM_CONF, or the default."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        if b"-f" in argv:
            return Path(argv[argv.index(b"-f") + 1].decode())
        environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        for item in environ:
            if item.startswith(b"SLURM_CONF="):
                return Path(item.split(b"=", 1)[1].decode())
    except (OSError, IndexError):
        pass
    return Path("/etc/slurm/slurm.conf")


def _memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("cannot read MemTotal from /proc/meminfo")


class SingleNodeSlurm:
    """munged + slurmctld + slurmd on this host, one node (all its CPUs, RealMemory a little under the total)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ)
        self.own_controller = True

    # -- setup ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> SingleNodeSlurm:
        """Start what is not running yet and wait until the node is idle; on failure, stop what was started."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        controllers = _running("slurmctld")
        if os.geteuid() != 0 and not controllers:
            raise SlurmUnavailable("starting munged, slurmctld and slurmd needs root")
        self._start_munge()
        if controllers:  # a cluster is up already: use its configuration, leave it as it is
            self.conf = _config_of(controllers[0])
            self.own_controller = False
        else:
            self._write_config()
        self.env["SLURM_CONF"] = str(self.conf)
        self._install_srun_shim()
        if not controllers:
            self._launch("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld did not answer a ping")
        if not _running("slurmd"):
            self._launch("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        self.wait_idle(timeout)

    def _start_munge(self) -> None:
        if self._munge_works():
            return
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        for directory in (MUNGE_RUN, Path("/var/lib/munge"), Path("/var/log/munge")):
            directory.mkdir(parents=True, exist_ok=True)
            shutil.chown(directory, "munge", "munge")
        MUNGE_RUN.chmod(0o755)
        self._launch("munged", [_which("munged"), "--foreground"], user="munge", group="munge")
        self._wait(self._munge_works, 20, "munged did not start (munge -n | unmunge fails)")

    @staticmethod
    def _munge_works() -> bool:
        try:
            token = subprocess.run([_which("munge"), "-n"], capture_output=True, timeout=10)
            return token.returncode == 0 and subprocess.run(
                [_which("unmunge")], input=token.stdout, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _write_config(self) -> None:
        for name in ("state", "spool", "log", "bin"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        memory = max(1024, _memory_mib() - max(512, _memory_mib() // 20))  # a little under the total
        self.conf.write_text("\n".join([
            "ClusterName=lowrank-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MinJobAge=3600",  # finished jobs stay in squeue for an hour: the executor and the test read them there
            # (no sacct), and a slow run must not lose its first jobs before the end
            "SchedulerParameters=sched_min_interval=0,batch_sched_delay=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 {self._hardware()} RealMemory={memory} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    @staticmethod
    def _hardware() -> str:
        """CPUs and their topology as slurmd detects them (a node configured otherwise may come up invalid)."""
        try:
            detected = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            detected = ""
        keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        fields = [word for word in detected.split() if word.split("=")[0] in keys]
        return " ".join(fields) if fields else f"CPUs={os.cpu_count() or 1}"

    def _install_srun_shim(self) -> None:
        """The jobstep executor drops every SLURM_* variable (SLURM_CONF too) before it calls srun inside a job;
        a private slurm.conf then needs srun to be told where it is again."""
        if self.conf == Path("/etc/slurm/slurm.conf"):
            return
        shim = self.root / "bin" / "srun"
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}"\nexport SLURM_CONF\nexec {_which("srun")} "$@"\n')
        shim.chmod(0o755)
        self.env["PATH"] = os.pathsep.join([str(shim.parent), self.env.get("PATH", ""), "/usr/sbin"])

    def _launch(self, name: str, command: list[str], **user) -> None:
        log = open(self.root / f"{name}.out", "ab")
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, **user)
        log.close()
        self.started.append((name, process))

    # -- state ---------------------------------------------------------------------------------------------
    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def _ok(self, command: list[str], expected: str) -> bool:
        try:
            done = self.run(*command, timeout=15)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0 and expected in done.stdout

    def node_states(self) -> dict[str, str]:
        done = self.run("sinfo", "--noheader", "--Node", "--format=%N %T")
        return dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float = 90) -> None:
        """Until sinfo shows an idle node; our node, when it comes up drained or down, is resumed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            states = self.node_states()
            if "idle" in states.values():
                return
            state = states.get(self.node, "")
            if self.own_controller and any(word in state for word in ("drain", "down", "fail")):
                self.run("scontrol", "update", f"nodename={self.node}", "state=resume")
            time.sleep(0.5)
        raise RuntimeError(f"no idle node after {timeout:.0f} s (sinfo: {self.node_states()})\n" + self.logs())

    def _wait(self, condition, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            self._check_alive()
            time.sleep(0.3)
        raise RuntimeError(f"{message}\n{self.logs()}")

    def _check_alive(self) -> None:
        for name, process in self.started:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{self.logs()}")

    def logs(self, lines: int = 20) -> str:
        text = []
        for path in sorted(self.root.glob("*.out")) + sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            text.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(text)

    def controller_log(self) -> str:
        path = self.root / "log" / "slurmctld.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- teardown ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """End the daemons this object started (slurmd, slurmctld, munged: the reverse order), nothing else;
        jobs still in our own controller's queue (a run that timed out) are cancelled first."""
        if any(name == "slurmctld" and process.poll() is None for name, process in self.started):
            self.run("scancel", f"--user={pwd.getpwuid(os.geteuid()).pw_name}", timeout=30)
        for name, process in reversed(self.started):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
        self.started.clear()

    def __enter__(self) -> SingleNodeSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
