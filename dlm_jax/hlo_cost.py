"""Roofline counts of a compiled XLA:TPU program, read from its optimized HLO text (`compiled.as_text()`).

XLA's own `compiled.cost_analysis()` misleads a roofline on TPU in both directions:
  * it counts a while loop's body once. XLA:TPU turns an FSDP all-gather feeding a matmul into a "windowed einsum"
    loop (`windowed_dot_general_body_ag`: 8 or 16 iterations, each a slice of the matmul), and a layer scan or the
    gradient-accumulation loop are while loops too, so its FLOPs miss most of the model's matmuls;
  * its "bytes accessed" sums every operand and result of every instruction whatever memory holds it: the arrays
    that memory-space assignment keeps in on-chip memory (layout `S(1)`: VMEM / CMEM, and the scalar spaces) and both
    sides of each HBM <-> VMEM prefetch (`copy-start`, `slice-start`) are counted as if they were HBM traffic.

`program_cost` walks the program instead: while bodies are multiplied by their trip count (XLA's `known_trip_count`,
else the loop condition's `counter < N`), FLOPs are the dot / convolution FLOPs (2 x output elements x contracted
size; elementwise work is left out, a few % of a transformer's), and HBM bytes are the bytes of the operands and
results that live in HBM (memory space 0) of each instruction that touches memory, with XLA's refinements for
fusions (a fused parameter only sliced counts its slices, an in-place dynamic-update-slice counts the update) and
async copies counted once (the HBM side of a prefetch). Pallas kernels (custom calls such as splash attention) count
their HBM operands and results, not their FLOPs: the caller adds those analytically (dlm_jax.aot).

A model of the compiled program, not a measurement: HBM reads of one buffer by several fusions are all counted (no
cache), on-chip buffers are free, and collectives count their local HBM bytes only. Used by dlm_jax.aot for the
estimated step time and MFU.
"""

from __future__ import annotations

import dataclasses
import re

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_MEMSPACE = re.compile(r"S\((\d+)\)")
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "partition-id", "replica-id", "after-all",
         "opt-barrier", "add-dependency", "iota"}
_SLICING = {"dynamic-slice", "slice", "gather"}
# XLA:TPU's own custom calls that move no data: an allocation, a concatenation by bitcast, index annotations
_NO_TRAFFIC = {"AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked"}


@dataclasses.dataclass
class Instr:
  name: str
  type: str  # the result type text: one shape or a tuple of shapes
  op: str
  operands: list
  args: str  # the text inside the operand parentheses (a constant's value, a parameter's index)
  attrs: str
  root: bool


@dataclasses.dataclass
class Cost:
  flops: float = 0.0  # dot / convolution FLOPs
  hbm_bytes: float = 0.0  # bytes read and written in HBM (memory space 0)
  onchip_bytes: float = 0.0  # bytes of operands / results held in on-chip memories (not in the roofline)
  custom_calls: int = 0  # Pallas kernels (tpu_custom_call) and other custom calls that touch data (FLOPs not counted)
  kernel_forward_calls: float = 0.0  # executions (loops times trip counts) of attention kernels' forward (op name
  kernel_backward_calls: float = 0.0  # "..._fwd...") and backward ("..._dkv..."; a separate dq kernel is not counted)
  loops: int = 0  # while loops met
  unknown_trip_counts: int = 0  # while loops whose trip count could not be read (counted once)

  def add(self, other: "Cost", factor: float = 1.0) -> None:
    self.flops += factor * other.flops
    self.hbm_bytes += factor * other.hbm_bytes
    self.onchip_bytes += factor * other.onchip_bytes
    self.custom_calls += other.custom_calls
    self.kernel_forward_calls += factor * other.kernel_forward_calls
    self.kernel_backward_calls += factor * other.kernel_backward_calls
    self.loops += other.loops
    self.unknown_trip_counts += other.unknown_trip_counts


def _shapes(type_text: str) -> list[tuple[str, list[int], int]]:
  """(dtype, dims, memory space) of each array in a type (one shape or a tuple); tokens are not arrays."""
  out = []
  for dtype, dims, layout in _SHAPE.findall(type_text):
    if dtype not in _BYTES:
      continue
    space = _MEMSPACE.search(layout or "")
    out.append((dtype, [int(d) for d in dims.split(",") if d], int(space.group(1)) if space else 0))
  return out


def _size(dtype: str, dims: list[int]) -> float:
  n = 1
  for d in dims:
    n *= d
  return n * _BYTES[dtype]


def _split_bytes(type_text: str) -> tuple[float, float]:
  """(HBM bytes, on-chip bytes) of the arrays in a type."""
  hbm = onchip = 0.0
  for dtype, dims, space in _shapes(type_text):
    if space == 0:
      hbm += _size(dtype, dims)
    else:
      onchip += _size(dtype, dims)
  return hbm, onchip


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _parse_instr(line: str) -> Instr | None:
  s = line.strip()
  root = s.startswith("ROOT ")
  if root:
    s = s[5:]
  eq = s.find(" = ")
  if eq < 0:
    return None
  name = s[:eq].lstrip("%")
  rest = s[eq + 3:]
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
  type_text, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren < 0:
    return None
  op = rest[:paren]
  close = _balanced(rest, paren)
  operands = re.findall(r"%([\w.\-]+)", rest[paren:close])
  return Instr(name, type_text, op, operands, rest[paren + 1:close - 1], rest[close:], root)


def parse(text: str) -> tuple[dict, str | None]:
  """{computation name: [Instr]} and the entry computation's name. An instruction may span lines (a custom call's
  backend config holds newlines): lines that start neither an instruction nor a computation continue the last one."""
  comps, entry, cur, buf = {}, None, None, []

  def flush():
    if cur is not None and buf:
      ins = _parse_instr(" ".join(buf))
      if ins is not None:
        comps[cur].append(ins)
    buf.clear()

  for line in text.splitlines():
    head = _HEADER.match(line) if line.startswith(("%", "ENTRY ")) else None
    if head:
      flush()
      cur = head.group(1)
      comps[cur] = []
      if line.startswith("ENTRY"):
        entry = cur
    elif line.rstrip() == "}":
      flush()
      cur = None
    elif line.startswith("  ") and line.lstrip().startswith(("%", "ROOT ")):
      flush()
      buf.append(line)
    elif buf:
      buf.append(line)
  flush()
  return comps, entry


def _called(attrs: str, key: str) -> str | None:
  m = re.search(key + r"=%?([\w.\-]+)", attrs)
  return m.group(1) if m else None


def _dims_of(sym: dict, name: str) -> list[int]:
  shapes = _shapes(sym[name].type) if name in sym else []
  return shapes[0][1] if shapes else []


def _matmul_flops(ins: Instr, sym: dict) -> float:
  out = _shapes(ins.type)
  if not out or len(ins.operands) < 2:
    return 0.0
  n = 1
  for d in out[0][1]:
    n *= d
  if ins.op == "dot":
    lhs = _dims_of(sym, ins.operands[0])
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    k = 1
    for i in (m.group(1).split(",") if m else []):
      if i and int(i) < len(lhs):
        k *= lhs[int(i)]
    return 2.0 * n * k
  return 2.0 * n * _conv_macs_per_output(ins, sym, out[0][1])


def _conv_macs_per_output(ins: Instr, sym: dict, out_dims: list[int]) -> float:
  """Multiply-adds per output element of a convolution: the kernel's input features times, per spatial dimension, the
  mean number of kernel taps that fall on input (not padding) elements. XLA:TPU writes batched matmuls as
  convolutions whose window spans a padded size-1 dimension (window 12, padding 11 on each side: one real tap per
  output), so the kernel's size alone would overcount."""
  lhs, kernel = _dims_of(sym, ins.operands[0]), _dims_of(sym, ins.operands[1])
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not labels or len(labels.group(1)) != len(lhs) or len(labels.group(2)) != len(kernel):
    return 0.0
  lhs_l, ker_l, out_l = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  fields = dict(re.findall(r"(\w+)=(\S+)", window.group(1))) if window else {}
  spatial = sorted(c for c in ker_l if c.isdigit())

  def per_dim(key, default):
    vals = fields.get(key)
    return [default] * len(spatial) if vals is None else vals.split("x")

  pads = [tuple(int(v) for v in p.split("_")) for p in per_dim("pad", "0_0")]
  strides = [int(v) for v in per_dim("stride", "1")]
  lhs_dil = [int(v) for v in per_dim("lhs_dilate", "1")]
  rhs_dil = [int(v) for v in per_dim("rhs_dilate", "1")]
  macs = float(kernel[ker_l.index("i")])
  for j, d in enumerate(spatial):
    size_in, size_k, size_out = lhs[lhs_l.index(d)], kernel[ker_l.index(d)], out_dims[out_l.index(d)]
    dilated = (size_in - 1) * lhs_dil[j] + 1
    taps = 0
    for o in range(size_out):
      for k in range(size_k):
        pos = o * strides[j] + k * rhs_dil[j] - pads[j][0]
        taps += 0 <= pos < dilated and pos % lhs_dil[j] == 0
    macs *= taps / max(size_out, 1)
  return macs


def _const(ins: Instr | None) -> int | None:
  if ins is not None and ins.op == "constant" and re.fullmatch(r"-?\d+", ins.args.strip()):
    return int(ins.args)
  return None


def _through(sym: dict, name: str) -> Instr | None:
  """The instruction behind `name`, looking through copies, bitcasts and converts."""
  ins = sym.get(name)
  while ins is not None and ins.op in ("copy", "bitcast", "convert") and ins.operands:
    ins = sym.get(ins.operands[0])
  return ins


def _trip_count(ins: Instr, comps: dict, caller: dict) -> int | None:
  """XLA's known_trip_count, else the loop `for (i = init; i < N; i += step)` read from the condition (`i < N`), the
  body (the counter's update `i + step`) and the initial tuple (`init`, 0 when it is not a constant): XLA:TPU's
  windowed einsum loops step by 2."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
  if m:
    return int(m.group(1))
  cond = comps.get(_called(ins.attrs, "condition") or "", [])
  csym = {i.name: i for i in cond}
  root = next((i for i in cond if i.root), None)
  if root is None or root.op != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
    return None
  counter, bound = _through(csym, root.operands[0]), _const(_through(csym, root.operands[1]))
  index = re.search(r"index=(\d+)", counter.attrs) if counter is not None and counter.op == "get-tuple-element" else None
  if bound is None or index is None:
    return None
  index = int(index.group(1))
  body = comps.get(_called(ins.attrs, "body") or "", [])
  bsym = {i.name: i for i in body}
  broot = next((i for i in body if i.root), None)
  step = None
  if broot is not None and broot.op == "tuple" and index < len(broot.operands):
    update = _through(bsym, broot.operands[index])
    if update is not None and update.op == "add":
      for a, b in (update.operands, update.operands[::-1]):
        src = _through(bsym, a)
        if src is not None and src.op == "get-tuple-element" and re.search(rf"index={index}\b", src.attrs):
          step = _const(_through(bsym, b))
  if not step or step <= 0:
    return None
  init = caller.get(ins.operands[0]) if ins.operands else None
  start = _const(_through(caller, init.operands[index])) if init is not None and init.op == "tuple" and index < len(
      init.operands) else None
  return max(0, -(-(bound - (start or 0)) // step))


class _Walker:

  def __init__(self, comps: dict):
    self.comps = comps
    self.memo = {}

  def fused_flops(self, name: str) -> float:
    flops = 0.0
    body = self.comps.get(name, [])
    sym = {i.name: i for i in body}
    for i in body:
      if i.op in ("dot", "convolution"):
        flops += _matmul_flops(i, sym)
      elif i.op == "fusion":
        flops += self.fused_flops(_called(i.attrs, "calls") or "")
    return flops

  def fusion_bytes(self, ins: Instr, sym: dict) -> tuple[float, float]:
    """(HBM, on-chip) bytes of a fusion: its operands (a parameter only sliced inside counts its slices; the buffer
    an in-place dynamic-update-slice writes into is not read) and its result (such a result counts the update)."""
    body = self.comps.get(_called(ins.attrs, "calls") or "", [])
    users, index = {}, {}
    for i in body:
      if i.op == "parameter":
        index[i.name] = int(i.args)
      for o in i.operands:
        users.setdefault(o, []).append(i)
    by_index = {v: k for k, v in index.items()}
    bsym = {i.name: i for i in body}
    root = next((i for i in body if i.root), None)
    in_place = set()  # parameters updated in place by a root dynamic-update-slice
    update_bytes = None
    roots = [bsym.get(o) for o in root.operands] if root is not None and root.op == "tuple" else [root]
    for r in roots:
      if r is not None and r.op == "dynamic-update-slice" and r.operands and r.operands[0] in index:
        in_place.add(r.operands[0])
        upd = bsym.get(r.operands[1]) if len(r.operands) > 1 else None
        update_bytes = (update_bytes or 0.0) + (sum(_split_bytes(upd.type)) if upd else 0.0)
    hbm = onchip = 0.0
    for k, operand in enumerate(ins.operands):
      if operand not in sym:
        continue
      o_hbm, o_chip = _split_bytes(sym[operand].type)
      pname = by_index.get(k)
      if pname in in_place:
        continue
      us = users.get(pname, []) if pname else []
      if us and all(u.op in _SLICING and u.operands and u.operands[0] == pname for u in us):
        sliced = sum(sum(_size(d, s) for d, s, _ in _shapes(u.type)) for u in us)
        whole = o_hbm + o_chip
        if whole:
          o_hbm, o_chip = o_hbm * min(1.0, sliced / whole), o_chip * min(1.0, sliced / whole)
      hbm += o_hbm
      onchip += o_chip
    r_hbm, r_chip = _split_bytes(ins.type)
    if update_bytes is not None and in_place:
      whole = r_hbm + r_chip
      if whole:
        r_hbm, r_chip = r_hbm * min(1.0, update_bytes / whole), r_chip * min(1.0, update_bytes / whole)
    return hbm + r_hbm, onchip + r_chip

  def walk(self, name: str) -> Cost:
    if name in self.memo:
      return self.memo[name]
    cost = Cost()
    self.memo[name] = cost  # (recursion guard)
    body = self.comps.get(name, [])
    sym = {i.name: i for i in body}
    for ins in body:
      op = ins.op
      if op in _FREE:
        continue
      if op == "while":
        cost.loops += 1
        trips = _trip_count(ins, self.comps, sym)
        if trips is None:
          cost.unknown_trip_counts += 1
          trips = 1
        cost.add(self.walk(_called(ins.attrs, "body") or ""), trips)
        continue
      if op == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
        names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else [
            n for n in (_called(ins.attrs, "true_computation"), _called(ins.attrs, "false_computation")) if n]
        worst = max((self.walk(n) for n in names), key=lambda c: (c.flops, c.hbm_bytes), default=Cost())
        cost.add(worst)
        continue
      if op in ("call", "async-start"):
        callee = _called(ins.attrs, "to_apply") or _called(ins.attrs, "calls")
        if callee:
          cost.add(self.walk(callee))
          continue
      if op == "slice-start":  # an async slice (HBM -> VMEM, a quarter of an activation at a time): at its done
        continue
      if op.endswith("-done") or op == "async-done":
        hbm, chip = _split_bytes(ins.type)  # the async operation's result, counted once
        start = sym.get(ins.operands[0]) if ins.operands else None
        if op == "slice-done" and start is not None and start.operands and start.operands[0] in sym:
          # the slice is read from its source's memory and written to the result's
          src_hbm = _split_bytes(sym[start.operands[0]].type)[0] > 0
          hbm, chip = hbm + (hbm + chip) * src_hbm, chip + (hbm + chip) * (not src_hbm)
        cost.hbm_bytes += hbm
        cost.onchip_bytes += chip
        continue
      if op == "fusion":
        cost.flops += self.fused_flops(_called(ins.attrs, "calls") or "")
        hbm, chip = self.fusion_bytes(ins, sym)
        cost.hbm_bytes += hbm
        cost.onchip_bytes += chip
        continue
      if op in ("dot", "convolution"):
        cost.flops += _matmul_flops(ins, sym)
      if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
        if target and target.group(1) in _NO_TRAFFIC:
          continue
        cost.custom_calls += 1
        name = re.search(r'op_name="([^"]*)"', ins.attrs)
        last = name.group(1).rsplit("/", 2)[-2:] if name else []
        if any("dkv" in part for part in last):
          cost.kernel_backward_calls += 1
        elif any("fwd" in part for part in last):
          cost.kernel_forward_calls += 1
      operands = [sym[o].type for o in ins.operands if o in sym]
      if op == "dynamic-update-slice" and len(operands) > 1:
        hbm, chip = _split_bytes(operands[1])
        hbm, chip = 2 * hbm, 2 * chip  # the update read and written in place
      elif op in _SLICING:
        hbm, chip = _split_bytes(ins.type)
        hbm, chip = 2 * hbm, 2 * chip
      else:
        hbm = chip = 0.0
        for t in operands:
          a, b = _split_bytes(t)
          hbm += a
          chip += b
        if not op.endswith("-start"):  # an async start's result tuple is counted at its done
          a, b = _split_bytes(ins.type)
          hbm += a
          chip += b
      cost.hbm_bytes += hbm
      cost.onchip_bytes += chip
    return cost


def program_cost(hlo_text: str) -> Cost:
  """The roofline counts of one compiled module's optimized HLO text (see the module docstring)."""
  comps, entry = parse(hlo_text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return _Walker(comps).walk(entry)
