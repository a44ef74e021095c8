"""XLA HLO text of a compiled step: instructions, their categories and FLOPs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_HLO_DIMS = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
# Instructions that only move, view or build data.
_LAYOUT_OPS = {"parameter", "constant", "copy", "transpose", "bitcast", "reshape", "broadcast",
               "slice", "concatenate", "pad", "reverse", "tuple", "get-tuple-element", "iota",
               "bitcast-convert", "copy-start", "copy-done"}
_CONTROL_OPS = {"while", "conditional", "call"}
_COLLECTIVE_OPS = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                   "collective-permute", "all-reduce-start", "all-reduce-done"}
CATEGORIES = ("matmul: bilinear", "matmul: other", "convolution", "elementwise", "reduction",
              "copy/transpose", "gather/scatter", "sort", "collective", "other")


def parse_hlo(text: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
  """The instructions and computations of an HLO module's text (``compiled.as_text()``).

  Args:
    text: the module.

  Returns:
    ``(instructions, computations)``: ``{name: {"opcode", "dims" (None for
    tuples), "shape", "operands", "calls", "attrs", "op_name",
    "computation"}}`` and ``{computation: [instruction names]}``.
  """
  instrs: dict[str, dict[str, Any]] = {}
  computations: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    if not line.startswith(" "):
      m = _HLO_COMPUTATION.match(line)
      if m:
        current = m.group(1)
        computations[current] = []
      continue
    m = _HLO_INSTRUCTION.match(line)
    if not m or current is None:
      continue
    name, shape, opcode, rest = m.groups()
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        end = i
        break
    attrs = rest[end + 1:]
    dims = _HLO_DIMS.match(shape)
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    instrs[name] = {
        "opcode": opcode, "shape": shape.split("{")[0] if dims else shape,
        "dims": [int(d) for d in dims.group(1).split(",") if d] if dims else None,
        "operands": re.findall(r"%([\w.\-]+)", rest[:end]),
        "calls": re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", attrs)
                 + re.findall(r"%([\w.\-]+)", "".join(re.findall(
                     r"branch_computations=\{([^}]*)\}", attrs))),
        "attrs": attrs, "op_name": op_name.group(1) if op_name else "", "computation": current}
    computations[current].append(name)
  return instrs, computations


def hlo_flops(name: str, instrs: Mapping[str, Any]) -> float:
  """FLOPs of one ``dot`` or ``convolution`` instruction (2 per multiply-add), else 0."""
  ins = instrs[name]
  if ins["dims"] is None:
    return 0.0
  out = float(np.prod(ins["dims"]))
  if ins["opcode"] == "dot":
    lhs = instrs.get(ins["operands"][0], {}).get("dims")
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["attrs"])
    if lhs is None or contracting is None:
      return 0.0
    return 2.0 * out * float(np.prod([lhs[int(c)] for c in contracting.group(1).split(",")
                                      if c]))
  if ins["opcode"] == "convolution":
    rhs = instrs.get(ins["operands"][1], {}).get("dims")
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins["attrs"])
    if rhs is None or labels is None or "o" not in labels.group(1):
      return 0.0
    return 2.0 * out * float(np.prod(rhs)) / rhs[labels.group(1).index("o")]
  return 0.0


def classify_hlo(name: str, instrs: Mapping[str, Any],
                 computations: Mapping[str, list[str]]) -> tuple[str, float]:
  """The category (one of ``CATEGORIES``, or "control flow") and FLOPs of one executed op.

  A fusion is classified by what it contains (through nested computations):
  a product before a convolution, before a sort, before a reduction.
  """
  ins = instrs[name]
  inner, seen, todo = [name], set(), list(ins["calls"])
  while todo:
    comp = todo.pop()
    if comp in seen or comp not in computations:
      continue
    seen.add(comp)
    for n in computations[comp]:
      inner.append(n)
      todo.extend(instrs[n]["calls"])
  opcodes = {instrs[n]["opcode"] for n in inner}
  flops = sum(hlo_flops(n, instrs) for n in inner)
  if ins["opcode"] in _CONTROL_OPS:
    # The ops of its body run (and are traced) as ops of their own, each iteration: their
    # FLOPs are theirs, not the loop's.
    return "control flow", 0.0
  if "dot" in opcodes:
    bilinear = any("/bilinear/" in instrs[n]["op_name"] for n in inner
                   if instrs[n]["opcode"] == "dot")
    return ("matmul: bilinear" if bilinear else "matmul: other"), flops
  if "convolution" in opcodes:
    return "convolution", flops
  if "sort" in opcodes:
    return "sort", flops
  if opcodes & _COLLECTIVE_OPS:
    return "collective", flops
  if opcodes & {"reduce", "reduce-window", "select-and-scatter"}:
    return "reduction", flops
  if opcodes & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
    return "gather/scatter", flops
  if ins["opcode"] == "custom-call":
    return "other", flops
  if opcodes <= _LAYOUT_OPS:
    return "copy/transpose", flops
  return "elementwise", flops
