"""Trainer processes for the weight-sync tests (spawned: each is its own process with its own
torch.distributed state, talking to the engine in the test process only through the update group)."""
from __future__ import annotations

import os

import torch


def raw_trainer(port: int, checkpoint: str, queue, names: list[str], done) -> None:
    """sglang's per-tensor protocol written with plain torch.distributed calls: init_process_group
    (tcp://), then one broadcast from rank 0 per tensor in `names` order."""
    import torch.distributed as dist

    from mxroll.model.loader import iter_checkpoint

    tensors = dict(iter_checkpoint(checkpoint, progress=False))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    for name in names:
        dist.broadcast(tensors[name].contiguous(), src=0)
    queue.put("sent")
    done.wait(60)  # the engine has the bytes
    dist.destroy_process_group()


def bucket_trainer(port: int, checkpoint: str, bucket_bytes: int, queue, die_after: int | None = None,
                   scale: float = 1.0) -> None:
    """mxroll's trainer side in its own process: the checkpoint's weights (times `scale`) through the
    recipe (MXFP8 e4m3 + E8M0 scales), packed into flattened buckets, broadcast from rank 0. The bucket
    metadata goes to the test through `queue` (the part an HTTP call carries in production).
    `die_after`: exit abruptly after that many buckets (a trainer that dies mid-update)."""
    from mxroll.model import ModelConfig
    from mxroll.model.loader import iter_checkpoint
    from mxroll.precision import Recipe
    from mxroll.sync.bucket import dtype_name, pack
    from mxroll.sync.group import UpdateGroup
    from mxroll.sync.sender import buckets, mxfp8_named_tensors

    cfg = ModelConfig.from_file(checkpoint)
    weights = [(n, t * scale if t.is_floating_point() else t) for n, t in iter_checkpoint(checkpoint, progress=False)]
    parts = buckets(mxfp8_named_tensors(weights, Recipe(), cfg), bucket_bytes)
    queue.put([([n for n, _ in p], [dtype_name(t.dtype) for _, t in p], [list(t.shape) for _, t in p]) for p in parts])
    queue.put({n: t for p in parts for n, t in p})  # what the engine must hold afterwards, byte for byte
    group = UpdateGroup("weight_update_group", "gloo", "127.0.0.1", port, 0, 2, timeout=60)
    for i, part in enumerate(parts):
        if die_after is not None and i == die_after:
            os._exit(0)
        group.broadcast(pack([t for _, t in part]))
    group.destroy()


def ipc_trainer(payload: list[tuple[str, torch.Tensor]], queue, done) -> None:
    """A colocated trainer: hands its tensors over as shared-memory handles, keeps them alive until told."""
    from mxroll.sync.receiver import serialize_named_tensors

    queue.put(serialize_named_tensors(payload))
    done.wait(60)
