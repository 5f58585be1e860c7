"""The public offline API: `LLM(model=dir, ...)`, `llm.generate(...)`, `llm.update_weights(...)`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from routereplay.config import EngineConfig, RoutingReplayConfig
from routereplay.engine.llm_engine import LLMEngine
from routereplay.outputs import RequestOutput
from routereplay.sampling_params import SamplingParams, cut_at_stop


class LLM:
    """A rollout engine over a Hugging Face checkpoint directory, recording routing when asked.

    Keyword arguments are `EngineConfig` fields: dtype, max_num_seqs, max_model_len,
    max_num_batched_tokens, block_size, enable_prefix_caching, gpu_memory_utilization,
    num_kv_blocks, enforce_eager, seed, and routing_replay (a RoutingReplayConfig, dict or JSON).
    """

    def __init__(self, model: str, routing_replay: RoutingReplayConfig | dict | str | None = None, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, routing_replay=routing_replay, **kwargs))

    @property
    def tokenizer(self):
        """The model directory's tokenizer (transformers ``AutoTokenizer``)."""
        if self.engine.tokenizer is None:
            raise ValueError(f"{self.engine.config.model} has no tokenizer: pass prompt_token_ids")
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        Every request is validated before any work starts: a bad one raises ValueError naming its
        index and field, and the engine stays usable.
        """
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        texts: list[str | None]
        if prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [self.tokenizer(t)["input_ids"] for t in texts]
        else:
            ids = [list(p) for p in prompt_token_ids]
            texts = [None] * len(ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(ids) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(ids):
            raise ValueError(f"got {len(params)} sampling_params for {len(ids)} prompts")
        for i, (p, sp) in enumerate(zip(ids, params, strict=True)):
            try:
                self.engine.validate(p, sp)
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from None
        # Prompts that share a rollout id form a batch under it, keyed per prompt as the server keys one
        # request's prompts (rollout_id/j/i), so no two of them write the same store key.
        uses = Counter(sp.rollout_id for sp in params if sp.rollout_id is not None)
        shared = {r for r, count in uses.items() if count > 1}
        request_ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        try:
            for j, (p, sp, t) in enumerate(zip(ids, params, texts, strict=True)):
                index = j if sp.rollout_id in shared else None
                try:
                    request_ids.append(self.engine.add_request(p, sp, prompt=t, prompt_index=index))
                except ValueError as e:  # e.g. its rollout id is in flight already
                    raise ValueError(f"request {j}: {e}") from None
            wanted = set(request_ids)
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:  # not one someone added to the engine directly
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in request_ids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        outputs = [results[r] for r in request_ids]
        self._finalize(outputs, params)
        return outputs

    def _finalize(self, outputs: Iterable[RequestOutput], params: list[SamplingParams]) -> None:
        tokenizer = self.engine.tokenizer
        for out, sp in zip(outputs, params, strict=True):
            for c in out.outputs:
                if tokenizer is not None:
                    c.text = tokenizer.decode(c.token_ids, skip_special_tokens=sp.skip_special_tokens)
                    if c.stop_reason is not None:
                        c.text = cut_at_stop(c.text, [c.stop_reason], include=sp.include_stop_str_in_output)
                if c.store_future is not None:
                    err = c.store_future.exception()
                    c.routing_error = None if err is None else f"{type(err).__name__}: {err}"

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | dict) -> int:
        """Copy weights in place (transformers parameter names, or checkpoint names); returns count."""
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        return self.engine.update_weights(items)

    @property
    def moe_layer_ids(self) -> list[int]:
        return list(self.engine.model_config.moe_layer_ids)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
