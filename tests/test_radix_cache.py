"""Prefix cache: reuse across requests and turns, eviction under memory pressure, tree invariants."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_no_leak
from nanokyro import LLM, SamplingParams
from nanokyro.block_manager import BlockManager, OutOfPages
from nanokyro.config import ModelConfig
from nanokyro.radix_cache import RadixCache
from nanokyro.runner import kv_bytes_per_page

PS = 16


def make_llm(path, **kw):
    opts = dict(dtype="float32", max_num_batched_tokens=512, max_num_seqs=8, kv_cache_memory=16 << 20, page_size=PS)
    return LLM(path, **{**opts, **kw})


def shared_prefix_prompts(n=6, prefix_len=200, seed=0):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 384) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, 384) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def test_shared_prefix_is_computed_once_and_outputs_unchanged(llama_dir):
    prompts = shared_prefix_prompts()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    cold = make_llm(llama_dir, enable_prefix_caching=False).generate(prompts, params)
    llm = make_llm(llama_dir)
    warm = llm.generate(prompts, params)  # all at once: the later ones wait a step for the first's pages
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
    assert warm[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= 200 - PS for o in warm[1:])
    engine = llm.engine
    assert engine.stats().prefix_cache_hit_tokens == sum(o.num_cached_tokens for o in warm)
    assert engine.stats().prefix_cache_queried_tokens == sum(map(len, prompts))
    assert_no_leak(llm)


def test_second_turn_hits_the_whole_first_turn(llama_dir):
    llm = make_llm(llama_dir)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    turn1 = shared_prefix_prompts(1, prefix_len=57, seed=3)[0]
    answer = llm.generate(turn1, params)[0]
    turn2 = turn1 + answer.token_ids + [7, 8, 9, 10]
    out = llm.generate(turn2, params)[0]
    history = len(turn1) + len(answer.token_ids)
    # Everything the first turn computed (all but its last sampled token), down to whole pages.
    assert out.num_cached_tokens == (history - 1) // PS * PS
    cold = make_llm(llama_dir, enable_prefix_caching=False).generate(turn2, params)[0]
    assert out.token_ids == cold.token_ids
    assert_no_leak(llm)


def test_fully_cached_prompt_still_gets_its_first_token(llama_dir):
    llm = make_llm(llama_dir)
    prompt = shared_prefix_prompts(1, prefix_len=64, seed=5)[0][:64]  # exactly 4 pages
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    first = llm.generate(prompt, params)[0]
    again = llm.generate(prompt, params)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens == 48  # the last page is recomputed for the last token's logits
    assert_no_leak(llm)


def test_memory_pressure_evicts_without_corrupting(llama_dir):
    """KV for about three sequences, many distinct prefixes: the cache evicts, outputs stay exact."""
    pages = 40
    kv = pages * kv_bytes_per_page(ModelConfig.from_dir(llama_dir), PS, torch.float32)
    prompts = [p for seed in range(4) for p in shared_prefix_prompts(3, prefix_len=100, seed=seed)]
    random.Random(0).shuffle(prompts)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    cold = make_llm(llama_dir, enable_prefix_caching=False).generate(prompts, params)
    llm = make_llm(llama_dir, kv_cache_memory=kv)
    warm = llm.generate(prompts, params)
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
    assert llm.engine.stats().prefix_cache_hit_tokens > 0
    blocks = llm.engine.blocks
    assert blocks.num_pages == pages and sum(blocks.cached) <= pages
    assert llm.engine.cache.num_nodes == sum(blocks.cached)
    assert_no_leak(llm)  # every page is free or idle in the cache, all reference counts zero


def test_cache_can_be_turned_off(llama_dir):
    llm = make_llm(llama_dir, enable_prefix_caching=False)
    prompts = shared_prefix_prompts(3)
    outs = llm.generate(prompts, SamplingParams(max_tokens=2))
    assert llm.engine.cache is None and all(o.num_cached_tokens == 0 for o in outs)
    assert_no_leak(llm)


# -- tree invariants under random operations -----------------------------------------------------------------


def check_invariants(blocks: BlockManager, cache: RadixCache) -> None:
    nodes = list(cache._nodes())
    assert len(nodes) == cache.num_nodes
    tree_pages = [n.page for n in nodes]
    assert len(set(tree_pages)) == len(tree_pages), "a page owned by two nodes"
    assert sorted(tree_pages) == [p for p in range(blocks.num_pages) if blocks.cached[p]]
    assert all(r >= 0 for r in blocks.ref)
    free = set(blocks.free)
    assert len(free) == len(blocks.free), "a page twice on the free list"
    for p in range(blocks.num_pages):  # exact accounting: each page is in exactly one state
        states = (p in free) + (blocks.ref[p] > 0 or blocks.cached[p])
        assert states == 1, f"page {p}: free={p in free} ref={blocks.ref[p]} cached={blocks.cached[p]}"
    assert blocks.num_used == sum(r > 0 for r in blocks.ref)
    assert cache._node_of == {n.page: n for n in nodes}
    for n in nodes:  # a node in use implies its whole prefix is in use
        assert n.depth == n.parent.depth + 1
        if blocks.ref[n.page] > 0 and n.parent is not cache.root:
            assert blocks.ref[n.parent.page] > 0, "a locked node with an unlocked ancestor"
    # The incrementally kept evictable set is exactly what a scan finds, and each member is queued in the heap.
    assert cache._evictable == idle_leaves(blocks, cache), "evictable set out of step with the tree"
    assert cache._evictable <= {n for _, _, n in cache._heap}, "an evictable leaf missing from the heap"


def idle_leaves(blocks: BlockManager, cache: RadixCache) -> set:
    return {n for n in cache._nodes() if not n.children and blocks.ref[n.page] == 0}


def assert_nothing_left_to_evict(blocks: BlockManager, cache: RadixCache) -> None:
    """After OutOfPages: the allocator only fails once every page the cache holds is in use."""
    assert all(blocks.ref[n.page] > 0 for n in cache._nodes()), "allocation failed with idle pages in the cache"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["start", "grow", "finish", "evict"]), st.integers(0, 10**6)), max_size=60))
def test_random_operations_keep_tree_invariants(ops):
    ps, blocks = 4, BlockManager(24, 4)
    cache = RadixCache(blocks)
    live = []  # (token_ids, pages, node, num_computed): sequences holding pages, as the scheduler keeps them
    for op, r in ops:
        rng = random.Random(r)
        if op == "start":  # admit: match a prompt over a small alphabet so prefixes collide, then allocate
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
            pages, node = cache.match(tokens, len(tokens) - 1)
            blocks.incref(pages)
            try:
                pages = pages + blocks.allocate(blocks.pages_for(len(tokens)) - len(pages))
            except OutOfPages:
                assert_nothing_left_to_evict(blocks, cache)
                blocks.release(pages)
                continue
            node = cache.insert(tokens, len(tokens), pages, node)
            live.append((tokens, pages, node))
        elif op == "grow" and live:  # decode a few tokens, inserting pages as they fill
            i = rng.randrange(len(live))
            tokens, pages, node = live[i]
            tokens = tokens + [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
            try:
                pages += blocks.allocate(blocks.pages_for(len(tokens)) - len(pages))
            except OutOfPages:
                assert_nothing_left_to_evict(blocks, cache)
                continue
            live[i] = (tokens, pages, cache.insert(tokens, len(tokens), pages, node))
        elif op == "finish" and live:
            _, pages, _ = live.pop(rng.randrange(len(live)))
            blocks.release(pages)
        elif op == "evict":  # a page at a time, so each pick can be checked against a scan (allocate evicts in bulk)
            for _ in range(rng.randrange(1, 6)):
                idle, before = idle_leaves(blocks, cache), set(cache._nodes())
                assert cache.evict(1) == min(1, len(idle))
                if idle:
                    (gone,) = before - set(cache._nodes())
                    assert gone in idle and gone.last_access == min(n.last_access for n in idle), "not LRU"
        check_invariants(blocks, cache)
        for tokens, pages, _ in live:  # a page in use is never evicted: each sequence's chain is intact
            full = len(tokens) // ps
            assert cache.match(tokens, len(tokens))[0] == pages[:full]
    for _, pages, _ in live:
        blocks.release(pages)
    cache.clear()
    check_invariants(blocks, cache)
    assert blocks.num_free == blocks.num_pages


def test_a_reused_prefix_moves_to_the_back_of_the_eviction_order():
    """A leaf's heap entry from an earlier idle spell is stale once the leaf is reused: it must not evict early."""
    blocks = BlockManager(8, 4)
    cache = RadixCache(blocks)
    a, b = [0] * 4, [1] * 4
    for tokens in (a, b):  # a then b are computed and finish: a is the least recently used
        pages = blocks.allocate(1)
        cache.insert(tokens, 4, pages)
        blocks.release(pages)
    pages, _ = cache.match(a, 4)  # a is reused, and finishes again: now b is the least recently used
    blocks.incref(pages)
    blocks.release(pages)
    check_invariants(blocks, cache)
    assert cache.evict(1) == 1
    assert cache.match(a, 4)[0] == pages and cache.match(b, 4)[0] == []

def test_invariant_check_catches_a_cache_that_misses_pages_going_idle():
    """Planted bug: the BlockManager's hook is cut, so the cache never learns its pages went idle."""
    blocks = BlockManager(8, 4)
    cache = RadixCache(blocks)
    pages = blocks.allocate(2)
    cache.insert(list(range(8)), 8, pages)
    check_invariants(blocks, cache)
    blocks.on_idle_change = lambda page: None
    blocks.release(pages)
    with pytest.raises(AssertionError, match="evictable set out of step"):
        check_invariants(blocks, cache)
    assert cache.evict(2) == 0  # and so it cannot give the pages back


def test_idle_busy_churn_without_eviction_keeps_the_heap_small():
    """A cached prefix reused over and over, never under memory pressure: stale heap entries are dropped."""
    blocks = BlockManager(8, 4)
    cache = RadixCache(blocks)
    tokens, pages = list(range(8)), blocks.allocate(2)
    cache.insert(tokens, 8, pages)
    blocks.release(pages)  # the first sequence finishes
    for _ in range(1000):  # each turn: match and hold the prefix, then finish
        pages, _ = cache.match(tokens, 8)
        blocks.incref(pages)
        blocks.release(pages)
    check_invariants(blocks, cache)
    assert len(cache._evictable) == 1 and len(cache._heap) <= 2
    assert cache.evict(8) == 2 and blocks.num_free == 8
