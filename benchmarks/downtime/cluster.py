"""Simulated machines for the downtime benchmark (``reconfigure.py --machines N --link RATE``).

One :class:`Cluster` per measured run (fresh namespaces, nothing carried from one run to the
next): ``N`` training machines and one storage machine on one bridge, made with the tests'
``netns_machines`` (a network namespace per machine with its own address, a veth with ``tc``
limits of ``RATE`` each way, a private tmpfs over ``private`` and ``/dev/shm``). The
storage machine runs the tests' S3-compatible server (``tests/s3_server.py``, moto) on its
own address, behind its own link of the same rate, with one bucket: what the baseline's
checkpoints are written to and read from. The driver (this process, the root namespace)
reaches every machine at its address, and they reach it at :attr:`Cluster.address`.

Root, iproute2 and unshare are needed (:func:`available`). Leaving the ``with`` block (an
error, Ctrl-C, SIGTERM turned into SystemExit) kills every process of every machine and
deletes every namespace and link; the private mounts go with the processes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2] / "tests"
S3_SERVER = TESTS / "s3_server.py"
BUCKET = "reconfigure"
_KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}

__all__ = ["Cluster", "available", "BUCKET"]


def _netns():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import netns_machines

    return netns_machines


def available() -> bool:
    """Whether simulated machines can be made here (root, ``ip``, ``tc``, ``unshare``)."""
    return _netns().available()


class Cluster:
    """``machines`` training machines (0..N-1) and a storage machine (N) linked at ``link``.

    Args:
        work: the run's scratch directory; the machines' private tmpfs hides
            ``work/machines`` (nothing else of ``work`` is hidden: the harness's control
            files stay visible to every machine).
        machines: training machines.
        link: each machine's link rate each way (``tc`` syntax, e.g. ``1gbit``).
    """

    def __init__(self, work: Path, machines: int, link: str):
        private = work / "machines"
        private.mkdir(parents=True, exist_ok=True)
        self.work, self.count = work, machines
        self.net = _netns().Machines(private, capacity=machines + 1, link=link, name="reconfigure")
        self.endpoint = ""
        try:
            self._start_storage()
        except BaseException:
            self.net.close()
            raise

    @property
    def address(self) -> str:
        """The root namespace's (the driver's, scalai's coordinator's) address on the bridge."""
        return self.net.coordinator_address

    def machine_address(self, i: int) -> str:
        return self.net.address(i)

    def interface(self, i: int) -> str:
        """Machine ``i``'s network interface (its ``GLOO_SOCKET_IFNAME``)."""
        return self.net.veth(i)[1]

    def private(self, i: int) -> Path:
        """A directory only machine ``i`` sees (on its tmpfs)."""
        return self.net.private / f"m{i}"

    def s3_env(self) -> dict[str, str]:
        """What a process needs to reach the storage machine's S3 server (s3fs, boto3)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **_KEYS}

    def storage_options(self) -> dict:
        """fsspec's options for ``s3://`` URLs on the storage machine, from the root namespace."""
        return {"endpoint_url": self.endpoint, "key": _KEYS["AWS_ACCESS_KEY_ID"],
                "secret": _KEYS["AWS_SECRET_ACCESS_KEY"]}

    def _start_storage(self) -> None:
        log = self.work / "s3-server.log"
        i = self.count
        self.net.spawn(i, f"{sys.executable} {S3_SERVER} {self.net.address(i)}", log)
        deadline = time.time() + 60
        while time.time() < deadline:
            lines = log.read_text().splitlines() if log.exists() else []
            if lines and lines[0].strip().isdigit():
                self.endpoint = f"http://{self.net.address(i)}:{int(lines[0])}"
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the S3 server on the storage machine did not start (see {log})")
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name=_KEYS["AWS_REGION"],
                     aws_access_key_id=_KEYS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=_KEYS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)

    def spawn(self, i: int, command: str, log: Path, env: dict[str, str]):
        """The shell command ``command`` on machine ``i`` (see ``netns_machines.Machines.spawn``)."""
        return self.net.spawn(i, command, log, env)

    def kill(self, i: int) -> list[int]:
        """SIGKILL to every process of machine ``i``; their ids."""
        import signal

        return self.net.signal_all(i, signal.SIGKILL)

    def close(self) -> None:
        self.net.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
