"""Reading a TensorFlow profiler trace (`.xplane.pb`) into per-op events, and adding them up (for
`dreamer_tf.study.profile`; the format is described there)."""
from __future__ import annotations

import bisect
import dataclasses
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from dreamer_tf.study.op_parts import OTHER, PARTS, PartMapper

__all__ = ["OpEvent", "Trace", "STEP_MARKER", "find_xplane", "parse_xspace", "aggregate", "op_kind_table",
           "part_table", "onednn_share", "summarize"]

STEP_MARKER = "dreamer_profile_train_step"  # the TraceMe around each profiled `agent.train` call

# --------------------------------------------------------------------------------------------
# Reading the trace.

@dataclasses.dataclass(frozen=True)
class OpEvent:
    """One executed op: name (scope/.../op), type, self thread time and intra-op pool time (ps)."""
    name: str
    type: str
    duration_ps: int
    pool_ps: int = 0
    start_ps: int = 0
    thread: str = ""


@dataclasses.dataclass
class Trace:
    ops: list            # [OpEvent] that started inside the profiled steps
    steps: int           # number of STEP_MARKER events
    span_ps: int         # first step start to last step end
    step_ps: list        # duration of each STEP_MARKER event
    threads: dict        # thread (line) name prefix -> number of lines
    pool_unattributed_ps: int = 0  # intra-op pool time whose producing op was not found


def _xplane_pb2():
    try:
        from tsl.profiler.protobuf import xplane_pb2  # type: ignore
    except ImportError:
        try:
            from tensorflow.tsl.profiler.protobuf import xplane_pb2  # type: ignore
        except ImportError:
            from tensorflow.core.profiler.protobuf import xplane_pb2  # type: ignore
    return xplane_pb2


def find_xplane(logdir: str | os.PathLike) -> Path:
    """The newest `plugins/profile/<run>/*.xplane.pb` under `logdir`."""
    files = sorted(Path(logdir).glob("plugins/profile/*/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no plugins/profile/*/*.xplane.pb under {logdir}")
    return files[-1]


def _stats(plane, stats) -> dict:
    names = plane.stat_metadata
    out = {}
    for s in stats:
        which = s.WhichOneof("value")
        if which is not None:
            value = getattr(s, which)
            out[names[s.metadata_id].name if s.metadata_id in names else s.metadata_id] = value
    return out


def _nesting(items: Sequence) -> list:
    """Parent index (or None) of each (start, end, ...) item, items sorted by (start, -end), on one
    thread where events nest properly."""
    parents, stack = [], []
    for k, (start, end, *_) in enumerate(items):
        while stack and items[stack[-1]][1] <= start:
            stack.pop()
        parents.append(stack[-1] if stack else None)
        stack.append(k)
    return parents


def _innermost(items: Sequence, starts: Sequence, parents: Sequence, t: int):
    """Index of the innermost item holding time t: the last one starting at or before t, or the
    ancestor of it that still runs at t (any item holding t encloses that last start)."""
    k = bisect.bisect_right(starts, t) - 1
    while k is not None and k >= 0:
        if items[k][0] <= t < items[k][1]:
            return k
        k = parents[k]
    return None


def parse_xspace(path: str | os.PathLike, marker: str = STEP_MARKER) -> Trace:
    """Op events of the host plane that start inside the `marker` events (all when there are none)."""
    pb2 = _xplane_pb2()
    space = pb2.XSpace()
    space.ParseFromString(Path(path).read_bytes())
    planes = [p for p in space.planes if p.name == "/host:CPU"]
    if not planes:
        raise ValueError(f"{path}: no /host:CPU plane (planes: {[p.name for p in space.planes]})")
    plane = planes[0]
    meta = plane.event_metadata
    # Per line: op intervals, Record (context id -> time) and pool regions.
    raw_ops = []        # (start, end, name, type, line index)
    records = []        # (time, context, line index)
    regions = []        # (start, end, context, line index)
    step_events = []    # (start, end)
    threads: dict[str, int] = defaultdict(int)
    for li, line in enumerate(plane.lines):
        threads[line.name.split("/")[0]] += 1
        base = line.timestamp_ns * 1000
        open_regions = []
        for ev in line.events:
            md = meta[ev.metadata_id]
            start = base + ev.offset_ps
            name = md.name
            if md.display_name and name.endswith(":" + md.display_name):
                raw_ops.append((start, start + ev.duration_ps, name[: -len(md.display_name) - 1],
                                md.display_name, li))
            elif name == marker:
                step_events.append((start, start + ev.duration_ps))
            elif name == "ThreadpoolListener::Record":
                st = _stats(plane, ev.stats)
                if "_p" in st:
                    records.append((start, (st.get("_pt"), st["_p"]), li))
            elif name == "ThreadpoolListener::StartRegion":
                st = _stats(plane, ev.stats)
                open_regions.append((start, (st.get("_ct"), st.get("_c"))))
            elif name == "ThreadpoolListener::StopRegion" and open_regions:
                rstart, ctx = open_regions.pop()
                regions.append((rstart, start, ctx, li))
    if step_events:
        lo, hi = min(s for s, _ in step_events), max(e for _, e in step_events)
    else:
        lo = min((s for s, *_ in raw_ops), default=0)
        hi = max((e for _, e, *_ in raw_ops), default=0)

    # Self time: subtract directly nested op events on the same thread.
    self_ps = [op[1] - op[0] for op in raw_ops]
    by_line = defaultdict(list)
    for i, op in enumerate(raw_ops):
        by_line[op[4]].append(i)
    line_ops = {}
    for li, indices in by_line.items():
        indices.sort(key=lambda i: (raw_ops[i][0], -raw_ops[i][1]))
        items = [raw_ops[i] for i in indices]
        parents = _nesting(items)
        for k, parent in enumerate(parents):
            if parent is not None:
                self_ps[indices[parent]] -= items[k][1] - items[k][0]
        line_ops[li] = (items, [it[0] for it in items], parents, indices)
    line_regions = defaultdict(list)
    for r in regions:
        line_regions[r[3]].append(r)
    region_index = {}
    for li, rs in line_regions.items():
        rs.sort(key=lambda r: (r[0], -r[1]))
        region_index[li] = (rs, [r[0] for r in rs], _nesting(rs))

    owner: dict = {}  # context -> op index
    for t, ctx, li in sorted(records, key=lambda r: r[0]):
        op_index = None
        if li in line_ops:
            items, starts, parents, indices = line_ops[li]
            k = _innermost(items, starts, parents, t)
            if k is not None:
                op_index = indices[k]
        if op_index is None and li in region_index:
            rs, starts, parents = region_index[li]
            k = _innermost(rs, starts, parents, t)
            if k is not None:
                op_index = owner.get(rs[k][2])
        if op_index is not None:
            owner[ctx] = op_index
    pool_ps = [0] * len(raw_ops)
    unattributed = 0
    for start, end, ctx, li in regions:
        if li in line_ops:
            continue  # regions on op threads are executor work, their ops are counted themselves
        if not lo <= start < hi:
            continue
        if ctx in owner:
            pool_ps[owner[ctx]] += end - start
        else:
            unattributed += end - start

    ops = [OpEvent(name, typ, self_ps[i], pool_ps[i], start - lo, plane.lines[li].name.split("/")[0])
           for i, (start, end, name, typ, li) in enumerate(raw_ops) if lo <= start < hi]
    return Trace(ops=ops, steps=len(step_events), span_ps=hi - lo,
                 step_ps=[e - s for s, e in sorted(step_events)], threads=dict(threads),
                 pool_unattributed_ps=unattributed)


# --------------------------------------------------------------------------------------------
# Aggregation.

def aggregate(events: Iterable, key, steps: int = 1) -> list[dict]:
    """Rows {key, calls, seconds, pool_seconds, share} per key(event), per step, sorted by seconds.

    events: OpEvent-like objects (name, type, duration_ps, pool_ps) or (name, type, duration_ps)
    tuples; share = seconds / summed seconds of all events."""
    calls, ps, pool = defaultdict(int), defaultdict(int), defaultdict(int)
    for ev in events:
        if not isinstance(ev, OpEvent):
            ev = OpEvent(*ev)
        k = key(ev)
        calls[k] += 1
        ps[k] += ev.duration_ps
        pool[k] += ev.pool_ps
    total = sum(ps.values())
    rows = [{"key": k, "calls": calls[k] / steps, "seconds": ps[k] / 1e12 / steps,
             "pool_seconds": pool[k] / 1e12 / steps, "share": ps[k] / total if total else 0.0}
            for k in ps]
    return sorted(rows, key=lambda r: (-r["seconds"], str(r["key"])))


def is_onednn(op_type: str) -> bool:
    """oneDNN kernels carry the `_Mkl` prefix (`_MklMatMul`, `_MklNativeFusedConv2D`, ...)."""
    return op_type.startswith("_Mkl")


def op_kind_table(events: Iterable, steps: int = 1) -> list[dict]:
    rows = aggregate(events, lambda e: e.type, steps)
    for r in rows:
        r["onednn"] = is_onednn(r["key"])
    return rows


def part_table(events: Sequence, mapper: PartMapper, steps: int = 1) -> list[dict]:
    """Rows per part (all of PARTS, zeros included, in PARTS order) with its three largest op kinds."""
    events = [e if isinstance(e, OpEvent) else OpEvent(*e) for e in events]
    parts = {name: mapper(name) for name in {e.name for e in events}}
    rows = {r["key"]: r for r in aggregate(events, lambda e: parts[e.name], steps)}
    kinds = defaultdict(lambda: defaultdict(int))
    for e in events:
        kinds[parts[e.name]][e.type] += e.duration_ps
    out = []
    for part in PARTS:
        row = rows.get(part, {"key": part, "calls": 0.0, "seconds": 0.0, "pool_seconds": 0.0, "share": 0.0})
        top = sorted(kinds[part].items(), key=lambda kv: -kv[1])[:3]
        total = sum(kinds[part].values())
        row["top_kinds"] = [(k, v / total) for k, v in top] if total else []
        out.append(row)
    return out


def onednn_share(events: Iterable) -> dict:
    """Share of op time, and of op + pool time, in oneDNN kernels."""
    op = dnn = op_pool = dnn_pool = 0
    for e in events:
        e = e if isinstance(e, OpEvent) else OpEvent(*e)
        op += e.duration_ps
        op_pool += e.duration_ps + e.pool_ps
        if is_onednn(e.type):
            dnn += e.duration_ps
            dnn_pool += e.duration_ps + e.pool_ps
    return {"op_time": dnn / op if op else 0.0, "op_and_pool_time": dnn_pool / op_pool if op_pool else 0.0}


def summarize(trace: Trace, mapper: PartMapper) -> dict:
    steps = max(trace.steps, 1)
    op_s = sum(e.duration_ps for e in trace.ops) / 1e12 / steps
    pool_s = sum(e.pool_ps for e in trace.ops) / 1e12 / steps
    wall = trace.span_ps / 1e12 / steps
    parts = part_table(trace.ops, mapper, steps)
    return {
        "steps": trace.steps, "wall_seconds": wall,
        "step_seconds": [p / 1e12 for p in trace.step_ps],
        "op_seconds": op_s, "pool_seconds": pool_s,
        "pool_unattributed_seconds": trace.pool_unattributed_ps / 1e12 / steps,
        "ops_per_step": len(trace.ops) / steps,
        "op_threads_busy": op_s / wall if wall else float("nan"),
        "cores_busy": (op_s + pool_s) / wall if wall else float("nan"),
        "threads": trace.threads,
        "kinds": op_kind_table(trace.ops, steps), "parts": parts,
        "other_share": next(r["share"] for r in parts if r["key"] == OTHER),
        "onednn": onednn_share(trace.ops),
    }


