"""Prefix cache: a radix tree over token ids whose nodes own KV pages, so shared prefixes are computed once.

Sequences under different LoRA adapters never share KV: each adapter registration has a tree of its own (a
root per `namespace`, 0 for the base model).

Each edge is one full page of tokens (the tree is page-aligned: a partly filled page is never shared), and
each node owns the page holding that chunk's KV. A node's page is only valid after its ancestors' pages, so
a sequence that uses a node also holds every ancestor: it matched (or computed) the whole prefix.

Pages are reference counted by the BlockManager; the tree holds its own claim (`blocks.cached`). A page no
sequence references stays in the tree, evictable: when the allocator runs short it calls `evict`, which
frees least-recently-used leaves first. A referenced page is never evicted, so it is never overwritten.

The evictable leaves (no children, no references) are kept as a set, updated as nodes are added and removed
and as the BlockManager reports pages going idle or back into use, with a heap ordering them by last access.
So `evict` costs O(log n) per page freed instead of a scan of the whole tree.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from nanokyro.block_manager import BlockManager


@dataclass(eq=False)
class Node:
    key: tuple[int, ...]  # the page's tokens
    page: int
    parent: Node | None
    depth: int = 0  # pages from the root, this one included
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    last_access: int = 0


class RadixCache:
    def __init__(self, blocks: BlockManager):
        self.blocks, self.page_size = blocks, blocks.page_size
        self.root = Node((), -1, None)
        self._roots = {0: self.root}  # namespace (LoRA adapter key; 0: none) -> its tree's root
        self._node_of: dict[int, Node] = {}  # page -> the node that owns it
        self._clock = itertools.count(1)
        # The heap is lazy: an entry is (last_access when pushed, tiebreak, node), and entries for nodes that
        # have since left the set, or were accessed again, are dropped or requeued when they surface.
        self._evictable: set[Node] = set()
        self._heap: list[tuple[int, int, Node]] = []
        self._tiebreak = itertools.count()
        blocks.evict, blocks.on_idle_change = self.evict, self._on_idle_change

    @property
    def num_nodes(self) -> int:
        return len(self._node_of)

    def _chunks(self, token_ids: list[int], start: int, num_pages: int):
        ps = self.page_size
        for i in range(start, num_pages):
            yield i, tuple(token_ids[i * ps : (i + 1) * ps])

    def match(self, token_ids: list[int], num_tokens: int, namespace: int = 0) -> tuple[list[int], Node]:
        """Pages of the longest cached prefix of the first num_tokens tokens in `namespace`'s tree, and the deepest
        node matched."""
        root = self._roots.get(namespace) or self._roots.setdefault(namespace, Node((), -1, None))
        node, pages, now = root, [], next(self._clock)
        for _, key in self._chunks(token_ids, 0, num_tokens // self.page_size):
            child = node.children.get(key)
            if child is None:
                break
            node = child
            node.last_access = now
            pages.append(node.page)
        return pages, node

    def insert(self, token_ids: list[int], num_tokens: int, pages: list[int], node: Node | None = None) -> Node:
        """Add the full pages among the first num_tokens of token_ids (KV in `pages`) below `node`, a node on
        this sequence's chain (its first node.depth pages are already in the tree).

        Where the tree already has a chunk under another page, the caller's duplicate is swapped for the
        tree's (pages is updated in place and the references moved), so every sequence uses one chain.
        Returns the deepest node, for the next call to continue from."""
        node, now = node or self.root, next(self._clock)
        for i, key in self._chunks(token_ids, node.depth, min(num_tokens // self.page_size, len(pages))):
            child = node.children.get(key)
            if child is None:  # the caller holds pages[i] and node's chain: neither is evictable, nothing to update
                child = node.children[key] = Node(key, pages[i], node, node.depth + 1)
                self._node_of[pages[i]] = child
                self.blocks.set_cached(pages[i], True)
            elif child.page != pages[i]:
                self.blocks.incref([child.page])
                self.blocks.release([pages[i]])
                pages[i] = child.page
            node = child
            node.last_access = now
        return node

    def evict(self, num_pages: int) -> int:
        """Free up to num_pages unreferenced pages, least recently used leaves first. Returns how many."""
        freed = 0
        while self._heap and freed < num_pages:
            stamp, _, node = heapq.heappop(self._heap)
            if node not in self._evictable:  # put in use, given a child or evicted since this entry was pushed
                continue
            if stamp != node.last_access:  # accessed since this entry was pushed: its turn comes later
                self._push(node)
                continue
            self._evictable.remove(node)
            del node.parent.children[node.key]
            del self._node_of[node.page]
            self.blocks.set_cached(node.page, False)
            freed += 1
            if node.parent.parent is None and not node.parent.children and node.parent is not self.root:
                self._roots = {k: r for k, r in self._roots.items() if r is not node.parent}  # an adapter's, emptied
            self._refresh(node.parent)  # with its last child gone, an idle parent is an evictable leaf
        return freed

    def _on_idle_change(self, page: int) -> None:
        self._refresh(self._node_of[page])

    def _refresh(self, node: Node) -> None:
        """Put `node` in or take it out of the evictable set, after its children or its page's count changed."""
        if node.parent is None:  # a root
            return
        if node.children or self.blocks.ref[node.page] > 0:
            self._evictable.discard(node)
        elif node not in self._evictable:
            self._evictable.add(node)
            self._push(node)

    def _push(self, node: Node) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node))
        # Stale entries pile up while nothing is evicted (pages going idle and busy again, without memory
        # pressure): rebuild once they outnumber the live ones, keeping the heap within twice the set, O(1) amortized.
        if len(self._heap) > 2 * len(self._evictable):
            self._heap = [(n.last_access, next(self._tiebreak), n) for n in self._evictable]
            heapq.heapify(self._heap)

    def _nodes(self):
        stack = [n for root in self._roots.values() for n in root.children.values()]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def clear(self) -> None:
        """Drop every unreferenced page."""
        self.evict(self.num_nodes)
