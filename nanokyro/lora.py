"""Multi-LoRA: PEFT adapters read and checked, their weights in fixed slots on every linear layer of the decoder,
which adapter sits in which slot (LRU), and the batched delta a layer adds for its tokens' adapters.

An adapter is a PEFT directory (adapter_config.json + adapter_model.safetensors) with LoRA on some of q/k/v/o/
gate/up/down. `read_adapter` checks it against the model and returns its A and B matrices, the scaling
(lora_alpha / r, or / sqrt(r) with rslora) folded into B.

On the device, each of a layer's four linear layers (qkv_proj, o_proj, gate_up_proj, down_proj) holds two
buffers of `max_loras` slots: `lora_a [S, n * R, in]` and `lora_b [S, out, n * R]`, with R = max_lora_rank and
n the layer's stacked slices (3 for qkv, 2 for gate/up, else 1). Slice i's adapter uses the rank block
[i * R, i * R + r) and only its own output rows, so one shrink and one expand apply all slices. The buffers
never move, so the CUDA graphs read whatever the slots hold. An adapter is staged on the host when it is read
(`AdapterSlots.stage`: the slot contents, through the layer's own weight loader, so they shard like the base
weight under TP: column-parallel B by output rows, row-parallel A by input columns, the partial deltas summed by
the layer's all-reduce); putting it in a slot is then a copy per buffer, beside the step in flight on CUDA.

A step's adapters reach the layers as an argument, like the attention plan: `lora [T]` int32, each token's slot,
-1 for the base model (`lora_delta`). On CUDA that is two Triton kernels (lora_kernels.py: a shrink that splits K,
an expand that adds its partial sums up), or, in the one- and two-row decode graphs, the shrink and the Triton
GEMV of the base layer adding the delta in its epilogue (small_batch.lora_linear); elsewhere a torch reference that
multiplies each adapter's tokens together.

`LoRARegistry` (the engine core's, rank 0) knows the registered adapters by name and which is resident in which
slot; the scheduler asks it for a slot before admitting a sequence, and a slot whose adapter no running sequence
uses is given to another, least recently used first. A load is carried to every rank in the step plan; the
other ranks hear of a registration in the plan after it and stage their shards on a thread of their own.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

# PEFT module name -> (nanokyro's linear layer, slice within it, the weight loader's shard id)
MODULES = {
    "q_proj": ("qkv_proj", 0, "q"), "k_proj": ("qkv_proj", 1, "k"), "v_proj": ("qkv_proj", 2, "v"),
    "o_proj": ("o_proj", 0, None), "gate_proj": ("gate_up_proj", 0, 0), "up_proj": ("gate_up_proj", 1, 1),
    "down_proj": ("down_proj", 0, None),
}  # fmt: skip
# nanokyro's linear layer -> (its parent module in a DecoderLayer, slices, row-parallel)
LAYERS = {"qkv_proj": ("self_attn", 3, False), "o_proj": ("self_attn", 1, True),
          "gate_up_proj": ("mlp", 2, False), "down_proj": ("mlp", 1, True)}  # fmt: skip
_KEY = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# Config fields whose non-default value changes what the adapter computes, in ways this engine does not.
_REFUSED = {
    "use_dora": "DoRA adapters are not supported",
    "lora_bias": "LoRA bias is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "trainable_token_indices": "trainable_token_indices (embedding updates) is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) is not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
}


class AdapterError(ValueError):
    """An adapter directory the engine cannot serve; the message names what is wrong. The server answers 400."""


@dataclass
class Adapter:
    """An adapter's weights on the host: (layer index, PEFT module name) -> (A [r, in], B [out, r] * scaling)."""

    path: str
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def _module_dims(cfg) -> dict[str, tuple[int, int]]:
    """PEFT module -> (in_features, out_features) of the whole (unsharded) projection."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module whose dotted name ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module_path):
            return value
    return default


def read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise AdapterError(f"adapter path {path!r} is not a directory")
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise AdapterError(f"adapter directory {path!r} has no adapter_config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter_config.json in {path!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter_config.json in {path!r} is not a JSON object")
    return config


def check_config(config: dict, max_rank: int) -> None:
    """Raise AdapterError naming the first field the engine cannot honour."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {config.get('peft_type')!r}: only LORA adapters are supported")
    for name, why in _REFUSED.items():
        if config.get(name):
            raise AdapterError(f"{name}: {why}")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"bias {config['bias']!r}: only bias 'none' is supported (LoRA adapters train no biases)")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    for t in targets:
        if any(s in t for s in ("embed_tokens", "lm_head", "wte")):
            raise AdapterError(f"target_modules: embedding / LM head adapters ({t!r}) are not supported")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"r must be a positive integer, got {r!r}")
    ranks = [r, *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise AdapterError(f"r: rank {max(ranks)} exceeds the engine's max_lora_rank ({max_rank})")


def read_adapter(path: str, cfg, max_rank: int) -> Adapter:
    """Read and check a PEFT LoRA directory against the model config `cfg`; raise AdapterError if it can't serve."""
    from safetensors import safe_open

    config = read_config(path)
    check_config(config, max_rank)
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        raise AdapterError(f"adapter directory {path!r} has no adapter_model.safetensors")
    try:
        with safe_open(weights_path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise AdapterError(f"adapter_model.safetensors in {path!r} can't be read: {e}") from None
    dims, pairs = _module_dims(cfg), {}
    for key, t in tensors.items():
        if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
            raise AdapterError(f"target_modules: embedding / LM head adapters are not supported (tensor {key})")
        m = _KEY.match(key)
        if m is None or m.group(2) not in MODULES:
            raise AdapterError(f"unexpected tensor {key!r} in adapter_model.safetensors (LoRA on q/k/v/o/gate/up/"
                               "down_proj only)")  # fmt: skip
        layer = int(m.group(1))
        if layer >= cfg.num_layers:
            raise AdapterError(f"tensor {key!r}: the model has {cfg.num_layers} layers")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = t
    if not pairs:
        raise AdapterError(f"adapter_model.safetensors in {path!r} holds no LoRA weights")
    weights, rank = {}, 0
    for (layer, module), ab in sorted(pairs.items()):
        name = f"model.layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name}: lora_A and lora_B must both be present")
        a, b = ab["A"].float(), ab["B"].float()
        fan_in, fan_out = dims[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise AdapterError(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the model's "
                               f"{fan_in} -> {fan_out} projection")  # fmt: skip
        if r > max_rank:
            raise AdapterError(f"r: {name} has rank {r}, over the engine's max_lora_rank ({max_rank})")
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        weights[(layer, module)] = (a, b * scaling)
        rank = max(rank, r)
    return Adapter(path, rank, weights)


# -- the slots on the device -----------------------------------------------------------------------------------


def lora_layers(model):
    """(layer index within this stage, global layer index, name, linear module) for every adapted linear layer."""
    first = model.layer_range.start
    for i, block in enumerate(model.layers):
        for name, (parent, _, _) in LAYERS.items():
            yield i, first + i, name, getattr(getattr(block, parent), name)


@dataclass
class StagedAdapter:
    """An adapter as one rank's slot contents, ready to copy in: for each adapted linear layer (`lora_layers`'
    order), A [n * R, in] and B [out, n * R] of this rank's shard, in the slots' dtype, zeros where the adapter
    leaves a module out. Views of one host buffer, pinned when the slots are on CUDA."""

    path: str
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class AdapterSlots:
    """One rank's adapter buffers: `max_loras` slots on every adapted linear layer of its shard.

    An adapter is staged on the host when it is read (`stage`, off the step), and a load is then two copies per
    layer. On CUDA they run on a stream of their own, beside the step in flight, and only the step that loads
    waits for them: a load costs the steps around it the copy time that outlasts the step before, not the
    padding, casting and pageable copies of ~100 MB on the host."""

    def __init__(self, model, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.model, self.max_loras, self.max_rank, self.dtype, self.device = model, max_loras, max_rank, dtype, device
        self.buffers = []  # (lora_a, lora_b) of each adapted linear layer, in lora_layers' order
        for _, _, name, linear in lora_layers(model):
            n = LAYERS[name][1]
            # This rank's shape, not the weight's: a quantised layer's weight is packed (quant.py).
            out_features, in_features = linear.out_features, linear.in_features
            zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
            linear.register_buffer("lora_a", zeros(max_loras, n * max_rank, in_features), persistent=False)
            linear.register_buffer("lora_b", zeros(max_loras, out_features, n * max_rank), persistent=False)
            self.buffers.append((linear.lora_a, linear.lora_b))
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None  # the loads' copies
        self._last_use: dict[int, torch.cuda.Event] = {}  # slot -> recorded after the last step that read it
        self._prev_used: list[int] = []  # the slots the step before this one read
        self._copying: list[tuple[torch.cuda.Event, StagedAdapter]] = []  # loads whose copies may still run

    @torch.inference_mode()
    def stage(self, adapter: Adapter) -> StagedAdapter:
        """The adapter's slot contents for this rank, on the host: what `load` copies. Thread-safe (it only reads
        the layers' shapes and sharding), so the thread that reads the adapter stages it too."""
        R, pin = self.max_rank, self.device.type == "cuda"
        total = sum(a.numel() // a.shape[0] + b.numel() // b.shape[0] for a, b in self.buffers)
        # Pinned memory through the caching host allocator, from this thread: on this rank's device's context.
        with torch.cuda.device(self.device) if pin else contextlib.nullcontext():
            flat = torch.zeros(total, dtype=self.dtype, pin_memory=pin)
        layers, offset = [], 0
        for (_, layer_idx, name, linear), (a_buf, b_buf) in zip(lora_layers(self.model), self.buffers):
            views = []
            for shape in (a_buf.shape[1:], b_buf.shape[1:]):
                views.append(flat[offset : offset + shape.numel()].view(shape))
                offset += shape.numel()
            a_slot, b_slot = views
            layers.append((a_slot, b_slot))
            row_parallel = LAYERS[name][2]
            for module, (target, i, shard_id) in MODULES.items():
                if target != name or (layer_idx, module) not in adapter.weights:
                    continue
                a, b = adapter.weights[(layer_idx, module)]
                r = a.shape[0]
                # The layer's own weight loader shards like the base weight (and casts): column-parallel B by
                # output rows, row-parallel A by input columns.
                if row_parallel:  # A by input columns, as the weight; B whole
                    linear.weight_loader(a_slot[:r], a)
                    b_slot[:, :r].copy_(b)
                else:  # A whole, in its slice's rank block; B's output rows as the weight's, in that block's columns
                    a_slot[i * R : i * R + r].copy_(a)
                    linear.weight_loader(b_slot[:, i * R : i * R + r], b, shard_id)
        return StagedAdapter(adapter.path, layers)

    @torch.inference_mode()
    def before_step(self, loads: list[tuple[int, StagedAdapter]], used: list[int]) -> None:
        """Put each staged adapter in its slot before the step that reads it; `used`: the slots this step reads
        (needed on CUDA only).

        Every step before this one is already queued. A slot that is loaded is not used by a running sequence
        (LoRARegistry.acquire gives up only such a slot), but the step in flight may still read it: for a
        sequence aborted, or finished by the token that step's predecessor sampled, since it was launched (its
        output is dropped, yet its KV, written with those weights, may go to the prefix cache). So a load's
        copies wait for the last step that read the slot (an event per step, usually long done), not for the
        whole stream."""
        if self.stream is not None and self._prev_used:
            done = torch.cuda.Event()
            done.record()
            for slot in self._prev_used:
                self._last_use[slot] = done
        for slot, staged in loads:
            self.load(slot, staged)
        self._prev_used = used

    def load(self, slot: int, staged: StagedAdapter) -> None:
        """Copy a staged adapter into `slot` (on CUDA: queued on the side stream; the current stream, whose next
        work is the step that reads the slot, waits for it)."""
        if self.stream is None:
            for (a_buf, b_buf), (a, b) in zip(self.buffers, staged.layers):
                a_buf[slot].copy_(a)
                b_buf[slot].copy_(b)
            return
        last = self._last_use.pop(slot, None)
        if last is not None:
            self.stream.wait_event(last)
        with torch.cuda.stream(self.stream):
            for (a_buf, b_buf), (a, b) in zip(self.buffers, staged.layers):
                a_buf[slot].copy_(a, non_blocking=True)
                b_buf[slot].copy_(b, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(copied)
        # The staged host memory must outlive the copies, even if the adapter is unregistered meanwhile (the
        # caching host allocator also holds a pinned block until the copies that read it are done).
        self._copying = [(e, s) for e, s in self._copying if not e.query()] + [(copied, staged)]


# -- the batched delta ------------------------------------------------------------------------------------------


def lora_delta(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, lora: torch.Tensor
               ) -> torch.Tensor:  # fmt: skip
    """y [T, N] + each token's adapter applied to x [T, K]: (x @ A[s].T) @ B[s].T for s = lora[t] >= 0."""
    if x.is_cuda:
        return torch.ops.nanokyro.lora_expand(y, torch.ops.nanokyro.lora_shrink(x, lora_a, lora), lora_b, lora)
    return lora_delta_reference(y, x, lora_a, lora_b, lora)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """The first half of lora_delta on CUDA: the partial sums of x @ A[lora[t]].T (lora_kernels.lora_shrink), for
    a kernel that adds the delta itself (small_batch.lora_linear)."""
    return torch.ops.nanokyro.lora_shrink(x, lora_a, lora)


def lora_delta_reference(y, x, lora_a, lora_b, lora):
    """The torch reference: the tokens of each adapter in the batch multiplied together (segment-grouped)."""
    out = y.clone()
    for s in lora.unique().tolist():
        if s < 0:
            continue
        rows = (lora == s).nonzero().squeeze(1)
        xs = x.index_select(0, rows)
        out.index_add_(0, rows, ((xs @ lora_a[s].T) @ lora_b[s].T).to(out.dtype))
    return out


if torch.cuda.is_available():  # registers the custom ops the CUDA path calls
    from nanokyro import lora_kernels  # noqa: F401


# -- which adapter is where (the engine core, rank 0) -------------------------------------------------------------


@dataclass(eq=False)
class LoRAEntry:
    """A registered adapter. `key` is unique per registration: the prefix cache's namespace for its KV."""

    name: str
    path: str
    key: int
    slot: int = -1  # its slot on the device, -1 while not resident
    num_requests: int = 0  # unfinished sequences that use it


@dataclass
class LoRARegistry:
    max_loras: int
    max_rank: int
    model_cfg: object
    stage: object  # AdapterSlots.stage of rank 0: `read` stages what it reads for the device
    entries: dict[str, LoRAEntry] = field(default_factory=dict)
    host: dict[str, StagedAdapter] = field(default_factory=dict)  # path -> weights read at registration
    num_loads: int = 0  # adapters put into a slot, since start
    _slots: OrderedDict = field(default_factory=OrderedDict)  # slot -> entry, least recently used first
    _pending: list[tuple[int, str]] = field(default_factory=list)  # (slot, path) to load before the next step
    _keys: itertools.count = field(default_factory=lambda: itertools.count(1))

    def check_name(self, name: str) -> None:
        if not name or ":" in name:
            raise AdapterError(f"lora_name {name!r}: a non-empty name without ':'")
        if name in self.entries:
            raise AdapterError(f"lora_name {name!r}: an adapter of that name is already loaded")

    def read(self, path: str) -> StagedAdapter:
        """Read and check an adapter directory (AdapterError if it can't be served) and stage it for the device;
        no state changes, so it runs on a thread while the steps go on."""
        adapter = read_adapter(os.path.abspath(path), self.model_cfg, self.max_rank)
        return self.stage(adapter)

    def register(self, name: str, path: str, adapter: StagedAdapter | None = None) -> LoRAEntry:
        """Add the adapter at `path` under `name` (read now unless given, as `read` returned it)."""
        self.check_name(name)
        adapter = adapter or self.read(path)
        path = adapter.path
        self.host[path] = adapter
        entry = self.entries[name] = LoRAEntry(name, path, next(self._keys))
        return entry

    def unregister(self, name: str) -> None:
        """Forget an adapter no unfinished request uses (the caller checks); its slot is free for another."""
        entry = self.entries.pop(name)
        if entry.slot >= 0:
            del self._slots[entry.slot]
            self._pending = [(s, p) for s, p in self._pending if s != entry.slot]
        if all(e.path != entry.path for e in self.entries.values()):
            self.host.pop(entry.path, None)

    def acquire(self, entry: LoRAEntry, busy: set) -> bool:
        """Make `entry` resident for a sequence about to run: it is, or takes a free slot, or the least recently
        used slot whose adapter is not in `busy` (the running sequences' entries). False if every slot is busy."""
        if entry.slot >= 0:
            self._slots.move_to_end(entry.slot)
            return True
        free = next((s for s in range(self.max_loras) if s not in self._slots), None)
        if free is None:
            free = next((s for s, e in self._slots.items() if e not in busy), None)
            if free is None:
                return False
            self._slots.pop(free).slot = -1
        entry.slot = free
        self._slots[free] = entry
        self._pending = [(s, p) for s, p in self._pending if s != free] + [(free, entry.path)]
        self.num_loads += 1
        return True

    def take_loads(self) -> list[tuple[int, str]]:
        """The slot loads the next step must do first, on every rank."""
        loads, self._pending = self._pending, []
        return loads

    def forget_slots(self) -> None:
        """After a step that failed: its loads may not have run, so no slot's contents are known. Every adapter
        is loaded again when next used (no sequence runs: the engine failed them all)."""
        for entry in self._slots.values():
            entry.slot = -1
        self._slots.clear()
        self._pending = []

    @property
    def num_resident(self) -> int:
        return len(self._slots)
