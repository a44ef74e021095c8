"""Command line: cross-modal retrieval with a trained model, or with saved embeddings.

  python -m dsf3n_jax.retrieve --embeddings=emb.npz --queries=0,1,2 --k=5
  python -m dsf3n_jax.retrieve --workdir=/tmp/run --split=test --save_embeddings=emb.npz
  python -m dsf3n_jax.retrieve --variables=vars.npz --data=feats.npz --query_modality=visual

Prints, for a few queries, the top-k items of the other modality (row, source
index, label, distance, hit), then precision@k over all queries and the mAP of
both directions. ``--protocol=unimodal`` (the default) embeds every item from its
own modality alone, as a deployed query is; ``--protocol=paired`` embeds each item
with its paired item (the paper's protocol).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from dsf3n_jax import cli, metrics, retrieval


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m dsf3n_jax.retrieve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_argument_group("input (exactly one of --workdir, --embeddings, --variables)")
  src.add_argument("--workdir", help="training directory (dsf3n_jax.train.restore_model)")
  src.add_argument("--checkpoint", choices=("best", "latest"), default=None,
                   help=retrieval.CHECKPOINT_HELP)
  src.add_argument("--embeddings", help=".npz with emb_visual, emb_audio, labels, indices")
  src.add_argument("--variables", help="variables .npz written by retrieval.save_variables")
  src.add_argument("--data", help="paired-feature .npz/.h5 (visual_<split>, audio_<split>, ...)")
  src.add_argument("--model_kwargs", default=None,
                   help="JSON DSF3N arguments, overriding those stored with --variables")
  p.add_argument("--split", default=None,
                 help="split to embed (default test); not with --embeddings")
  p.add_argument("--protocol", choices=retrieval.PROTOCOLS, default="unimodal",
                 help="unimodal: each item embedded from its own modality alone (deployable); "
                 "paired: each item embedded with its paired item (the paper's protocol)")
  p.add_argument("--query_modality", choices=("audio", "visual"), default="audio",
                 help="modality of the queries; items are the other modality")
  p.add_argument("--queries", default="0,1,2",
                 help="comma-separated query rows to print (rows of the split)")
  p.add_argument("--k", type=int, default=5, help="items per query and the k of precision@k")
  p.add_argument("--distance", choices=("cosine", "euclidean"), default="cosine")
  p.add_argument("--batch_size", type=int, default=None, help="pairs per forward pass (default "
                 f"{retrieval.BATCH_SIZE}); not with --embeddings")
  p.add_argument("--save_embeddings", default=None, help="write the embeddings to this .npz")
  return p


def format_table(query_row: int, query_label: int, retrieved: retrieval.Retrieved, i: int,
                 indices: np.ndarray, query_modality: str) -> str:
  """A readable table of one query's top-k items."""
  item_modality = "visual" if query_modality == "audio" else "audio"
  lines = [f"query {query_modality} row {query_row} (source index {indices[query_row]}, "
           f"label {query_label}) -> {item_modality}",
           f"  {'rank':>4} {'row':>7} {'index':>7} {'label':>6} {'distance':>10}  hit"]
  for r in range(retrieved.indices.shape[1]):
    row = retrieved.indices[i, r]
    lines.append(f"  {r + 1:>4} {row:>7} {indices[row]:>7} {retrieved.labels[i, r]:>6} "
                 f"{retrieved.distances[i, r]:>10.6f}  {'*' if retrieved.relevant[i, r] else ''}")
  return "\n".join(lines)


def main(argv=None) -> int:
  """Prints the queries' top-k and the split's mAP; returns the exit status.

  ``argv``: the arguments without the program name (default ``sys.argv[1:]``). A bad
  command line raises ``cli.UsageError`` (exit status 2 under ``cli.run``).
  """
  args = _parser().parse_args(argv)
  cli.check_at_least_one(args, "k", "batch_size")
  if args.embeddings and args.split is not None:
    raise cli.UsageError(f"--split={args.split}: not read with --embeddings (its split is the "
                         "one it was made of)")
  args.split = args.split or "test"
  try:
    rows = [int(r) for r in args.queries.split(",") if r.strip()]
  except ValueError:
    raise cli.UsageError(f"--queries: expected comma-separated ints, got {args.queries!r}"
                         ) from None

  def check_rows(n: int) -> None:  # before the split is embedded
    bad = [r for r in rows if not 0 <= r < n]
    if bad:
      raise cli.UsageError(f"--queries: rows {bad} out of range [0, {n}) of the "
                           f"--split={args.split}")

  emb = retrieval.embeddings_from_flags(args, check_rows=check_rows)
  if args.save_embeddings:
    retrieval.save_embeddings(args.save_embeddings, emb)
    print(f"wrote {len(emb.labels)} embeddings to {args.save_embeddings}")
  n = len(emb.labels)
  queries, items = ((emb.emb_audio, emb.emb_visual) if args.query_modality == "audio"
                    else (emb.emb_visual, emb.emb_audio))
  if rows:
    got = retrieval.retrieve(queries[rows], items, emb.labels[rows], emb.labels, k=args.k,
                             distance=args.distance)
    for i, row in enumerate(rows):
      print(format_table(row, emb.labels[row], got, i, emb.indices, args.query_modality))
  p_at_k = metrics.precision_at_k(queries, items, emb.labels, emb.labels, k=args.k,
                                  distance=args.distance)
  maps = metrics.cross_modal_map(emb.emb_visual, emb.emb_audio, emb.labels,
                                 distance=args.distance)
  direction = "audio->visual" if args.query_modality == "audio" else "visual->audio"
  print(f"precision@{args.k} ({direction}, {n} queries): {p_at_k.mean():.4f}")
  print(f"mAP audio->visual {maps['audio_to_visual']:.4f}  visual->audio "
        f"{maps['visual_to_audio']:.4f}  average {maps['average']:.4f}  "
        f"({emb.protocol} protocol)")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))  # errors: `error: ...` lines (--verbose: the traceback too)
