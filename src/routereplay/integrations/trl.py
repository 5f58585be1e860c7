"""TRL's ``GRPOTrainer`` with Rollout Routing Replay (R3).

``R3GRPOTrainer`` is ``trl.GRPOTrainer`` with two changes:

1. **Rollouts come from the routereplay engine.** ``_generate_single_turn`` samples every completion with
   ``llm.generate(..., return_routed_experts=True)`` (TRL's temperature / top-p / top-k /
   ``max_completion_length``; one request per prompt row, as TRL repeats each prompt ``num_generations``
   times) and keeps each completion's routing ``[n_tokens - 1, L_moe, K]`` (row t = the experts used when
   token t was forwarded; the last sampled token has no row). Before generating after an optimizer step,
   the policy's weights are copied into the engine with ``llm.update_weights(model.named_parameters())``.
2. **Every policy log-prob forward replays that routing.** ``_get_per_token_logps_and_entropies`` (TRL
   runs it for the old log-probs, the reference log-probs and the loss) runs the forward inside
   ``RoutingReplay.replay(routing, mask)``, the routing laid out like TRL's batch: left-padded prompt
   (width ``P``) then right-padded completion, so sample b's tokens occupy one contiguous span that ends
   its prompt at column ``P``. Padding and each sample's last token are masked: they route natively.
   ``training_step`` runs backward after ``compute_loss`` returned, i.e. after the context exited; the
   replay hooks keep that forward's routing for backward (also for gradient-checkpoint recomputes).
   A separate reference model (``beta > 0``) gets its own ``RoutingReplay`` and replays the same routing.

Limits: text only (no images), no tool loop / ``rollout_func``, single process, no ``min_p`` /
``generation_kwargs``, and the engine must load the same checkpoint as the policy (full fine-tuning: PEFT
parameter names are not mapped). The routing is looked up by the sample's tokens, so TRL's shuffling and
splitting of the generation batch do not matter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    import trl
except ImportError as exc:  # an optional dependency: pip install "trl>=1.16"
    raise ImportError('routereplay.integrations.trl needs TRL: pip install "trl>=1.16"') from exc

from routereplay import LLM, SamplingParams
from routereplay.replay import ReplayReport, RoutingReplay

__all__ = ["R3GRPOTrainer"]


class R3GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose rollouts come from ``llm`` and whose policy forwards replay their routing.

    ``llm`` must be a ``routereplay.LLM`` on the policy's checkpoint with ``routing_replay={"enable": True}``.
    ``replay=False`` keeps the engine rollouts but lets the trainer route natively (a baseline for
    measuring what R3 changes). ``reports`` holds the ``ReplayReport`` of every replayed forward since the
    last generation (old / reference / loss passes).
    """

    def __init__(self, *args: Any, llm: LLM, replay: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.use_vllm or self.tools or self.rollout_func is not None:
            raise ValueError("R3GRPOTrainer generates with the routereplay engine: no vLLM, tools or rollout_func")
        if self.min_p is not None or self.args.generation_kwargs:
            raise ValueError("R3GRPOTrainer: min_p and generation_kwargs are not passed to the engine")
        self.llm, self.replay = llm, replay
        self._replays: dict[int, RoutingReplay] = {}
        for module in (self.model, self.ref_model):
            if module is not None:
                unwrapped = self.accelerator.unwrap_model(module)
                self._replays[id(unwrapped)] = RoutingReplay(unwrapped)
        # prompt tokens -> [(completion tokens, routing [n - 1, L, K], engine log-probs)]
        self.rollouts: dict[tuple[int, ...], list[tuple[list[int], torch.Tensor, list[float]]]] = {}
        self.reports: list[ReplayReport] = []
        self._synced_step = 0  # the engine loaded the checkpoint the policy started from
        self._requests = 0

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise NotImplementedError("R3GRPOTrainer supports text prompts only")
        if self.state.global_step != self._synced_step:  # the policy changed since the last sync
            self.llm.update_weights(self.accelerator.unwrap_model(self.model).named_parameters())
            self._synced_step = self.state.global_step
        params = []
        for _ in prompt_ids:
            self._requests += 1
            params.append(SamplingParams(
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or -1,
                repetition_penalty=self.repetition_penalty, max_tokens=self.max_completion_length,
                stop_token_ids=list(self.eos_token_ids), seed=self.args.seed * 1_000_003 + self._requests,
                return_routed_experts=True, store_routing=False,
            ))
        outputs = self.llm.generate(prompt_token_ids=[list(p) for p in prompt_ids], sampling_params=params,
                                    use_tqdm=False)
        if self.model.training:  # the buffered training batch of the previous generation is used up
            self.rollouts.clear()
            self.reports.clear()
        completion_ids, logprobs = [], []
        for out in outputs:
            c = out.outputs[0]
            if c.routed_experts is None or c.routed_experts_start != 0:
                raise ValueError("the engine returned no routing: build it with routing_replay={'enable': True}")
            entry = (list(c.token_ids), torch.from_numpy(c.routed_experts).long(), list(c.logprobs))
            self.rollouts.setdefault(tuple(out.prompt_token_ids), []).append(entry)
            completion_ids.append(list(c.token_ids))
            logprobs.append(list(c.logprobs))
        return completion_ids, logprobs

    def aligned_routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing ``[B, T, L, K]`` and mask ``[B, T]`` for TRL's ``prompt (left-padded) + completion`` batch."""
        width = input_ids.size(1) - logits_to_keep  # P: the prompt block
        routing = mask = None
        for b in range(input_ids.size(0)):
            prompt = input_ids[b, :width][attention_mask[b, :width].bool()].tolist()
            row = input_ids[b, width:].tolist()
            # the longest stored completion this row starts with (the rest of the row is padding)
            matches = [e for e in self.rollouts.get(tuple(prompt), []) if row[: len(e[0])] == e[0]]
            if not matches:
                raise KeyError(f"batch row {b}: no engine rollout with these tokens (routing cannot be replayed)")
            completion, rows, _ = max(matches, key=lambda e: len(e[0]))
            if routing is None:
                routing = torch.zeros(*input_ids.shape, *rows.shape[1:], dtype=torch.long)
                mask = torch.zeros(input_ids.shape, dtype=torch.bool)
            start = width - len(prompt)  # the sample's tokens span [start, width + len(completion))
            n_rows = len(prompt) + len(completion) - 1
            routing[b, start : start + n_rows] = rows[:n_rows]
            mask[b, start : start + n_rows] = attention_mask[b, start : start + n_rows].bool().cpu()
        device = input_ids.device
        return routing.to(device), mask.to(device)

    def _get_per_token_logps_and_entropies(self, model: nn.Module, input_ids: torch.Tensor,
                                           attention_mask: torch.Tensor, logits_to_keep: int,
                                           batch_size: int | None = None, **kwargs: Any):
        rr = self._replays.get(id(self.accelerator.unwrap_model(model)))
        if not self.replay or rr is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
        routing, mask = self.aligned_routing(input_ids, attention_mask, logits_to_keep)
        size = batch_size or input_ids.size(0)
        results = []
        for s in range(0, input_ids.size(0), size):  # one replay context per forward, as TRL chunks it
            with rr.replay(routing[s : s + size], mask[s : s + size]) as report:
                results.append(super()._get_per_token_logps_and_entropies(
                    model, input_ids[s : s + size], attention_mask[s : s + size], logits_to_keep, **kwargs))
            self.reports.append(report)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["r3/tokens_replayed_frac"].append(report.tokens_replayed / max(report.tokens, 1))
        logps, entropies, aux = zip(*results, strict=True)
        return (torch.cat(logps), None if entropies[0] is None else torch.cat(entropies),
                None if aux[0] is None else torch.stack(aux).mean())
