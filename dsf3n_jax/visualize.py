"""The paper's Fig. 3: t-SNE of raw input features vs learned embeddings.

Both modalities share one plane, one colour per class, one marker per modality
(o visual, ^ audio). Raw features have different sizes (1024 visual, 128
audio), so each modality is standardised and projected by PCA to the same
number of dimensions before the joint t-SNE; embeddings (same size, compared
by cosine) are L2-normalised. Works for any dataset.

  python -m dsf3n_jax.visualize --workdir=/tmp/run --out_dir=/tmp/figs
  python -m dsf3n_jax.visualize --variables=vars.npz --data=feats.npz --out_dir=figs
  python -m dsf3n_jax.visualize --embeddings=emb.npz --out_dir=figs  # embeddings only
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

from dsf3n_jax import cli, retrieval


def subsample(labels, *, max_points: int, seed: int = 0) -> np.ndarray:
  """Rows to plot: all if few enough, else a class-stratified random subset (sorted)."""
  labels = np.asarray(labels)
  n = len(labels)
  if n <= max_points:
    return np.arange(n)
  rng = np.random.default_rng(seed)
  keep = []
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    take = max(1, int(round(max_points * len(rows) / n)))
    keep.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
  return np.sort(np.concatenate(keep))


def joint_tsne(visual, audio, *, seed: int = 0, perplexity: float = 30.0,
               kind: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
  """2-D t-SNE of both modalities in one plane.

  Args:
    visual: (n, dv) features or embeddings.
    audio: (n, da) features or embeddings.
    seed: t-SNE random state.
    perplexity: t-SNE perplexity (clipped below the number of points).
    kind: "raw" (standardise + PCA each modality to a common size) or
      "embedding" (L2-normalise).

  Returns:
    ``(xy_visual, xy_audio)``, each (n, 2).
  """
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top

  visual = np.asarray(visual, np.float64)
  audio = np.asarray(audio, np.float64)
  n = len(visual)
  if kind == "raw":
    dim = max(1, min(50, visual.shape[1], audio.shape[1], n))
    parts = []
    for x in (visual, audio):
      x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
      x = PCA(n_components=dim, random_state=seed).fit_transform(x)
      parts.append(x / np.maximum(np.sqrt((x ** 2).sum(1).mean()), 1e-12))
  elif kind == "embedding":
    parts = [x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
             for x in (visual, audio)]
  else:
    raise ValueError(f"kind: expected 'raw' or 'embedding', got {kind!r}")
  both = np.concatenate(parts)
  perplexity = min(perplexity, max(1.0, (len(both) - 1) / 3))
  xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
      both)
  return xy[:n], xy[n:]


def class_colors(n: int) -> list[tuple[float, ...]]:
  """``n`` distinct RGBA colours: a qualitative map's up to 20 classes, then evenly spaced
  hues of a continuous one."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  if n <= 20:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i) for i in range(n)]
  cmap = matplotlib.colormaps["turbo"]
  return [cmap(i / (n - 1)) for i in range(n)]


def plot_plane(xy_visual, xy_audio, labels, *, title: str, path) -> None:
  """Scatter plot: colour = class, marker = modality; writes a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = np.asarray(labels)
  classes = np.unique(labels)
  colors = class_colors(len(classes))
  fig, ax = plt.subplots(figsize=(6.5, 6))
  for c, color in zip(classes, colors):
    rows = labels == c
    ax.scatter(*xy_visual[rows].T, s=12, marker="o", color=color, alpha=0.7,
               label=f"{c} visual")
    ax.scatter(*xy_audio[rows].T, s=14, marker="^", color=color, alpha=0.7, label=f"{c} audio")
  ax.set_title(title)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.legend(fontsize=6, ncol=2, loc="best", markerscale=1.2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m dsf3n_jax.visualize", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir")
  p.add_argument("--checkpoint", choices=("best", "latest"), default=None,
                 help=retrieval.CHECKPOINT_HELP)
  p.add_argument("--embeddings", help=".npz with emb_visual, emb_audio, labels, indices "
                 "(with --data also the raw-feature figure)")
  p.add_argument("--variables")
  p.add_argument("--data", help="paired-feature file; needed for the raw-feature figure")
  p.add_argument("--model_kwargs", default=None)
  p.add_argument("--split", default=None,
                 help="split to embed and to draw the raw features of (default test); with "
                 "--embeddings only with --data (the split of its raw features: the one the "
                 "embeddings were made of)")
  p.add_argument("--protocol", choices=retrieval.PROTOCOLS, default="unimodal",
                 help="unimodal: each item embedded from its own modality alone (deployable); "
                 "paired: each item embedded with its paired item (the paper's protocol)")
  p.add_argument("--out_dir", required=True)
  p.add_argument("--max_points", type=int, default=1000,
                 help="pairs plotted (stratified; at least one per class)")
  p.add_argument("--perplexity", type=float, default=30.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch_size", type=int, default=None, help="pairs per forward pass (default "
                 f"{retrieval.BATCH_SIZE}); not with --embeddings")
  return p


def main(argv=None) -> int:
  """Writes ``embeddings.png`` (and ``raw_features.png`` from ``--data`` or the run's data).

  ``argv`` are the arguments without the program name (default ``sys.argv[1:]``); returns
  the exit status. A bad command line raises ``cli.UsageError`` (exit status 2 under
  ``cli.run``) before anything is embedded.
  """
  from dsf3n_jax.training.workdir import log  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  t0 = time.perf_counter()

  def say_start(n: int) -> None:  # once the inputs are read and checked, before embedding
    if not args.embeddings:
      log("embedding the %s split: %d items (%s protocol) ...", args.split, n, args.protocol)

  if args.max_points < 1:
    raise cli.UsageError(f"--max_points={args.max_points}: expected at least 1")
  cli.check_at_least_one(args, "batch_size")
  if not args.perplexity > 0:
    raise cli.UsageError(f"--perplexity={args.perplexity}: expected a number > 0")
  out = cli.check_out_folder("--out_dir", args.out_dir)
  if args.embeddings and not args.data and args.split is not None:
    raise cli.UsageError(f"--split={args.split}: not read with --embeddings alone (the "
                         "embeddings are of the split they were made of); with --data=FILE it "
                         "names the split of the raw features")
  args.split = args.split or "test"
  if args.data and args.embeddings:  # embeddings_from_flags checks --data where it embeds it
    cli.check_files(("--data", args.data))
    retrieval.check_split(args.data, args.split, where=f"--data={args.data}")
  emb = retrieval.embeddings_from_flags(args, check_rows=say_start, data_with_embeddings=True)
  log("%d items' embeddings ready in %.1f s", len(emb.labels), time.perf_counter() - t0)
  out.mkdir(parents=True, exist_ok=True)
  rows = subsample(emb.labels, max_points=args.max_points, seed=args.seed)
  labels = emb.labels[rows]
  written = []
  raw = None
  if args.data:
    visual, audio, raw_labels = retrieval.load_split(args.data, args.split)
    src = emb.indices[rows]  # rows of the file's split
    if src.max(initial=-1) >= len(raw_labels) or src.min(initial=0) < 0:
      raise ValueError(f"--data={args.data}: split {args.split!r} has {len(raw_labels)} rows "
                       f"but the embeddings' indices run from {src.min()} to {src.max()}")
    if not np.array_equal(raw_labels[src], labels):
      wrong = int(np.sum(raw_labels[src] != labels))
      raise cli.UsageError(f"--data={args.data} --split={args.split}: {wrong} of {len(src)} "
                           f"rows have other labels than --embeddings={args.embeddings} gives "
                           "them: not the split the embeddings were made of (pass its --split)")
    raw = visual, audio, raw_labels
  elif args.workdir:  # the run's own dataset, row-aligned with the embeddings
    from dsf3n_jax.training import restore  # pylint: disable=g-import-not-at-top
    arrays = retrieval.run_split(restore.run_config(args.workdir), args.split)
    raw, src = (arrays["visual"], arrays["audio"], arrays["label"]), rows
  if raw is not None:
    visual, audio, raw_labels = raw
    t0 = time.perf_counter()
    log("t-SNE of %d raw feature pairs ...", len(src))
    xy_v, xy_a = joint_tsne(visual[src], audio[src], seed=args.seed,
                            perplexity=args.perplexity, kind="raw")
    path = out / "raw_features.png"
    plot_plane(xy_v, xy_a, raw_labels[src], title=f"raw input features ({args.split})",
               path=path)
    written.append(path)
    log("raw features' t-SNE in %.1f s", time.perf_counter() - t0)
  t0 = time.perf_counter()
  log("t-SNE of %d embedding pairs ...", len(rows))
  xy_v, xy_a = joint_tsne(emb.emb_visual[rows], emb.emb_audio[rows], seed=args.seed,
                          perplexity=args.perplexity, kind="embedding")
  path = out / "embeddings.png"
  # --embeddings alone: their split is not known here (not the default --split).
  split = pathlib.Path(args.embeddings).name if args.embeddings and not args.data else args.split
  plot_plane(xy_v, xy_a, labels, title=f"learned embeddings ({split})", path=path)
  written.append(path)
  log("embeddings' t-SNE in %.1f s", time.perf_counter() - t0)
  for p in written:
    print(f"wrote {p}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))  # errors: `error: ...` lines (--verbose: the traceback too)
