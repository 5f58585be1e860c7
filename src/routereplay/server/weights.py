"""Weight sync endpoints, as SGLang names them: from a checkpoint on disk, or from a trainer's process group
(init / update / destroy). Each update runs between two engine steps; names and shapes are checked before
anything is written, and the prefix cache is dropped (it holds the old weights' KV)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from routereplay.server.frontend import Frontend
from routereplay.server.protocol import (
    ApiError,
    DistributedWeightsBody,
    GroupNameBody,
    UpdateWeightsBody,
    WeightGroupBody,
    engine_param,
)
from routereplay.weight_sync import parse_dtype


class Weights:
    def __init__(self, front: Frontend) -> None:
        self.front = front
        self.groups: dict[str, Any] = {}  # group name -> process group shared with a trainer

    async def _abort_all(self) -> None:
        thread = self.front.thread
        await self.front.on_engine_thread(lambda engine: thread.end_early("", every=True))

    def _updated(self, count: int, weight_version: str | None) -> dict[str, Any]:
        message = f"{count} tensors written"
        if weight_version is not None:
            self.front.weight_version = weight_version
            message += f"; weight version {weight_version!r}"
        return {"success": True, "num_tensors": count, "message": message}

    async def update_weights_from_disk(self, body: UpdateWeightsBody) -> dict[str, Any]:
        """Sync weights from a checkpoint directory. Requests in flight keep going with the new weights from
        the next step on (``abort_all_requests`` ends them first): pause sampling first to keep a rollout on
        one policy."""
        front = self.front
        front.check_alive()
        if not front.options.weight_dir_allowed(body.model_path):
            # one answer whether the path exists or not: the error reveals nothing outside the allow-list
            raise ApiError(400, "model_path is not under a directory this server loads weights from "
                           "(--weight-dir)", "model_path")
        if not os.path.isdir(body.model_path):
            raise ApiError(400, f"model_path {body.model_path!r} is not a directory", "model_path")
        if body.abort_all_requests:
            await self._abort_all()
        count, error = await front.on_engine_thread(
            lambda engine: engine.update_weights_from_checkpoint(body.model_path))
        if error is not None:
            raise ApiError(400, f"update_weights_from_disk: {error}", "model_path")
        return self._updated(count, body.weight_version)

    async def init_weights_update_group(self, body: WeightGroupBody) -> dict[str, Any]:
        """Join a trainer's process group (blocks until every rank has joined, at most --weight-group-timeout;
        the engine keeps stepping)."""
        front = self.front
        front.check_alive()
        if body.group_name in self.groups:
            raise ApiError(400, f"group_name {body.group_name!r} exists already", "group_name")
        if body.backend == "nccl" and not front.engine.config.device.startswith("cuda"):
            raise ApiError(400, "backend nccl needs an engine on CUDA; use gloo", "backend")
        timeout_s = front.options.weight_group_timeout_s
        try:
            front.engine.check_weight_group(body.rank_offset, body.world_size, body.backend, timeout_s)
        except ValueError as e:  # "rank_offset ..." or "world_size=... leaves no room ...": names its field
            raise ApiError(400, f"init_weights_update_group: {e}", engine_param(str(e), "world_size")) from None

        def join(engine):
            return engine.join_weight_group(body.master_address, body.master_port, body.rank_offset,
                                            body.world_size, body.group_name, body.backend, timeout_s)

        tp = front.engine.config.tensor_parallel_size
        if tp == 1:  # no worker to tell: join off the engine thread, which keeps stepping
            try:
                group, error = await asyncio.to_thread(join, front.engine), None
            except Exception as e:
                group, error = None, f"{type(e).__name__}: {e}"
        else:  # the workers are told through their control group, between two steps (as SGLang)
            group, error = await front.on_engine_thread(join)
        if error is not None:
            raise ApiError(400, f"init_weights_update_group: {error}", "master_address")
        self.groups[body.group_name] = group
        ranks = f"rank {body.rank_offset}" if tp == 1 else f"ranks {body.rank_offset}..{body.rank_offset + tp - 1}"
        return {"success": True, "message": f"joined {body.group_name!r} as {ranks}"}

    async def update_weights_from_distributed(self, body: DistributedWeightsBody) -> dict[str, Any]:
        """Receive the trainer's broadcasts; a wrong name or shape is a 400 after every broadcast was received
        and discarded: nothing written, the group still in step."""
        front = self.front
        front.check_alive()
        group = self.groups.get(body.group_name)
        if group is None:
            raise ApiError(400, f"group_name {body.group_name!r}: no such group (/init_weights_update_group)",
                           "group_name")
        if not len(body.names) == len(body.dtypes) == len(body.shapes):
            raise ApiError(400, "names, dtypes and shapes must have one entry per tensor", "names")
        try:
            dtypes = [parse_dtype(d) for d in body.dtypes]
        except ValueError as e:
            raise ApiError(400, str(e), "dtypes") from None
        if body.abort_all_requests:
            await self._abort_all()
        count, error = await front.on_engine_thread(
            lambda engine: engine.receive_weights(group, body.names, dtypes, body.shapes))
        if error is not None:
            raise ApiError(400, f"update_weights_from_distributed: {error}", "names")
        return self._updated(count, body.weight_version)

    async def destroy_weights_update_group(self, body: GroupNameBody) -> dict[str, Any]:
        group = self.groups.pop(body.group_name, None)
        if group is None:
            raise ApiError(400, f"group_name {body.group_name!r}: no such group", "group_name")
        if group.tp_size == 1:
            self.front.engine.leave_weight_group(group)
        else:  # the workers leave too, told between two steps
            _, error = await self.front.on_engine_thread(lambda engine: engine.leave_weight_group(group))
            if error is not None:
                raise ApiError(503, f"destroy_weights_update_group: {error}", type="server_error")
        return {"success": True, "message": f"left {body.group_name!r}"}
