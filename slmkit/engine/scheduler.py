"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step the scheduler

1. gives each decoding sequence a slot for its next token, preempting the most recently admitted
   sequences (their blocks are freed and they go back to the head of the queue, to be recomputed
   later, mostly from the prefix cache) when the cache has no block left;
2. spends the rest of the token budget (``max_num_batched_tokens``) on prompt chunks: first those of
   sequences already part-way through their prompt, then new requests in arrival order, each starting
   after the longest prefix the cache already holds.

So requests join and leave at every step, long prompts are prefilled in chunks between decode steps,
and the engine never runs out of cache memory mid-step: a request that could not fit even alone is
refused when it is added.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import torch

from slmkit.engine.kv_cache import BlockAllocator, block_hash
from slmkit.engine.sampling import SamplingParams
from slmkit.engine.speculative import NgramIndex


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's tokens, cache blocks and progress."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    blocks: list[int] = dataclasses.field(default_factory=list)
    hashes: list[int] = dataclasses.field(default_factory=list)  # of blocks[:len(hashes)], registered
    num_computed: int = 0  # tokens whose keys/values are in the cache
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (first admission)
    preemptions: int = 0
    finish_reason: str | None = None
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    emitted_tokens: int = 0
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    ngram_index: NgramIndex | None = None  # prompt-lookup drafts, built on the first speculative step
    cache_root: int | None = None  # the prefix-cache chain starts here: blocks share across equal roots only

    @property
    def tokens(self) -> list[int]:
        """Prompt and output so far."""
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        """Whether the sequence has stopped (its finish_reason is set)."""
        return self.finish_reason is not None


@dataclasses.dataclass
class Schedule:
    """What one step runs: decoding sequences (one token each) and prompt chunks (sequence, tokens)."""

    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]


class Scheduler:
    """Queues, admission, chunked prefill and preemption over a :class:`BlockAllocator`.

    Args:
        allocator: the cache's block allocator.
        block_size: tokens per block.
        max_batch_size: sequences running at once at most.
        max_num_batched_tokens: tokens (decode + prompt chunks) one step may process.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch_size: int, max_num_batched_tokens: int):
        self.allocator, self.block_size = allocator, block_size
        self.max_batch_size, self.max_num_batched_tokens = max_batch_size, max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, sequence: Sequence) -> None:
        """Queue a new sequence (the engine has checked it fits the cache)."""
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        """Whether any sequence is queued or running."""
        return bool(self.waiting or self.running)

    # ---- blocks ---------------------------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _grow(self, sequence: Sequence, tokens: int) -> bool:
        """Give ``sequence`` blocks for its first ``tokens`` tokens; False (nothing taken) if too few are free."""
        needed = self._blocks_for(tokens) - len(sequence.blocks)
        if needed > self.allocator.available:
            return False
        sequence.blocks += [self.allocator.allocate() for _ in range(max(0, needed))]
        return True

    def reserve(self, sequence: Sequence, tokens: int) -> bool:
        """Blocks for ``sequence``'s first ``tokens`` tokens if they can be had now (speculative drafts
        beyond its next token); False, and nothing taken, otherwise. Never preempts."""
        return self._grow(sequence, tokens)

    def free(self, sequence: Sequence) -> None:
        """Release a sequence's blocks (finished, aborted or preempted)."""
        self.allocator.release(sequence.blocks)
        sequence.blocks, sequence.hashes, sequence.num_computed = [], [], 0

    def _preempt(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self.free(sequence)
        sequence.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(sequence)

    def restart(self, sequence: Sequence) -> None:
        """Drop a sequence's cached keys and queue it first, to compute all its tokens again (not counted as a
        preemption: LongRoPE's switch to the long factors, see ``Engine``)."""
        if sequence in self.running:
            self.running.remove(sequence)
            self.waiting.appendleft(sequence)
        self.free(sequence)

    def finish(self, sequence: Sequence) -> None:
        """Remove a finished (or aborted) sequence and free its blocks."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.free(sequence)

    def prefix_hashes(self, tokens: list[int], count: int, root: int | None = None) -> list[int]:
        """Hashes of the first ``count`` full blocks of ``tokens``, each chained to the one before (the first
        to ``root``)."""
        hashes, parent = [], root
        for i in range(count):
            parent = block_hash(parent, tuple(tokens[i * self.block_size:(i + 1) * self.block_size]))
            hashes.append(parent)
        return hashes

    def register_full_blocks(self, sequence: Sequence) -> None:
        """Hash the blocks a step just filled so later requests can reuse them."""
        full = sequence.num_computed // self.block_size
        if full <= len(sequence.hashes):
            return
        tokens = sequence.tokens
        parent = sequence.hashes[-1] if sequence.hashes else sequence.cache_root
        for i in range(len(sequence.hashes), full):
            parent = block_hash(parent, tuple(tokens[i * self.block_size:(i + 1) * self.block_size]))
            self.allocator.register(sequence.blocks[i], parent)
            sequence.hashes.append(parent)

    # ---- one step -------------------------------------------------------------------------------------------

    def schedule(self) -> Schedule:
        """Pick this step's decode sequences and prompt chunks (see the module docstring)."""
        decode = []
        for sequence in list(self.running):
            if sequence not in self.running or sequence.pending != 1:
                continue
            while not self._grow(sequence, sequence.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim in decode:
                    decode.remove(victim)
                if victim is sequence:
                    break
            else:
                decode.append(sequence)
        budget = self.max_num_batched_tokens - len(decode)
        prefill = []
        for sequence in self.running:
            if sequence.pending > 1 and budget > 0:
                chunk = self._chunk(sequence, budget)
                if chunk:
                    prefill.append((sequence, chunk))
                    budget -= chunk
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            sequence = self.waiting[0]
            if not sequence.blocks:
                reusable = (sequence.num_tokens - 1) // self.block_size  # keep one token to compute logits from
                hashes = self.prefix_hashes(sequence.tokens, reusable, sequence.cache_root)
                sequence.blocks = self.allocator.lookup(hashes)
                sequence.hashes = hashes[: len(sequence.blocks)]
                sequence.num_computed = len(sequence.blocks) * self.block_size
                if not sequence.preemptions:
                    sequence.cached_tokens = sequence.num_computed
            chunk = self._chunk(sequence, budget)
            if not chunk:
                self.free(sequence)  # give the reused blocks back until it can run
                break
            self.waiting.popleft()
            self.running.append(sequence)
            prefill.append((sequence, chunk))
            budget -= chunk
        return Schedule(decode, prefill)

    def _chunk(self, sequence: Sequence, budget: int) -> int:
        """The largest prompt chunk (≤ budget) whose blocks can be had now; 0 if none."""
        held = len(sequence.blocks) * self.block_size - sequence.num_computed
        capacity = held + self.allocator.available * self.block_size
        chunk = min(sequence.pending, budget, capacity)
        if chunk <= 0 or not self._grow(sequence, sequence.num_computed + chunk):
            return 0
        return chunk
