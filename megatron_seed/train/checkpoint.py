"""Reshardable, crash-safe checkpoints: every rank writes its slices of global tensors.

Layout::

    save_dir/
      latest                           text: "iter_0000100"   (replaced atomically, last)
      iter_0000100/
        manifest.json                  global shape, dtype and chunks of every tensor; file sizes;
                                       step, layout, config, JSON state, each rank's ``extra``
        config.yaml                    the run's config, for people
        rank_00000_000.safetensors ... the chunks this rank wrote

Every entry is a slice of a *global* (one-process) tensor, a :class:`Piece`: the key
(``model/layers.3.mlp.experts.w_down``), its global shape and the slice's offsets. Model
parameters are placed by their sharding records (:func:`megatron_seed.parallel.sharding.
set_sharding`: the dims split over tp / ep / etp); pipeline stages need nothing more, as
layers are named by their global index. ZeRO-1 optimizer state (fp32 master, both Adam
moments) is a contiguous range of a flat buffer of this rank's parameter shards; each
parameter's part of the range is cut into the few boxes a flat range covers
(:func:`flat_range_boxes`) and offset by the parameter's own placement. Replicas (dp
copies, tp-replicated norms and routers) are written once: the ranks exchange their
lists of slices and each slice goes to the holder that has written least so far.

Loading under any other (tp, pp, vpp, ep, etp, dp) computes the slices the new layout
holds and reads, from each stored chunk that overlaps one, only the overlap
(``safetensors`` slicing of a memory map), so no rank reads the whole model.

Why not ``torch.distributed.checkpoint`` (DCP), whose planning and chunk metadata this
follows: its file-system reader ``pickle.load``s the ``.metadata`` file and loads
non-tensor entries with ``torch.load(weights_only=False)``, which runs code from a file
a user may have downloaded; its safetensors storage keeps one chunk per name per file and
infers global shapes from the chunks, so a missing shard would go unnoticed. Here the
manifest is JSON, tensors are safetensors, and a load checks that every file has the
size the manifest records and that the chunks cover every tensor.

Crash safety: ranks write into ``iter_XXXXXXX.tmp``; after all have finished, rank 0
writes the manifest, renames the directory and then replaces ``latest``, so a crash at
any point leaves ``latest`` at the previous complete checkpoint. An asynchronous save
(:class:`PendingSave`) copies the tensors, writes them from a background thread while
training goes on, and is published by :meth:`PendingSave.finish` (collective).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import yaml

from megatron_seed.parallel.sharding import get_sharding, shard_index
from megatron_seed.parallel.state import ParallelState

FORMAT = "megatron-seed-checkpoint/1"
MANIFEST = "manifest.json"
DEFAULT_MAX_FILE_BYTES = 4 * 2**30


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or of another model."""


@dataclass
class Piece:
    """``tensor`` is the slice ``[offsets, offsets + tensor.shape)`` of the global tensor ``key``
    of shape ``global_shape``; saving reads it, loading writes into it in place."""

    key: str
    tensor: torch.Tensor
    offsets: tuple
    global_shape: tuple

    @property
    def sizes(self) -> tuple:
        return tuple(self.tensor.shape)


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (collective; ``[obj]`` without torch.distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _world() -> tuple:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------- placement


def flat_range_boxes(shape: tuple, start: int, end: int) -> list:
    """The row-major range ``[start, end)`` of a tensor of ``shape`` as boxes ``(offsets, sizes, flat_start)``.

    Each box is itself contiguous in row-major order (``flat_start`` is where it begins), and
    the boxes tile the range in order; at most ``2 * ndim - 1`` of them.
    """
    if start >= end:
        return []
    if not shape:
        return [((), (), start)]
    inner = math.prod(shape[1:])
    lo = -(-start // inner) * inner  # first row boundary at or after start
    hi = end // inner * inner  # last row boundary at or before end

    def in_row(a: int, b: int) -> list:  # [a, b) inside one row
        row = a // inner
        return [((row, *o), (1, *s), row * inner + f) for o, s, f in flat_range_boxes(shape[1:], a - row * inner, b - row * inner)]

    if lo > hi:
        return in_row(start, end)
    boxes = in_row(start, lo) if start < lo else []
    if lo < hi:
        boxes.append(((lo // inner,) + (0,) * (len(shape) - 1), ((hi - lo) // inner, *shape[1:]), lo))
    return boxes + (in_row(hi, end) if hi < end else [])


def global_offsets(param: torch.Tensor, ps: ParallelState) -> tuple:
    """Where this rank's shard of ``param`` starts in the full tensor (its sharding record)."""
    sharding = get_sharding(param)
    offsets = [0] * len(sharding.full_shape)
    for d in sharding.dims:
        offsets[d.dim] = shard_index(ps, d) * (sharding.full_shape[d.dim] // d.shards)
    return tuple(offsets)


def model_pieces(chunks: list, ps: ParallelState) -> list:
    """``model/<name>`` for every parameter and persistent buffer of this rank's chunks."""
    pieces = []
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        for name, value in chunk.state_dict(keep_vars=True).items():
            if name in params:
                p = params[name]
                pieces.append(Piece(f"model/{name}", p.data, global_offsets(p, ps), get_sharding(p).full_shape))
            else:  # buffers (e.g. the router's expert bias) are replicated
                pieces.append(Piece(f"model/{name}", value.data, (0,) * value.dim(), tuple(value.shape)))
    return pieces


def optimizer_pieces(optimizer: Any, chunks: list, ps: ParallelState) -> list:
    """``optim/{master,exp_avg,exp_avg_sq}/<name>``: this rank's ZeRO-1 ranges as boxes of global tensors.

    ``optimizer`` is a :class:`~megatron_seed.train.optimizer.DistributedOptimizer`; the
    pieces are views of its state, so loading them restores it in place.
    """
    names = {id(p): name for chunk in chunks for name, p in chunk.named_parameters()}
    pieces = []
    for b in optimizer.buckets:
        offset = 0
        for p in b.params:
            lo, hi = max(b.start, offset), min(b.end, offset + p.numel())
            origin = global_offsets(p, ps)
            full = get_sharding(p).full_shape
            for box_offsets, sizes, flat_start in flat_range_boxes(tuple(p.shape), lo - offset, hi - offset):
                at = offset + flat_start - b.start
                n = math.prod(sizes)
                place = tuple(o + g for o, g in zip(box_offsets, origin))
                for state, flat in (("master", b.master), ("exp_avg", b.exp_avg), ("exp_avg_sq", b.exp_avg_sq)):
                    pieces.append(Piece(f"optim/{state}/{names[id(p)]}", flat[at:at + n].view(sizes), place, full))
            offset += p.numel()
    return pieces


def rng_pieces(rank: int) -> list:
    """This rank's torch RNG states (CPU, and CUDA when present) as ``rng/<device>/rank_<r>``."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return [Piece(f"rng/{device}/rank_{rank:05d}", s, (0,), tuple(s.shape)) for device, s in states.items()]


# ----------------------------------------------------------------------------- extra (JSON + tensors)


def _split_extra(value: Any, prefix: str, tensors: dict, path: str = "") -> Any:
    """JSON skeleton of ``value`` with tensors replaced by ``{"__tensor__": key}``."""
    if isinstance(value, torch.Tensor):
        key = f"{prefix}/{path or 'value'}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"checkpoint extra {path or '<root>'}: dict keys must be strings, got {list(value)[:3]}")
        return {k: _split_extra(v, prefix, tensors, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_extra(v, prefix, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint extra {path or '<root>'}: {type(value).__name__} is not JSON or a tensor; "
                    "fix: store a state dict of numbers, strings, lists, dicts and tensors")


def _join_extra(value: Any, tensors: dict) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join_extra(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_extra(v, tensors) for v in value]
    return value


# ----------------------------------------------------------------------------- saving


def _assign_writers(plans: list) -> dict:
    """``{(key, offsets): rank}``: each distinct slice once, to the holder with the fewest bytes so far."""
    holders: dict = {}
    for rank, plan in enumerate(plans):
        for entry in plan:
            holders.setdefault(entry[:2], (entry[3], []))[1].append(rank)
    written = [0] * len(plans)
    owner = {}
    for index in sorted(holders):
        nbytes, ranks = holders[index]
        rank = min(ranks, key=lambda r: (written[r], r))
        written[rank] += nbytes
        owner[index] = rank
    return owner


def _file_plan(rank: int, entries: list, max_file_bytes: int) -> list:
    """``[(file name, entries)]``: this rank's plan entries in files of at most ``max_file_bytes``
    (at least one tensor each). Every rank computes the same split for every rank."""
    files, current, size = [], [], 0
    for entry in entries:
        if current and size + entry[3] > max_file_bytes:
            files.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[3]
    if current:
        files.append(current)
    return [(f"rank_{rank:05d}_{i:03d}.safetensors", group) for i, group in enumerate(files)]


def _chunk_name(key: str, offsets: tuple) -> str:
    """The name of a chunk inside its safetensors file."""
    return f"{key}@{','.join(map(str, offsets))}"


class PendingSave:
    """A checkpoint being written; :meth:`finish` (collective) waits for the files and publishes it."""

    def __init__(self, save_dir: str, step: int, files: list, chunks: dict, state: dict, rank_extra: dict,
                 async_save: bool):
        self.save_dir, self.step = save_dir, step
        self.path = os.path.join(save_dir, _iter_name(step))
        self.tmp = self.path + ".tmp"
        self._files, self._chunks, self._state, self._rank_extra = files, chunks, state, rank_extra
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._write, daemon=True) if async_save else None
        if self._thread is not None:
            self._thread.start()
        else:  # a failure is reported by finish(), on every rank together
            self._write()

    def _write(self) -> None:
        from safetensors.torch import save_file

        try:
            for file_name, group in self._files:
                save_file(dict(group), os.path.join(self.tmp, file_name))
        except BaseException as e:  # reported by finish() on the calling thread
            self._error = e

    def finish(self) -> str:
        """Collective: wait for every rank's files, then rank 0 writes the manifest, renames, updates ``latest``."""
        if self._thread is not None:
            self._thread.join()
        error = f"{type(self._error).__name__}: {self._error}" if self._error is not None else None
        sizes = {} if error else {name: os.path.getsize(os.path.join(self.tmp, name)) for name, _ in self._files}
        reports = _gather_objects((error, sizes, self._rank_extra))  # objects, not tensors: any backend's device
        failed = [(r, err) for r, (err, _, _) in enumerate(reports) if err]
        if failed:
            raise CheckpointError(f"saving {self.path} failed on rank(s) {[r for r, _ in failed]} ({failed[0][1]}); "
                                  f"{self.save_dir}/latest still names the previous checkpoint") from self._error
        rank, _ = _world()
        if rank == 0:
            files, extra = {}, {}
            for _, file_sizes, rank_extra in reports:
                files.update(file_sizes)
                extra.update(rank_extra)
            _write_manifest(self.tmp, self.step, self._state, files, self._chunks, extra)
            _publish(self.save_dir, self.tmp, self.path, self.step)
        _barrier()
        return self.path


def _write_manifest(directory: str, step: int, state: dict, files: dict, tensors: dict, extra: dict) -> None:
    """``manifest.json`` (what a load checks and reads) and ``config.yaml`` (for people) of a checkpoint."""
    manifest = {"format": FORMAT, "step": step, **state, "files": dict(sorted(files.items())), "tensors": tensors, "extra": extra}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename publishes it
    if "config" in state.get("meta", {}):
        with open(os.path.join(directory, "config.yaml"), "w") as f:
            yaml.safe_dump(state["meta"]["config"], f, sort_keys=False)


def _publish(save_dir: str, tmp: str, final: str, step: int) -> None:
    """Rename ``tmp`` to ``final`` and point ``latest`` at it (the last write)."""
    if os.path.exists(final):  # the same step saved again (e.g. a resumed run that trained no step)
        stale = final + ".old"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    pointer = os.path.join(save_dir, "latest.tmp")
    with open(pointer, "w") as f:
        f.write(_iter_name(step))
    os.replace(pointer, os.path.join(save_dir, "latest"))


def save_checkpoint(
    save_dir: str,
    step: int,
    pieces: list,
    state: dict,
    extra: Optional[dict] = None,
    async_save: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> PendingSave:
    """Collective: write ``pieces`` (slices of global tensors) under ``save_dir/iter_<step>``.

    ``state`` (JSON: step, meta with layout and config, ...) goes into the manifest;
    ``extra`` (this rank's JSON-and-tensor state, e.g. RL sampler state) is stored per rank.
    Returns the :class:`PendingSave`; without ``async_save`` its files are written, and the
    caller publishes it with :meth:`PendingSave.finish` (collective).
    """
    rank, _ = _world()
    extra_tensors: dict = {}
    rank_extra = {f"rank_{rank:05d}": _split_extra(extra or {}, f"extra/rank_{rank:05d}", extra_tensors)}
    pieces = list(pieces) + [Piece(k, t, (0,) * t.dim(), tuple(t.shape)) for k, t in extra_tensors.items()]
    by_index = {}
    for p in pieces:
        by_index.setdefault((p.key, tuple(p.offsets)), p)
    plan = [(p.key, tuple(p.offsets), p.sizes, p.tensor.numel() * p.tensor.element_size(), tuple(p.global_shape),
             str(p.tensor.dtype).removeprefix("torch.")) for p in by_index.values()]
    plans = _gather_objects(plan)
    owner = _assign_writers(plans)
    tensors: dict = {}
    files = []
    for r, rank_plan in enumerate(plans):
        for file_name, group in _file_plan(r, [e for e in rank_plan if owner[e[:2]] == r], max_file_bytes):
            for key, offsets, sizes, _, shape, dtype in group:
                entry = tensors.setdefault(key, {"shape": list(shape), "dtype": dtype, "chunks": []})
                entry["chunks"].append([file_name, list(offsets), list(sizes)])
            if r == rank:
                files.append((file_name, [(_chunk_name(e[0], e[1]), _staged(by_index[e[:2]].tensor, async_save)) for e in group]))
    if rank == 0:
        tmp = os.path.join(save_dir, _iter_name(step) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    return PendingSave(save_dir, step, files, tensors, state, rank_extra, async_save)


def _staged(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    """What the writer reads: a copy for a background write (training goes on), else the tensor itself."""
    tensor = tensor.detach()
    return tensor.to("cpu", copy=True) if copy else tensor.contiguous().cpu()


# ----------------------------------------------------------------------------- loading


def latest_checkpoint(load_dir: str) -> Optional[str]:
    """The directory ``load_dir/latest`` names, or None when there is no ``latest``."""
    pointer = os.path.join(load_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(load_dir, f.read().strip())


def _overlap(a_off: tuple, a_size: tuple, b_off: tuple, b_size: tuple) -> Optional[tuple]:
    """The intersection ``(offsets, sizes)`` of two boxes, or None."""
    lo = [max(x, y) for x, y in zip(a_off, b_off)]
    hi = [min(x + s, y + t) for x, s, y, t in zip(a_off, a_size, b_off, b_size)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return tuple(lo), tuple(h - l for l, h in zip(lo, hi))


def _slices(offsets: Iterable, sizes: Iterable, origin: Iterable) -> tuple:
    return tuple(slice(o - g, o - g + s) for o, s, g in zip(offsets, sizes, origin))


class Checkpoint:
    """One saved checkpoint, opened by its manifest (nothing else is read until asked).

    Opening checks the manifest's format, that every file it lists exists with the size
    it records, and that the chunks of each tensor add up to its global shape.
    """

    def __init__(self, path: str, available: Optional[list] = None):
        self.path = path
        hint = (f"; available checkpoints: {available}; fix: write the name of an intact one into "
                f"{os.path.dirname(path)}/latest") if available is not None else ""
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path) and any(n.endswith(".pt") for n in _listdir(path)):
            raise CheckpointError(f"{path}: a checkpoint of pickled rank_*.pt files (an older megatron-seed); "
                                  "it is not loaded, as unpickling a file can run code; fix: convert it with the version that wrote it")
        try:
            with open(manifest_path) as f:
                self.manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{manifest_path}: unreadable ({type(e).__name__}: {e}){hint}") from e
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}{hint}")
        for name, size in self.manifest["files"].items():
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: missing (the manifest lists it with {size} bytes){hint}")
            actual = os.path.getsize(file)
            if actual != size:
                raise CheckpointError(f"{file}: {actual} bytes but the manifest records {size} (truncated or rewritten){hint}")
        for key, entry in self.manifest["tensors"].items():
            covered = sum(math.prod(sizes) for _, _, sizes in entry["chunks"])
            if covered != math.prod(entry["shape"]):
                raise CheckpointError(f"{manifest_path}: the chunks of {key} cover {covered} of its {math.prod(entry['shape'])} "
                                      f"elements (shape {entry['shape']}): the manifest does not match the files{hint}")
        self.hint = hint
        self.tensors: dict = self.manifest["tensors"]
        self.step: int = self.manifest["step"]
        self.meta: dict = self.manifest.get("meta", {})

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.tensors)

    def keys(self, prefix: str = "") -> list:
        return [k for k in self.tensors if k.startswith(prefix)]

    def shape(self, key: str) -> tuple:
        return tuple(self.tensors[key]["shape"])

    def read(self, pieces: list) -> None:
        """Fill every piece in place from the chunks that overlap it (a mismatch names the key and file)."""
        per_file: dict = {}
        for piece in pieces:
            entry = self.tensors.get(piece.key)
            if entry is None:
                raise CheckpointError(f"{self.path}: has no tensor {piece.key!r} (it holds {len(self.tensors)} tensors, "
                                      f"e.g. {sorted(self.tensors)[:3]}): a checkpoint of another model{self.hint}")
            if tuple(entry["shape"]) != tuple(piece.global_shape):
                raise CheckpointError(f"{self.path}: {piece.key} has shape {tuple(entry['shape'])} in the checkpoint but "
                                      f"{tuple(piece.global_shape)} in this model: a checkpoint of another model shape")
            found = 0
            for file_name, offsets, sizes in entry["chunks"]:
                box = _overlap(tuple(offsets), tuple(sizes), tuple(piece.offsets), piece.sizes)
                if box is not None:
                    per_file.setdefault(file_name, []).append((piece, _chunk_name(piece.key, tuple(offsets)), tuple(offsets), box))
                    found += math.prod(box[1])
            if found != piece.tensor.numel():
                raise CheckpointError(f"{self.path}: the chunks of {piece.key} cover {found} of the {piece.tensor.numel()} elements "
                                      f"this rank needs at offsets {piece.offsets}")
        from safetensors import safe_open

        with torch.no_grad():
            for file_name, reads in per_file.items():
                file = os.path.join(self.path, file_name)
                try:
                    with safe_open(file, framework="pt") as f:
                        for piece, name, chunk_offsets, (offsets, sizes) in reads:
                            part = f.get_slice(name)[_slices(offsets, sizes, chunk_offsets)]
                            piece.tensor[_slices(offsets, sizes, piece.offsets)].copy_(part.reshape(sizes))
                except CheckpointError:
                    raise
                except Exception as e:  # safetensors reports a garbled header or short data in several ways
                    raise CheckpointError(f"{file}: corrupt ({type(e).__name__}: {e}){self.hint}") from e

    def read_full(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole global tensor ``key`` (one tensor in memory at a time, for conversions)."""
        entry = self.tensors[key]
        out = torch.empty(entry["shape"], dtype=dtype or getattr(torch, entry["dtype"]))
        self.read([Piece(key, out, (0,) * out.dim(), tuple(out.shape))])
        return out

    def read_box(self, key: str, offsets: tuple, sizes: tuple) -> torch.Tensor:
        """The slice ``[offsets, offsets + sizes)`` of the global tensor ``key``."""
        entry = self.tensors[key]
        out = torch.empty(sizes, dtype=getattr(torch, entry["dtype"]))
        self.read([Piece(key, out, tuple(offsets), tuple(entry["shape"]))])
        return out

    def extra(self, rank: int) -> dict:
        """The ``extra`` that ``rank`` saved (rank 0's when the saving run had fewer ranks)."""
        saved = self.manifest.get("extra", {})
        name = f"rank_{rank:05d}" if f"rank_{rank:05d}" in saved else "rank_00000"
        skeleton = saved.get(name, {})
        tensors = {k: self.read_full(k) for k in self.keys(f"extra/{name}/")}
        return _join_extra(skeleton, tensors)


def _listdir(path: str) -> list:
    return os.listdir(path) if os.path.isdir(path) else []


def open_checkpoint(load_dir: str) -> Checkpoint:
    """The checkpoint ``load_dir/latest`` names, or ``load_dir`` itself when it is one checkpoint directory."""
    if os.path.exists(os.path.join(load_dir, MANIFEST)):
        return Checkpoint(load_dir)
    path = latest_checkpoint(load_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {load_dir!r} (no 'latest' file); fix: point train.load_dir at a save_dir of an earlier run")
    available = sorted(d for d in _listdir(load_dir) if d.startswith("iter_") and not d.endswith((".tmp", ".old")))
    return Checkpoint(path, available)


def restore_rng(ckpt: Checkpoint, rank: int) -> bool:
    """Set this process's RNG states to those ``rank`` saved; False when the checkpoint has none for it."""
    key = f"rng/cpu/rank_{rank:05d}"
    if key not in ckpt.tensors:
        return False
    torch.set_rng_state(ckpt.read_full(key))
    if torch.cuda.is_available() and f"rng/cuda/rank_{rank:05d}" in ckpt.tensors:
        torch.cuda.set_rng_state(ckpt.read_full(f"rng/cuda/rank_{rank:05d}"))
    return True


def load_model_weights(chunks: list, ps: ParallelState, load_dir: str) -> Checkpoint:
    """Fill this rank's model chunks from the latest checkpoint of ``load_dir`` (any layout); weights only."""
    ckpt = open_checkpoint(load_dir)
    ckpt.read(model_pieces(chunks, ps))
    return ckpt


def save_stream(save_dir: str, step: int, items: Iterable, state: dict, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """One process writes whole tensors ``(key, tensor)`` as they come (a conversion: at most one file's
    tensors are held); same layout, crash safety and manifest as :func:`save_checkpoint`. Returns the path."""
    from safetensors.torch import save_file

    tmp = os.path.join(save_dir, _iter_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors, files, group, size = {}, {}, {}, 0

    def flush() -> None:
        nonlocal group, size
        if group:
            name = f"rank_00000_{len(files):03d}.safetensors"
            save_file(group, os.path.join(tmp, name))
            files[name] = os.path.getsize(os.path.join(tmp, name))
            for key in group:
                tensors[key.rsplit("@", 1)[0]]["chunks"][0][0] = name
        group, size = {}, 0

    for key, tensor in items:
        tensor = tensor.detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > max_file_bytes:
            flush()
        offsets = (0,) * tensor.dim()
        group[_chunk_name(key, offsets)] = tensor
        tensors[key] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                        "chunks": [[None, list(offsets), list(tensor.shape)]]}
        size += nbytes
    flush()
    _write_manifest(tmp, step, state, files, tensors, {})
    _publish(save_dir, tmp, os.path.join(save_dir, _iter_name(step)), step)
    return os.path.join(save_dir, _iter_name(step))
