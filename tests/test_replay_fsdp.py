"""Replay under FSDP2 (``fully_shard``) and DDP with 2 gloo processes on CPU: sharding by decoder layer,
and sharding the router modules themselves (FSDP renames their class to ``FSDP<Name>``), with gradient
checkpointing and backward after the replay context has exited.

Each rank trains on its own batch and routing; the reference is the unsharded model with its routers
forced to the same experts (no RoutingReplay), run on both ranks' batches: the sharded gradients
(averaged over ranks by FSDP) must equal the mean of the two reference gradients.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from routereplay.replay import RoutingReplay
from tests.test_replay import build, enable_checkpointing, random_routing, token_ids
from tests.test_replay_wrapped import FAMILIES, assert_used, force_experts, loss_of, used_experts

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference_grads(model: torch.nn.Module, family: str, batches: list, moe_layer_ids: list[int]) -> dict:
    """Mean over ranks of each rank's reference gradient (what FSDP's averaged reduce-scatter gives)."""
    total: dict[str, torch.Tensor] = {}
    logits = []
    for ids, routing in batches:
        reference = copy.deepcopy(model)
        force_experts(reference, family, routing, moe_layer_ids)
        out = reference(ids, use_cache=False).logits
        loss_of(out).backward()
        logits.append(out.detach())
        for name, param in reference.named_parameters():
            total[name] = total.get(name, 0) + param.grad / len(batches)
    return {"grads": total, "logits": logits}


def _worker(rank: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for family in FAMILIES:
            for shard_routers in (False, True):
                model = build(family).train()
                plain = copy.deepcopy(model)
                if shard_routers:
                    enable_checkpointing(model, use_reentrant=False)
                    for layer in model.model.layers:
                        if hasattr(layer.mlp, "gate"):
                            fully_shard(layer.mlp.gate, mesh=mesh)
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                rr = RoutingReplay(model)
                if shard_routers:
                    assert all(type(r).__name__.startswith("FSDP") for r in rr._routers), rr._routers
                batches = [(token_ids(2, 5, seed=10 + r), random_routing(rr, 2, 5, seed=20 + r)) for r in range(WORLD)]
                ids, routing = batches[rank]
                with used_experts(model) as calls:
                    with rr.replay(routing) as report:
                        logits = model(ids, use_cache=False).logits
                    loss_of(logits).backward()  # after the context: checkpointed layers recompute here
                assert_used(calls, routing, rr.moe_layer_ids, count=2 if shard_routers else 1)
                assert report.recomputed_layers == (len(rr.moe_layer_ids) if shard_routers else 0)
                want = _reference_grads(plain, family, batches, rr.moe_layer_ids)
                torch.testing.assert_close(logits, want["logits"][rank], rtol=1e-5, atol=1e-6)
                for name, param in model.named_parameters():
                    torch.testing.assert_close(
                        param.grad.full_tensor(), want["grads"][name], rtol=1e-5, atol=1e-7,
                        msg=f"{family} shard_routers={shard_routers} {name}",
                    )
                rr.close()
        # DDP: routers under "module."; gradients all-reduced (averaged) like FSDP's.
        from torch.nn.parallel import DistributedDataParallel

        family = "qwen3_moe"
        plain = build(family).train()
        model = DistributedDataParallel(copy.deepcopy(plain))
        rr = RoutingReplay(model)
        assert rr.router_names[0][0].startswith("module.")
        batches = [(token_ids(2, 5, seed=10 + r), random_routing(rr, 2, 5, seed=20 + r)) for r in range(WORLD)]
        ids, routing = batches[rank]
        with used_experts(model) as calls, rr.replay(routing):
            logits = model(ids, use_cache=False).logits
        loss_of(logits).backward()
        assert_used(calls, routing, rr.moe_layer_ids, count=1)
        want = _reference_grads(plain, family, batches, rr.moe_layer_ids)
        torch.testing.assert_close(logits, want["logits"][rank], rtol=1e-5, atol=1e-6)
        for name, param in model.module.named_parameters():
            torch.testing.assert_close(param.grad, want["grads"][name], rtol=1e-5, atol=1e-7, msg=f"DDP {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_fsdp2_by_layer_and_by_router_module_and_ddp() -> None:
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
