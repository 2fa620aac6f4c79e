"""The scheduler of one serving replica, after vLLM: continuous batching over a paged KV cache.

Pure bookkeeping, no time: the engine asks for a step, times it, and commits it.

Every request has ``prompt`` tokens and ``output`` tokens to generate; ``computed`` tokens of
it are in the KV cache and ``generated`` output tokens exist. A step gives a request ``q`` new
tokens to compute on top of its ``c = computed``; when ``computed`` reaches
``prompt + generated`` the step samples its next output token (the first step that completes
the prompt yields the first token; each decode step, ``q = 1``, one more). A request holds
``ceil(computed / block_size)`` blocks of the replica's KV cache; they are allocated for the
tokens a step computes before it runs and freed when the request finishes.

Policies (``workload.requests``):

* ``chunked_prefill: true`` (vLLM V1, the default): one step serves the running requests in
  admission order (decodes take 1 token, unfinished prompts a chunk of what is left of the
  ``max_num_batched_tokens`` budget), then admits waiting requests first come first served
  while the budget, ``max_batch_size`` running requests and free blocks allow, the last one
  possibly with a partial prompt;
* ``chunked_prefill: false`` (vLLM V0): when waiting requests can be admitted, a prefill-only
  step admits whole prompts within the budget (a lone prompt longer than the budget is
  admitted alone); otherwise a decode step serves every running request.

When a running request needs a block and none is free, the most recently admitted running
request is preempted by recompute (vLLM's default): its blocks are freed, it goes back to the
front of the waiting queue, and when admitted again it recomputes its prompt and the tokens it
had generated before producing the next one. No waiting request is admitted in a step that
preempted (V1's rule). Prefix caching and the admission watermark are not modelled.

**Runs of decode steps**: when a step only decodes (every running request takes one token, no
request was admitted or preempted), the next steps are the same batch one token further, until
a request finishes, the cache runs out of blocks or a request arrives. :meth:`run_length`
says how many such steps the engine may time at once; :meth:`commit` applies them together.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


class RequestBook:
    """Per-request state shared by every replica (Python lists: cheap scalar access)."""

    def __init__(self, prompt: np.ndarray, output: np.ndarray):
        n = len(prompt)
        self.prompt = [int(x) for x in prompt]
        self.output = [int(x) for x in output]
        self.computed = [0] * n
        self.generated = [0] * n
        self.blocks = [0] * n
        self.first_scheduled_ms = [float("nan")] * n  # first admitted into a step
        self.first_token_ms = [float("nan")] * n
        self.finish_ms = [float("nan")] * n
        self.preemptions = [0] * n
        self.replica = [-1] * n


@dataclass(slots=True)
class Step:
    """One step of one replica: the requests it serves, in order, with their new tokens, and
    the sums the step timer needs, accumulated while the step was built (no second pass)."""

    ids: list[int]
    new_tokens: list[int]
    context: list[int]  # tokens already in the cache before the step
    decode_only: bool  # the start of a run of identical decode steps (module docstring)
    preempted: int = 0
    admitted: int = 0  # the last ``admitted`` of ``ids`` joined the running batch in this step
    decodes: int = 0  # requests of the step generating one more token on top of a first one
    tokens: int = 0  # sum of new_tokens
    pairs: int = 0  # query-key pairs of causal attention: sum of q c + q (q + 1) / 2
    kv_read: int = 0  # tokens of context read: sum of new_tokens + context
    outputs_left: int = 0  # fewest output tokens any request of the step has still to make

    def aggregates(self, num_microbatches: int) -> list[list[float]]:
        """Sums per micro-batch (requests dealt round-robin), as four rows of ``V`` numbers:
        ``tokens``, ``seqs``, ``pairs`` (query-key pairs of causal attention) and
        ``kv_read`` (tokens of context read)."""
        v = num_microbatches
        if v == 1:
            return [[self.tokens], [len(self.ids)], [self.pairs], [self.kv_read]]
        out = [[0] * v for _ in range(4)]
        for i, (a, b) in enumerate(zip(self.new_tokens, self.context, strict=True)):
            col = i % v
            out[0][col] += a
            out[1][col] += 1
            out[2][col] += a * b + a * (a + 1) // 2
            out[3][col] += a + b
        return out


class ReplicaScheduler:
    """Waiting queue, running batch and KV blocks of one replica (module docstring)."""

    def __init__(
        self,
        book: RequestBook,
        num_blocks: int,
        block_size: int,
        max_seqs: int,
        max_batched_tokens: int,
        chunked_prefill: bool,
    ):
        self.book = book
        self.num_blocks = num_blocks
        self.free_blocks = num_blocks
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.budget = max_batched_tokens
        self.chunked = chunked_prefill
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.preemptions = 0
        self.peak_used = 0  # blocks in use at the end of the last commit, before freeing
        self.held_blocks = 0  # blocks of requests handed off, until released (prefill pool)

    # ---- queries ---------------------------------------------------------------------------
    @property
    def load(self) -> int:
        """Requests in the replica (waiting and running)."""
        return len(self.waiting) + len(self.running)

    @property
    def used_blocks(self) -> int:
        """KV blocks held by requests."""
        return self.num_blocks - self.free_blocks

    def fits(self, rid: int) -> bool:
        """Whether the request could ever complete alone in this cache."""
        book = self.book
        return self._blocks_for(book.prompt[rid] + book.output[rid] - 1) <= self.num_blocks

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def add(self, rid: int) -> None:
        """A request arrives at this replica."""
        self.waiting.append(rid)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> Step | None:
        """The next step, with its blocks allocated; None when there is nothing to do."""
        if not self.running and not self.waiting:
            return None
        if not self.chunked and self.waiting:
            step = self._prefill_step()
            if step is not None:
                return step
        step = self._running_step()
        if step.ids:
            return step
        if step.preempted:  # it preempted every running request: admit from the queue
            return self.schedule()
        return None

    def _allocate(self, rid: int, tokens: int) -> bool:
        """Blocks for ``tokens`` new tokens of ``rid``; False if the cache lacks them."""
        book = self.book
        need = self._blocks_for(book.computed[rid] + tokens) - book.blocks[rid]
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        book.blocks[rid] += need
        return True

    def _preempt(self, rid: int) -> None:
        book = self.book
        self.free_blocks += book.blocks[rid]
        book.blocks[rid] = 0
        book.computed[rid] = 0
        book.preemptions[rid] += 1
        self.preemptions += 1
        self.waiting.appendleft(rid)

    def _running_step(self) -> Step:
        """Serve the running requests (preempting from the tail), then admit waiting ones
        (chunked prefill only)."""
        book, running = self.book, self.running
        prompt, output, generated = book.prompt, book.output, book.generated
        computed, blocks = book.computed, book.blocks
        bs = self.block_size
        ids: list[int] = []
        new: list[int] = []
        ctx: list[int] = []
        budget, preempted, decodes = self.budget, 0, 0
        tokens = pairs = context = 0
        left = 1 << 62
        free = self.free_blocks
        for rid in running:
            if budget <= 0:
                break
            c = computed[rid]
            g = generated[rid]
            remaining = prompt[rid] + g - c
            q = remaining if remaining < budget else budget
            need = -(-(c + q) // bs) - blocks[rid]
            if need <= free:  # the common case: the blocks are there
                free -= need
                blocks[rid] += need
            else:  # preempt from the tail until they are (shortening ``running``)
                self.free_blocks = free
                rid_preempted = False
                while not self._allocate(rid, q):
                    victim = running.pop()
                    self._preempt(victim)
                    preempted += 1
                    if victim == rid:
                        rid_preempted = True
                        break
                free = self.free_blocks
                if rid_preempted:
                    break
            ids.append(rid)
            new.append(q)
            ctx.append(c)
            budget -= q
            tokens += q
            pairs += q * c + q * (q + 1) // 2
            context += c
            if output[rid] - g < left:
                left = output[rid] - g
            # a true decode: one token on top of a first token (not a prompt's last token)
            if remaining == 1 and g > 0:
                decodes += 1
        self.free_blocks = free
        all_served = len(ids) == len(running)
        step = Step(ids, new, ctx, False, preempted, 0, decodes, tokens, pairs, 0, left)
        if self.chunked and not preempted and self.waiting:  # (nothing to admit otherwise)
            step.admitted, admitted_context = self._admit(step, budget)
            context += admitted_context
        step.kv_read = step.tokens + context
        step.decode_only = (
            decodes == len(ids) and all_served and not preempted and not step.admitted
        ) and bool(ids)
        return step

    def _admit(self, step: Step, budget: int) -> tuple[int, int]:
        """Admit waiting requests into ``step`` (chunked prefill); returns how many, and the
        context tokens (of recomputing requests) they read."""
        book, admitted = self.book, 0
        ids, new, ctx = step.ids, step.new_tokens, step.context
        context = 0
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            rid = self.waiting[0]
            c = book.computed[rid]
            remaining = book.prompt[rid] + book.generated[rid] - c
            q = remaining if remaining < budget else budget
            if not self._allocate(rid, q):
                break
            self.waiting.popleft()
            self.running.append(rid)
            ids.append(rid)
            new.append(q)
            ctx.append(c)
            budget -= q
            step.tokens += q
            step.pairs += q * c + q * (q + 1) // 2
            context += c
            step.outputs_left = min(step.outputs_left, book.output[rid] - book.generated[rid])
            admitted += 1
        return admitted, context

    def _prefill_step(self) -> Step | None:
        """vLLM V0: a step of whole prompts of waiting requests, if any can be admitted."""
        book = self.book
        ids: list[int] = []
        new: list[int] = []
        budget = self.budget
        tokens = pairs = 0
        while self.waiting and len(self.running) < self.max_seqs:
            rid = self.waiting[0]
            q = book.prompt[rid] + book.generated[rid] - book.computed[rid]
            if (q > budget and ids) or not self._allocate(rid, q):
                break
            self.waiting.popleft()
            self.running.append(rid)
            ids.append(rid)
            new.append(q)
            budget -= q
            tokens += q
            pairs += q * (q + 1) // 2
        if not ids:
            return None
        left = min(book.output[r] - book.generated[r] for r in ids)
        n = len(ids)
        return Step(ids, new, [0] * n, False, 0, n, 0, tokens, pairs, tokens, left)

    # ---- runs of decode steps --------------------------------------------------------------
    def run_length(self, step: Step, limit: int) -> int:
        """How many identical decode steps, ``step`` first, may run (1 unless decode-only)."""
        if not step.decode_only or limit <= 1:
            return 1
        k = min(limit, step.outputs_left)
        if k <= 1:
            return 1
        bs = self.block_size
        if len(step.ids) * -(-(k - 1) // bs) <= self.free_blocks:
            return k
        first = np.array(step.context, dtype=np.int64) + 1  # tokens after the first step
        held = -(-first // bs)

        def extra(steps: int) -> int:
            return int((-(-(first + steps - 1) // bs) - held).sum())

        lo, hi = 1, k  # extra(lo) == 0 <= free; find the largest k with extra(k) <= free
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if extra(mid) <= self.free_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def commit(self, step: Step, steps: int, end_ms: float) -> list[int]:
        """Apply ``steps`` steps of ``step`` (more than one only for a decode run), ending at
        ``end_ms``; returns the requests that finished."""
        book = self.book
        finished: list[int] = []
        if steps > 1:
            bs = self.block_size
            computed, generated, blocks, output = (
                book.computed,
                book.generated,
                book.blocks,
                book.output,
            )
            need = 0
            for rid in step.ids:
                c = computed[rid] + steps
                computed[rid] = c
                g = generated[rid] = generated[rid] + steps
                b = -(-c // bs)
                need += b - blocks[rid]
                blocks[rid] = b
                if g == output[rid]:
                    finished.append(rid)
            self.free_blocks -= need
        else:
            self._apply_tokens(step, end_ms, finished)
        self.peak_used = self.num_blocks - self.free_blocks
        if finished:
            self._retire(finished, end_ms)
            done = set(finished)
            self.running = [r for r in self.running if r not in done]
        return finished

    def _apply_tokens(
        self, step: Step, end_ms: float, finished: list[int], produced: list[int] | None = None
    ) -> None:
        """Apply one step's new tokens: a request whose context is then complete yields a
        token (its first stamps ``first_token_ms``); it goes to ``finished`` when that was
        its last, else to ``produced`` (when given)."""
        book = self.book
        computed, generated, prompt, output = (
            book.computed,
            book.generated,
            book.prompt,
            book.output,
        )
        for rid, q in zip(step.ids, step.new_tokens, strict=True):
            c = computed[rid] + q
            computed[rid] = c
            g = generated[rid]
            if c == prompt[rid] + g:
                g = generated[rid] = g + 1
                if g == 1:
                    book.first_token_ms[rid] = end_ms
                if g == output[rid]:
                    finished.append(rid)
                elif produced is not None:
                    produced.append(rid)

    def _retire(self, finished: list[int], end_ms: float) -> None:
        """Free the KV blocks of the finished requests and stamp their finish time."""
        book = self.book
        for rid in finished:
            self.free_blocks += book.blocks[rid]
            book.blocks[rid] = 0
            book.finish_ms[rid] = end_ms


class PrefillScheduler(ReplicaScheduler):
    """A replica of the prefill pool of a disaggregated deployment: as
    :class:`ReplicaScheduler`, except that a request leaves the replica when its prompt step
    yields the first token (a request of one output token finishes there). Its KV blocks stay
    held (``held_blocks``) until :meth:`release`, when its KV cache has reached the decode
    pool; :attr:`handoffs` lists the requests the last commit handed off."""

    def __init__(self, *args, downstream: ReplicaScheduler, **kwargs):
        super().__init__(*args, **kwargs)
        self.downstream = downstream  # a decode replica (all are alike): whether it fits
        self.handoffs: list[int] = []

    def fits(self, rid: int) -> bool:
        """Whether the prompt fits this cache and the whole request a decode replica's."""
        book = self.book
        return self._blocks_for(book.prompt[rid]) <= self.num_blocks and self.downstream.fits(rid)

    def commit(self, step: Step, steps: int, end_ms: float) -> list[int]:
        """Apply one step (a prefill pool never runs decode steps); returns the requests
        that finished, and leaves those handed off in :attr:`handoffs`."""
        book = self.book
        finished: list[int] = []
        handed: list[int] = []
        self._apply_tokens(step, end_ms, finished, handed)
        self.peak_used = self.num_blocks - self.free_blocks
        self._retire(finished, end_ms)
        for rid in handed:
            self.held_blocks += book.blocks[rid]
        if finished or handed:
            done = set(finished) | set(handed)
            self.running = [r for r in self.running if r not in done]
        self.handoffs = handed
        return finished

    def release(self, rid: int) -> None:
        """The KV cache of a handed-off request has been transferred: free its blocks."""
        book = self.book
        self.free_blocks += book.blocks[rid]
        self.held_blocks -= book.blocks[rid]
        book.blocks[rid] = 0
