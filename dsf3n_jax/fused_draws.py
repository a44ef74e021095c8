"""A function whose threefry hashes are made together, bit for bit the same.

XLA compiles each ``jax.random`` draw and each ``jax.random.fold_in`` of a program into its
own copy of the threefry hash (twenty rounds of 32-bit arithmetic, a loop kernel each). A
Flax model's initialiser folds a key and draws an array for every parameter: the tiny and
the full DSF3N initialisers each hash 141 times (70 fold-ins, 70 draws and a split), and
compiling those kernels is most of their compile time.

``fused_draws(fn)`` traces ``fn`` to a jaxpr and evaluates it in passes, nested jits (such
as ``jax.random``'s helpers) inlined, without their shardings. Each pass collects the
fold-ins and draws of single threefry keys whose inputs are known, and they are hashed
together before the next pass: the fold-ins in one evaluation, the draws in one per size
class (sizes within a factor of two, as the rows of one array). The last pass, which
collects nothing, gives the result; XLA removes the earlier passes' other work, which
nothing reads. The initialisers above hash 11 and 15 times instead of 141 and compile in 2.2
and 2.5 s instead of 4.8 and 4.7 s (XLA:CPU at -O1, one device of a 2-core AMD EPYC, jax
0.10.2; ``python -m benchmarks.init_compile``); the full one runs in 0.55 s instead of
0.23 s (its 20 M draws hashed as rows, then copied).

With JAX's partitionable threefry (``jax_threefry_partitionable``, the default) the bits of
element ``i`` of a draw depend only on the key and ``i``, and a fold-in is the hash of one
counter, so every value is ``fn``'s bit for bit (tests/test_fused_draws.py). Hashes that
cannot join run as in ``fn``: those of another PRNG implementation or of the original
threefry's draws, of a batch of keys, inside control flow, and draws of more than 2**32
elements; a function with side effects (``jax.debug.print``, callbacks) runs as it is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend.random import threefry2x32_p

_UINT = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}


def fused_draws(fn: Callable) -> Callable:
  """``fn`` with its threefry hashes made together (module docstring); ``fn`` takes and
  returns pytrees of arrays."""

  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if closed.effects:  # each pass would print, call back, ...: left as it is
      return fn(*args)
    flat = jax.tree.leaves(args)
    known: dict[int, Any] = {}
    while True:  # a pass per level of keys derived from keys, and a last one
      asked: dict[int, tuple] = {}
      outs, _ = _Pass(known, asked).evaluate(closed.jaxpr, closed.consts, flat,
                                             [False] * len(flat))
      if not asked:
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
      known.update(_hash_together(asked))

  return wrapped


def _kind(eqn) -> str | None:
  """"bits" or "fold_in" for a hash of one threefry key that can join the others, else
  None."""
  name = eqn.primitive.name
  if name not in ("random_bits", "random_fold_in"):
    return None
  key = eqn.invars[0].aval
  if key.shape != () or str(key.dtype) != "key<fry>":
    return None
  if name == "random_fold_in":
    return "fold_in" if eqn.invars[1].aval.shape == () else None
  size = math.prod(eqn.params["shape"])
  if (eqn.ctx.threefry_partitionable and 0 < size < 2 ** 32
      and eqn.params["bit_width"] in _UINT):
    return "bits"
  return None


class _Pass:
  """One evaluation of the jaxpr (``jax.core.eval_jaxpr`` inside nested jits too): the
  ``i``-th hash that can join, in the order of the program, takes ``known[i]``; one whose
  inputs are known is put in ``asked`` and the others wait, both with a stand-in value
  (what depends on them is recomputed by a later pass)."""

  def __init__(self, known: dict[int, Any], asked: dict[int, tuple]):
    self.known, self.asked, self.count = known, asked, 0

  def evaluate(self, jaxpr, consts, args, waiting) -> tuple[list[Any], list[bool]]:
    env: dict[Any, Any] = {}
    unknown: set[Any] = set()  # computed from a stand-in

    def read(v):
      return v.val if isinstance(v, jex_core.Literal) else env[v]

    def stands_in(v):
      return not isinstance(v, jex_core.Literal) and v in unknown

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    unknown.update(v for v, w in zip(jaxpr.invars, waiting) if w)
    for eqn in jaxpr.eqns:
      ins, from_unknown = [read(v) for v in eqn.invars], [stands_in(v) for v in eqn.invars]
      kind = _kind(eqn)
      if kind is not None:
        i, self.count = self.count, self.count + 1
        if i in self.known:
          outs, out_unknown = [self.known[i]], [False]
        else:
          if not any(from_unknown):
            self.asked[i] = (kind, ins, eqn.params)
          outs, out_unknown = [_stand_in(kind, ins, eqn.params)], [True]
      elif eqn.primitive.name in ("jit", "pjit"):
        inner = eqn.params["jaxpr"]
        with eqn.ctx.manager:
          outs, out_unknown = self.evaluate(inner.jaxpr, inner.consts, ins, from_unknown)
      else:
        with eqn.ctx.manager:
          out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
        outs = out if eqn.primitive.multiple_results else [out]
        out_unknown = [any(from_unknown)] * len(outs)
      env.update(zip(eqn.outvars, outs))
      unknown.update(v for v, u in zip(eqn.outvars, out_unknown) if u)
    return [read(v) for v in jaxpr.outvars], [stands_in(v) for v in jaxpr.outvars]


def _stand_in(kind: str, ins, params):
  if kind == "fold_in":
    return ins[0]  # a key of the right type
  return jnp.zeros(params["shape"], _UINT[params["bit_width"]])


def _hash_together(asked: dict[int, tuple]) -> dict[int, Any]:
  """The values of the hashes in ``asked``: every fold-in in one threefry evaluation, the
  draws in one per width (64 bits, or fewer) and size class (``_threefry_bits``)."""
  out = {}
  folds = [(i, ins) for i, (kind, ins, _) in asked.items() if kind == "fold_in"]
  if folds:
    # threefry2x32.py: fold_in(key, data) is the hash of the counter (0, data).
    data = jnp.stack([jax.random.key_data(ins[0]) for _, ins in folds])
    msgs = jnp.stack([jnp.asarray(ins[1], np.uint32) for _, ins in folds])
    y1, y2 = threefry2x32_p.bind(data[:, 0], data[:, 1], jnp.zeros_like(msgs), msgs)
    keys = jax.random.wrap_key_data(jnp.stack([y1, y2], axis=-1),
                                    impl=jax.random.key_impl(folds[0][1][0]))
    out.update((i, keys[j]) for j, (i, _) in enumerate(folds))
  for wide in (False, True):
    draws = [(i, ins[0], params["bit_width"], params["shape"])
             for i, (kind, ins, params) in asked.items()
             if kind == "bits" and (params["bit_width"] == 64) == wide]
    if draws:
      out.update(zip([i for i, *_ in draws], _threefry_bits([d[1:] for d in draws])))
  return out


def _threefry_bits(requests: Sequence[tuple[jax.Array, int, tuple[int, ...]]]
                   ) -> list[jax.Array]:
  """``[jax.random.bits(key, shape, uint<bit_width>) for key, bit_width, shape in requests]``
  (partitionable threefry; the widths all 64 or all below), the draws of a size class
  (``_size_class``) hashed together as the rows of one array."""
  sizes = [math.prod(shape) for _, _, shape in requests]
  classes: dict[int, list[int]] = {}
  for i, n in enumerate(sizes):
    classes.setdefault(_size_class(n), []).append(i)
  # The counter of element i of a draw is i as two 32-bit words (prng.iota_2x32_shape);
  # below 2**32 elements its high word is 0. Plus a zero XLA cannot see through: an iota
  # alone is a constant, which XLA would fold into a literal as large as the draws.
  zero = lax.optimization_barrier(jnp.zeros((), np.uint32))
  out: list[Any] = [None] * len(requests)
  for members in classes.values():
    shape = (len(members), max(sizes[i] for i in members))
    data = jnp.stack([jax.random.key_data(requests[i][0]) for i in members])
    low = lax.broadcasted_iota(np.uint32, shape, 1) + zero
    bits1, bits2 = threefry2x32_p.bind(jnp.broadcast_to(data[:, :1], shape),
                                       jnp.broadcast_to(data[:, 1:], shape),
                                       jnp.zeros_like(low), low)
    # As threefry2x32.py's _threefry_random_bits_partitionable: 64 bits are both words,
    # fewer their exclusive or, truncated.
    if requests[members[0]][1] == 64:
      bits = (lax.shift_left(bits1.astype(jnp.uint64), jnp.uint64(32))
              | bits2.astype(jnp.uint64))
    else:
      bits = bits1 ^ bits2
    for row, i in enumerate(members):
      _, bit_width, draw_shape = requests[i]
      out[i] = bits[row, :sizes[i]].astype(_UINT[bit_width]).reshape(draw_shape)
  return out


def _size_class(n: int) -> int:
  """Draws of sizes in (2**(c-1), 2**c] are class c: padded to the largest of their class,
  a row hashes fewer than twice its draw's elements."""
  return (n - 1).bit_length()
