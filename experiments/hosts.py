"""The processes and devices a command runs on: one process and its local devices, or several
processes of JAX's distributed runtime (`jax.distributed`) working in one run folder.

Devices. A sweep's vmapped calls run on a (data, fsdp) mesh (`fluxjax.sharding`): `--devices`
local devices (default all), the model's weights split over `--fsdp` of them (default 1: a whole
replica on each device) and the cells of a call split over the rest (`data`); `--chunk` is the
cells per replica per call, so a call holds chunk x data cells. One device is today's plain path.

Processes (`--distributed`, or `--coordinator/--num-processes/--process-id`): every process runs
the same command; `jax.distributed.initialize` connects them (on a TPU pod slice, under SLURM or
Open MPI it finds the coordinator and the process ids itself). Two modes:

    split    (default) the cells of every experiment are dealt out in order, cell i to process
             i mod N (deterministic, counts within one of each other); each process computes and
             writes its own cells with its own devices as above.
    sharded  (--shard-model) one model over the devices of every process: a global mesh whose
             fsdp axis (and data axis) span the processes. Every process runs every cell
             together (each call is one SPMD program over all of them); process 0 decides which
             cells are pending and writes them.

One run folder on a filesystem every process sees. Process 0 creates or resumes it (config,
code version, invocation record, `run.lock`, stale temporaries removed) before the others join;
each cell is written by exactly one process (cells are atomic folders completed by DONE.json);
run-level files (tables, grids, plots, report, summary, finished.json) are written by process 0
alone, after a barrier of the distributed runtime at the end of each experiment's cells, when every
process's cells of it are done. If a process dies, the runtime stops the others when its
heartbeats stop (`--heartbeat-timeout`); every finished cell stays intact, and a rerun of the same
command, with any number of processes, computes what is missing and writes the run-level files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

WAIT_MS = 30 * 24 * 3600 * 1000  # barriers wait for the slowest process's share of a sweep (a dead one is
#                                  detected by its heartbeats instead)


@dataclasses.dataclass
class Hosts:
    """This process's place among the processes of a command (one process: index 0 of 1)."""

    index: int = 0
    count: int = 1
    sharded: bool = False  # one model over every process's devices (else cells split among processes)
    _calls: int = 0  # barriers and agreements so far: their names are numbered, the same on every process

    @property
    def writer(self) -> bool:
        """Process 0 writes the run folder's own files, and every cell in the sharded mode."""
        return self.index == 0

    @property
    def split(self) -> bool:
        """Several processes, each computing its own share of the cells."""
        return self.count > 1 and not self.sharded

    @property
    def lockstep(self) -> bool:
        """Several processes computing every cell together (one sharded model)."""
        return self.count > 1 and self.sharded

    def share(self, keys: Sequence[str]) -> list[str]:
        """The keys this process computes: every count-th from its index (all in one process or sharded)."""
        return list(keys[self.index::self.count]) if self.split else list(keys)

    def _name(self, what: str) -> str:
        self._calls += 1
        return f"fluxjax/{self._calls}/{what}"

    def barrier(self, what: str) -> None:
        """Wait until every process gets here (a no-op in one process)."""
        if self.count > 1:
            _client().wait_at_barrier(self._name(what), WAIT_MS)

    def agree(self, what: str, value: Any = None) -> Any:
        """Process 0's `value` (JSON), on every process: the others wait for it."""
        if self.count == 1:
            return value
        key = self._name(what)
        if self.writer:
            _client().key_value_set(key, json.dumps(value))
            return value
        return json.loads(_client().blocking_key_value_get(key, WAIT_MS))

    def gather(self, what: str, value: Any) -> list | None:
        """Every process's `value` (JSON) in process order, on process 0; None on the others."""
        if self.count == 1:
            return [value]
        key = self._name(what)
        _client().key_value_set(f"{key}/{self.index}", json.dumps(value))
        if not self.writer:
            return None
        return [json.loads(_client().blocking_key_value_get(f"{key}/{i}", WAIT_MS)) for i in range(self.count)]

    def describe(self) -> str:
        if self.count == 1:
            return "one process"
        mode = "one model sharded over all of them" if self.sharded else "cells split among them"
        return f"{self.count} processes ({mode})"


def _client():
    from jax._src import distributed  # the runtime's client: barriers and a key-value store, no public API

    if distributed.global_state.client is None:
        raise RuntimeError("JAX's distributed runtime is not running; call jax.distributed.initialize first")
    return distributed.global_state.client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--devices, --fsdp and the options of JAX's distributed runtime."""
    g = parser.add_argument_group("devices and processes (see experiments.hosts)")
    g.add_argument("--devices", type=int, default=None,
                   help="local devices the sweeps use (default: every device of this process)")
    g.add_argument("--fsdp", type=int, default=1,
                   help="split the model's weights over this many devices (default 1: a whole model on each device; "
                        "the cells of a sweep call are split over the devices / fsdp replicas)")
    g.add_argument("--distributed", action="store_true",
                   help="run as one of several processes of JAX's distributed runtime, every process running the "
                        "same command: the coordinator and process ids are detected on a TPU pod slice, under SLURM "
                        "(srun) and Open MPI, or given by the three options below")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="the address of process 0's coordinator (implies --distributed)")
    g.add_argument("--num-processes", type=int, default=None, help="how many processes (implies --distributed)")
    g.add_argument("--process-id", type=int, default=None, help="this process's id, 0..N-1 (implies --distributed)")
    g.add_argument("--shard-model", action="store_true",
                   help="one model sharded over the devices of every process (for a model too large for one host), "
                        "every process running every cell together; default: the cells split among the processes")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which the runtime takes a process that stopped sending heartbeats, or "
                        "that failed, for dead and stops the others (default 100, JAX's heartbeat timeout)")


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Problems of the device and process options, one line each (nothing is started)."""
    problems = []
    if args.devices is not None and args.devices < 1:
        problems.append(f"--devices {args.devices}: give at least one device")
    if args.fsdp < 1:
        problems.append(f"--fsdp {args.fsdp}: give at least one device per model")
    given = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        problems.append("--coordinator, --num-processes and --process-id go together (or give --distributed alone "
                        "where the cluster is detected)")
    if args.num_processes is not None and args.process_id is not None \
            and not 0 <= args.process_id < args.num_processes:
        problems.append(f"--process-id {args.process_id}: give 0..{args.num_processes - 1}")
    if args.heartbeat_timeout < 1:
        problems.append(f"--heartbeat-timeout {args.heartbeat_timeout}: give a positive number of seconds")
    return problems


def start(args: argparse.Namespace) -> Hosts:
    """Connect to JAX's distributed runtime if asked (before anything uses JAX) -> this process's Hosts."""
    import jax

    if args.distributed or args.coordinator is not None:
        from jax._src import distributed

        if distributed.global_state.client is None:
            # A process that fails stops at the runtime's shutdown barrier, where the others, waiting at
            # one of ours, never come: its timeout is what ends them, so it is the heartbeat's too.
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout,
                                       shutdown_timeout_seconds=args.heartbeat_timeout)
    return Hosts(index=jax.process_index(), count=jax.process_count(), sharded=bool(args.shard_model))


def placement(model, hosts: Hosts, devices: int | None = None, fsdp: int = 1):
    """Where the sweeps of `model` run (`experiments.backend.Placement`): this process's first `devices`
    local devices, or in the sharded mode the first `devices` of every process; None for one device."""
    import jax

    from experiments.backend import backend
    from experiments.backend import Placement
    from fluxjax import sharding

    local = jax.local_devices()
    n = len(local) if devices is None else devices
    if n > len(local):
        raise ValueError(f"--devices {n}: this process has {len(local)} devices")
    if hosts.lockstep:
        chosen = [d for p in range(hosts.count) for d in sorted((d for d in jax.devices() if d.process_index == p),
                                                                key=lambda d: d.id)[:n]]
        if len(chosen) % fsdp:
            raise ValueError(f"--fsdp {fsdp}: the {len(chosen)} devices of the {hosts.count} processes are not a "
                             f"multiple of it")
        mesh = sharding.global_mesh(data=len(chosen) // fsdp, fsdp=fsdp, devices=chosen)
    else:
        if n % fsdp:
            raise ValueError(f"--fsdp {fsdp}: the {n} devices of this process are not a multiple of it")
        if n == 1:
            return None
        mesh = sharding.make_mesh(data=n // fsdp, fsdp=fsdp, devices=local[:n])
    model = backend(model)
    if hosts.lockstep or fsdp > 1:
        return Placement(mesh=mesh, params=sharding.put_params(model.params, mesh))
    # Whole replicas on this process's devices: the model's own arrays serve as their device's
    # replica (the single sampler calls use them too), so no device holds the weights twice.
    return Placement(mesh=mesh, params=jax.tree_util.tree_map(lambda x: _replicated(x, mesh), model.params))


def _replicated(x, mesh):
    """`x` whole on every device of `mesh` (this process's), its own buffer kept where it lies."""
    import jax

    from fluxjax import sharding

    whole = sharding.replicated(mesh)
    if not isinstance(x, jax.Array) or len(x.devices()) != 1 or not x.devices() <= set(mesh.devices.flat):
        return sharding.put(x, whole)
    shards = [x if d in x.devices() else jax.device_put(x, d) for d in mesh.devices.flat]
    return jax.make_array_from_single_device_arrays(x.shape, whole, shards)
