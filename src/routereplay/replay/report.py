"""What a replay context did, for a trainer to log: coverage, fall-backs, recomputes; and the aux loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from routereplay.replay.hf import _Session


class ReplayReport:
    """Coverage of one ``RoutingReplay.replay()`` context (yielded by it; live until backward has run).

    Per forward run inside the context: ``tokens`` = B*T positions, of which ``tokens_replayed`` were
    forced to the routing and ``tokens_fell_back`` routed natively because ``mask`` was False (a
    sample's last token, padding). ``layers_replayed`` is the number of MoE layers every forward
    reached (it equals ``moe_layers`` unless a forward was refused, which is an error by default).
    ``recomputed_layers`` counts router calls replayed again by gradient-checkpointing recomputes,
    so it grows when backward runs, also after the context has exited.
    """

    def __init__(self, session: _Session) -> None:
        self._session = session

    @property
    def moe_layers(self) -> int:
        return self._session.num_layers

    @property
    def forwards(self) -> int:
        return len(self._session.steps)

    @property
    def layers_replayed(self) -> int:
        steps = self._session.steps
        return min((sum(1 for calls in step.calls if calls) for step in steps), default=0)

    @property
    def tokens(self) -> int:
        return self._session.tokens

    @property
    def tokens_replayed(self) -> int:
        return self._session.tokens_replayed

    @property
    def tokens_fell_back(self) -> int:
        return self._session.tokens - self._session.tokens_replayed

    @property
    def recomputed_layers(self) -> int:
        return sum(max(calls - 1, 0) for step in self._session.steps for calls in step.calls)

    def as_dict(self, prefix: str = "replay/") -> dict[str, int]:
        """The numbers above, keyed for a trainer's logger (``{"replay/layers_replayed": 2, ...}``)."""
        names = ("moe_layers", "forwards", "layers_replayed", "tokens", "tokens_replayed", "tokens_fell_back",
                 "recomputed_layers")
        return {prefix + name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value}" for key, value in self.as_dict(prefix="").items())
        return f"ReplayReport({fields})"

    def load_balancing_loss(self, attention_mask: torch.Tensor | None = None, forward: int = -1) -> torch.Tensor:
        """Switch-Transformer load-balancing loss of one forward, from the experts it actually used.

        Same formula and scale as transformers' ``load_balancing_loss_func`` (``E * sum_e f_e * P_e``,
        ``f_e`` = share of (token, slot) assignments to expert e, ``P_e`` = mean softmax probability of
        e, each summed over MoE layers, padding excluded by ``attention_mask [B, T]``), except that
        ``f_e`` counts the replayed selection (native where ``mask`` was False) instead of a top-k of
        the training router's scores. Gradients reach the routers through ``P_e``. Needs
        ``rr.replay(..., aux_loss="replayed")``.
        """
        session = self._session
        if not session.keep_aux:
            raise ValueError('load_balancing_loss needs rr.replay(..., aux_loss="replayed")')
        if not session.steps:
            raise ValueError("no forward ran inside the replay context")
        step = session.steps[forward]
        pairs = [pair for pair in step.aux if pair is not None]
        if len(pairs) != session.num_layers:
            raise ValueError(f"forward {forward} reached {len(pairs)} of {session.num_layers} MoE layers")
        num_experts = session.num_experts
        device = pairs[0][0].device
        tokens_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
        prob_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
        weights = None
        if attention_mask is not None:
            weights = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
            if weights.shape[0] != pairs[0][0].shape[0]:
                raise ValueError(
                    f"attention_mask has {weights.shape[0]} positions, the forward had {pairs[0][0].shape[0]}"
                )
        rows = 0.0
        for logits, ids in pairs:
            probs = torch.softmax(logits.to(device), dim=-1).float()
            ids = ids.to(device)
            slot_weights = (
                torch.ones(ids.numel(), dtype=torch.float32, device=device)
                if weights is None
                else weights.repeat_interleave(ids.shape[1])
            )
            tokens_per_expert = tokens_per_expert.scatter_add(0, ids.reshape(-1), slot_weights)
            if weights is None:
                prob_per_expert = prob_per_expert + probs.sum(dim=0)
                rows = rows + probs.shape[0]
            else:
                prob_per_expert = prob_per_expert + (probs * weights[:, None]).sum(dim=0)
                rows = rows + weights.sum()
        return (tokens_per_expert / rows * (prob_per_expert / rows)).sum() * num_experts
