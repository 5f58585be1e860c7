"""Paged KV blocks with prefix caching.

A full block whose tokens have all been computed is registered under a hash chained over every
token before it, so a later sequence with the same prefix reuses the block (its K/V AND its
routing rows, which live at the same slots). Blocks with no owner stay cached until their memory
is needed; they are evicted least-recently-freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from routereplay.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default=())


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.prefix_caching = enable_prefix_caching

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def match_prefix(self, seq: Sequence) -> int:
        """Reuse cached blocks for the sequence's leading full blocks; returns tokens covered.

        Only blocks that end before the last token qualify: that token must be forwarded to
        produce the logits of the next one. A sequence that still needs prompt log-probs reads nothing
        (vLLM V1): its prompt positions must be forwarded; its blocks are still committed for others.
        """
        if not self.prefix_caching or seq.needs_prompt_logprobs:
            return 0
        bs, h = self.block_size, None
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(h, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        return len(seq.block_table) * bs

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give the sequence slots for its first `num_tokens` tokens; False (nothing taken) if short."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed in the step just run."""
        bs = self.block_size
        if not self.prefix_caching or seq.num_computed_tokens // bs == len(seq.block_hashes):
            return
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.cached.setdefault(h, block.block_id)

    def release(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_table_synced = 0
