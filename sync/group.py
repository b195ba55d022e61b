"""The weight-update process group: the trainer (rank 0) and the engine rank(s), used only to
broadcast weights.

It is built directly on a TCPStore with the key layout of a default group made by
`torch.distributed.init_process_group(init_method="tcp://addr:port")` ("default_pg/0/<device>/"),
without registering anything in this process's torch.distributed state. So: a trainer written with
plain torch.distributed calls (init_process_group + broadcast) joins it; a trainer process that
already owns a default group (FSDP) joins through `UpdateGroup` too (sync.sender does); and the
engine never clobbers a default group of its own process. Every collective waits at most
`timeout`: a trainer that dies mid-broadcast gives a timeout error here, never a hang.
"""
from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, BackendConfig

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
DEFAULT_PREFIX = ("default_pg", "0/")  # what init_process_group's default group uses


class GroupError(RuntimeError):
    """The update group cannot be formed or a broadcast failed (peer gone, timeout)."""


class UpdateGroup:
    def __init__(self, name: str, backend: str, master_address: str, master_port: int, rank: int,
                 world_size: int, timeout: float = 300.0):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; supported: {BACKENDS}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside the group of world_size {world_size}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA; use backend='gloo' on CPU")
        self.name, self.backend, self.rank, self.world_size = name, backend, rank, world_size
        self.timeout = timedelta(seconds=timeout)
        try:
            store = dist.TCPStore(master_address, int(master_port), world_size, is_master=rank == 0,
                                  timeout=self.timeout)
        except Exception as e:  # noqa: BLE001 - connection errors come in several types
            raise GroupError(f"cannot reach the trainer's store at {master_address}:{master_port}: {e}") from e
        store = dist.PrefixStore(DEFAULT_PREFIX[1], dist.PrefixStore(DEFAULT_PREFIX[0], store))
        self.devices: dict[str, object] = {}
        device_map = BackendConfig(Backend(backend)).get_device_backend_map()
        shared = len(set(device_map.values())) == 1  # init_process_group then makes one backend, first prefix
        for device, impl in device_map.items():
            prefixed = dist.PrefixStore(f"{device}/", store)
            try:
                if impl == "gloo":
                    made = dist.ProcessGroupGloo(prefixed, rank, world_size, self.timeout)
                else:
                    opts = dist.ProcessGroupNCCL.Options()
                    # the watchdog's limit lies beyond ours: our timed wait reports a dead trainer and aborts
                    # the group first (the watchdog would tear the whole engine process down)
                    opts._timeout = self.timeout * 2 + timedelta(seconds=60)
                    made = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
            except Exception as e:  # noqa: BLE001
                raise GroupError(f"update group {name!r}: {backend} rendezvous failed: {e}") from e
            if shared:
                self.devices = dict.fromkeys(device_map, made)
                break
            self.devices[device] = made
        log.info("weight update group %r: rank %d of %d over %s (%s:%s)", name, rank, world_size, backend,
                 master_address, master_port)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """One broadcast, waited for on the host (at most `timeout`)."""
        self.wait([self.post(tensor, src)])

    def post(self, tensor: torch.Tensor, src: int = 0):
        """Enqueue a broadcast without waiting: NCCL runs it after the work already queued on the current
        stream. Before the current stream reads the data or reuses the buffer, `work.wait()` (a stream
        wait, the host does not block) or `wait(works)`."""
        impl = self.devices.get(tensor.device.type)
        if impl is None:
            raise GroupError(f"update group {self.name!r} ({self.backend}) cannot carry {tensor.device.type} tensors")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        try:
            return impl.broadcast([tensor], opts)
        except Exception as e:  # noqa: BLE001 - gloo/nccl report a dead peer this way
            raise GroupError(f"broadcast in group {self.name!r} failed (trainer gone or timed out): {e}") from e

    def wait(self, works: list) -> None:
        """Block the host until every posted broadcast has completed, at most `timeout` in all (one host
        wait per update, not one per broadcast: a timed wait polls, and NCCL runs posted work in order)."""
        try:
            for work in works[::-1]:  # the last one first: when it is done, an in-order backend is done
                if not work.wait(self.timeout):
                    raise GroupError(f"broadcast in group {self.name!r} timed out after {self.timeout}")
        except GroupError:
            raise
        except Exception as e:  # noqa: BLE001 - gloo/nccl report a dead peer or a timeout this way
            raise GroupError(f"broadcast in group {self.name!r} failed (trainer gone or timed out): {e}") from e

    def destroy(self) -> None:
        for impl in {id(i): i for i in self.devices.values()}.values():
            # abort, not shutdown: NCCL's shutdown may wait on the peer (a trainer and an engine that both
            # tear down while waiting for each other's reply would deadlock); abort is local and immediate
            shutdown = getattr(impl, "abort", None) or getattr(impl, "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception:  # noqa: BLE001 - best effort on a broken group
                    pass
        self.devices.clear()
