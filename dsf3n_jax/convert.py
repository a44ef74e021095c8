"""Weights between the original PyTorch DSF3N (``CrossModal_NN``) and our Flax ``DSF3N``.

``from_torch_state_dict`` maps the original's key names
(``visual_layer.visual_encoder.weight``, ``visual_fine_grained_feature.conv3_1.weight``,
``MmFA.joint_attention_map.weight``, ``out_layer.0.weight``,
``classifier_visual.classifier.3.weight``, ...) to ``{"params", "batch_stats"}``;
``to_torch_state_dict`` goes back. Layouts: a Dense kernel (in, out) is the
torch weight (out, in) transposed; a Conv kernel (k, in, out) is the torch
weight (out, in, k) transposed (2, 1, 0); the bilinear kernel (in1, in2, out)
is the torch weight (out, in1, in2) transposed (1, 2, 0).

The mapping is derived from the Flax variable tree, so other kernel sizes,
stage counts and the "paper" / no-MFA variants convert too. Only the original's
composition does: ``DSF3N`` with fusion "mfa", head "mlp" and classifier "mlp"
(``check_reference_model``); another part has no PyTorch counterpart.

Command line::

  python -m dsf3n_jax.convert in.pth out_dir               # torch -> a run in out_dir (orbax)
  python -m dsf3n_jax.convert in.pth out_dir --format npz  # torch -> out_dir/variables.npz
  python -m dsf3n_jax.convert --to_torch RUN_DIR out.pth [--checkpoint best|latest]  # a run
  python -m dsf3n_jax.convert --to_torch in.npz out.pth [--num_batches_tracked STEPS]  # back

The flags of one direction are refused in the other (``TO_RUN_FLAGS``, ``TO_TORCH_FLAGS``:
a usage error, exit status 2), as is ``--checkpoint`` for an ``.npz``, not ignored.

``--to_torch RUN_DIR`` exports a training run (its best checkpoint by default) as a
``.pth`` that the original's ``CrossModal_NN`` loads with ``strict=True``, every
BatchNorm's ``num_batches_tracked`` the checkpoint's step (for a run converted from a
``.pth``: the ``.pth``'s own counts, plus the steps trained since, from the run's
``torch_source.json``), and writes the model's
sizes beside it (``out.model_config.json``: the stem's stride and padding are not in
the weights' shapes); converting ``out.pth`` back reads them (``--model_config``).

The default writes ``out_dir`` (a new or empty folder: one that holds anything is
refused) as a training workdir, built beside it and renamed into place: ``config.json`` and
the weights as the orbax checkpoint ``out_dir/checkpoints/0`` (``train.restore_model``,
``retrieve`` and ``visualize`` read it; training resumes from it), and
``out_dir/torch_source.json``: the ``.pth`` it came from and each BatchNorm's
``num_batches_tracked`` there (not a variable of the model: PyTorch's count of training
steps, which ``--to_torch`` writes back). Both formats
also write ``out_dir/model_config.json``. The npz holds the flattened variables
with '/'-joined keys (``params/visual_encoder/dense/kernel``); ``load_npz``
reads it back.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dsf3n_jax import cli, paths
from dsf3n_jax.torch_keys import (  # noqa: F401  (the public names of convert)
  _as_variables,
  _flatten,
  _to_numpy,
  _unflatten,
  check_reference_model,
  from_torch_state_dict,
  normalize_state_dict,
  num_batches_tracked_keys,
  num_batches_tracked_of,
  num_classes_of,
  to_torch_state_dict,
  torch_key_map,
  variables_template,
)

# ---------------------------------------------------------------------------------------------
# Files.


def save_npz(variables: Mapping[str, Any], path: str | os.PathLike, *,
             model_kwargs: Mapping[str, Any] | None = None) -> None:
  """Writes variables as the project's one variables file (``retrieval.save_variables``:
  '/'-joined keys such as ``params/head/out/kernel``, the model's fields beside them)."""
  from dsf3n_jax import retrieval
  flat = {"/".join(p): _to_numpy(v) for p, v in _flatten(_as_variables(variables)).items()}
  retrieval.save_variables(path, _unflatten({tuple(k.split("/")): v for k, v in flat.items()}),
                           model_kwargs=model_kwargs)


def load_npz(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a variables file (``retrieval.load_variables``) as a nested dict of numpy arrays.

  Never unpickles: anything but an ``.npz`` of arrays is a one-line
  ``DataValidationError`` naming the file.
  """
  from dsf3n_jax import retrieval
  variables, _ = retrieval.load_variables(path)
  return _unflatten({p: np.asarray(v) for p, v in _flatten(variables).items()})


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A ``.pth`` saved by the original (``torch.save(net.state_dict(), path)``) as numpy.

  Also accepts a dict holding the state dict under ``state_dict`` or
  ``model_state_dict``. ``num_batches_tracked`` entries are dropped
  (``normalize_state_dict``; ``num_batches_tracked_of(read_torch_checkpoint(path))``
  reads them). Needs torch.
  """
  return normalize_state_dict(read_torch_checkpoint(path))


def read_torch_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
  """A ``.pth``'s state dict as saved (torch tensors, every key); ``load_torch_checkpoint``
  checks what it holds. Needs torch."""
  import pickle
  import zipfile

  import torch

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # Not torch's advice to unpickle with weights_only=False: a .pth here is never unpickled.
    if "weights_only" in first.split(". ", 1)[-1]:
      first = first.split(". ", 1)[0]
    raise ValueError(f"{path}: not a PyTorch state dict file (.pth) that torch.load reads with "
                     f"weights_only=True: {first}") from None
  if isinstance(obj, Mapping):
    for name in ("state_dict", "model_state_dict"):
      if isinstance(obj.get(name), Mapping):
        obj = obj[name]
  if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
    raise ValueError(f"{path}: expected a state dict (key -> tensor), got {type(obj).__name__}")
  return obj


def save_torch_checkpoint(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes a state dict of arrays as a ``.pth`` of torch tensors. Needs torch."""
  import collections

  import torch

  # np.array(order="C") keeps a scalar a scalar (np.ascontiguousarray makes it shape (1,)).
  tensors = collections.OrderedDict(
      (k, torch.from_numpy(np.array(v, order="C"))) for k, v in state_dict.items())
  paths.atomic_file(path, lambda f: torch.save(tensors, f))  # complete or absent, never half


def _write_npz(variables: Mapping[str, Any], out_dir: pathlib.Path,
               model_fields: Mapping[str, Any]) -> pathlib.Path:
  path = out_dir / "variables.npz"  # model_config.json is written beside it too
  save_npz(variables, path, model_kwargs=model_fields)
  return path


def _write_orbax(variables: Mapping[str, Any], out_dir: pathlib.Path,
                 model_fields: Mapping[str, Any]) -> pathlib.Path:
  """A training workdir (config.json + orbax checkpoint 0, its best: the only one)."""
  from dsf3n_jax import train

  config = train.default_config()
  for key, value in model_fields.items():
    if key in config.model:
      config.model[key] = value
  return pathlib.Path(train.save_variables_as_run(
      str(out_dir), variables, config=config,
      best={"selected_on": "last", "metric": "step", "value": 0.0, "converted": True},
      no_data=True))


# Output formats of the torch -> flax direction.
WRITERS: dict[str, Callable[..., pathlib.Path]] = {
    "orbax": _write_orbax,
    "npz": _write_npz,
}


# The fields of ``DSF3N`` a state dict's shapes follow (the original's network has them as
# constructor arguments); ``--to_torch`` writes them beside the .pth (``fields_path``).
TORCH_FIELDS = ("visual_dim", "audio_dim", "encoder_features", "kernel_sizes", "stem_features",
                "stem_kernel", "stem_stride", "stem_padding", "branch_features", "fusion_kw",
                "head_kw", "classifier_kw", "embed_dim")


def fields_path(pth: pathlib.Path) -> pathlib.Path:
  """``x.pth`` -> ``x.model_config.json``: the model fields ``--to_torch`` writes beside a
  .pth and the other direction reads back."""
  return pth.with_name(pth.stem + ".model_config.json")


def _fields_from_args(args: argparse.Namespace, src: pathlib.Path) -> dict[str, Any]:
  """The ``DSF3N`` fields of ``src``: ``--model_config`` (or the file ``--to_torch`` wrote
  beside it), then the flags given (``--no_mfa``: MFA applied 0 times)."""
  path = pathlib.Path(args.model_config) if args.model_config else fields_path(src)
  fields: dict[str, Any] = {"kernel_sizes": [3, 5, 7],
                            "fusion_kw": {"num_stages": 2, "variant": "reference"}}
  if args.model_config or path.exists():
    try:
      saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"--model_config={path}: not a readable JSON object ({e})") from e
    saved = saved.get("model", saved) if isinstance(saved, dict) else None  # a config.json
    if not isinstance(saved, dict):
      raise ValueError(f"--model_config={path}: expected a JSON object of model fields")
    fields.update({k: saved[k] for k in (*TORCH_FIELDS, "num_classes") if k in saved})
  if args.kernel_sizes is not None:
    fields["kernel_sizes"] = list(args.kernel_sizes)
  fusion = dict(fields.get("fusion_kw") or {})
  if args.no_mfa:
    fusion["num_stages"] = 0
  if args.mfa_variant is not None:
    fusion["variant"] = args.mfa_variant
  fields["fusion_kw"] = fusion
  return fields


# What a run converted from a .pth keeps of it beside its checkpoint (``_torch_source``).
TORCH_SOURCE = "torch_source.json"


def _torch_source(src: pathlib.Path, raw: Mapping[str, Any], variables: Mapping[str, Any]
                  ) -> dict[str, Any]:
  """``TORCH_SOURCE`` of a run converted from ``src`` (its state dict ``raw``) at step 0:
  each BatchNorm's ``num_batches_tracked`` there (``{}`` unless the .pth has every one)."""
  counts = num_batches_tracked_of(raw)
  keys = num_batches_tracked_keys(variables)
  return {"source": str(src.resolve()), "step": 0,
          "num_batches_tracked": ({k: counts[k] for k in keys}
                                  if keys and set(keys) <= set(counts) else {})}


def run_num_batches_tracked(workdir: str | os.PathLike, step: int) -> int | dict[str, int]:
  """The ``num_batches_tracked`` of the run's checkpoint at ``step``: ``step`` (one train-mode
  forward of each BatchNorm per step), or, for a run converted from a ``.pth``
  (``TORCH_SOURCE``), each BatchNorm's count in the ``.pth`` plus the steps trained since
  the conversion (none: the ``.pth``'s own counts)."""
  path = pathlib.Path(workdir) / TORCH_SOURCE
  if not path.is_file():
    return step
  try:
    saved = json.loads(path.read_text())
    counts = {str(k): int(v) for k, v in saved["num_batches_tracked"].items()}
    since = step - int(saved["step"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: expected a JSON object with 'step' and 'num_batches_tracked' "
                     f"({{torch key: count}}), as convert writes it ({type(e).__name__}: {e})"
                     ) from e
  if not counts or since < 0:  # a .pth without the counts, or a checkpoint from before
    return step
  return {k: v + since for k, v in counts.items()}


def _run_variables(workdir: pathlib.Path, which: str
                   ) -> tuple[dict[str, Any], int, dict[str, Any]]:
  """The variables of a training run's ``which`` checkpoint, its step and the model's
  fields; the run's model must be the reference composition (``check_reference_model``)."""
  from dsf3n_jax import checkpoints, train  # pylint: disable=g-import-not-at-top
  from dsf3n_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  model, variables, _ = train.restore_model(str(workdir), which=which)
  check_reference_model(model)
  state = checkpoints.Checkpointer(workdir, read_only=True)
  try:
    number = state.best_step() if which == "best" else state.latest_step()
    step = state.read_meta(step=number).get("step", 0)  # older runs' checkpoints: epochs
  finally:
    state.close()
  return variables, int(step), workdir_lib.read_run_config(workdir)["model"]


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m dsf3n_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="a .pth state dict (or, with --to_torch, a training run's "
                      "folder or a variables .npz)")
  parser.add_argument("dst", help="output folder (or, with --to_torch, the .pth file)")
  parser.add_argument("--to_torch", action="store_true",
                      help="a run (or .npz) -> .pth instead")
  parser.add_argument("--checkpoint", default=None, choices=("best", "latest"),
                      help="with --to_torch of a run: which of its checkpoints (default best)")
  parser.add_argument("--num_batches_tracked", type=int, default=None,
                      help="with --to_torch: every BatchNorm's num_batches_tracked, i.e. the "
                      "number of training steps of the run the weights come from (default: "
                      "the checkpoint's step for a run; for a run converted from a .pth, that "
                      ".pth's counts plus the steps trained since; 0 for an .npz)")
  parser.add_argument("--format", default=None, choices=sorted(WRITERS),
                      help="torch -> flax output: orbax (default: a workdir that training "
                      "resumes and retrieve/visualize read) or npz")
  parser.add_argument("--num_classes", type=int, default=None,
                      help="default: read off the state dict")
  parser.add_argument("--model_config", default=None,
                      help="a JSON of the model's fields (a run's config.json or "
                      "model_config.json); default: X.model_config.json beside X.pth when "
                      "there (--to_torch writes it), else the reference model; the flags "
                      "below override it")
  parser.add_argument("--mfa_variant", default=None, choices=("reference", "paper"))
  parser.add_argument("--no_mfa", action="store_true", help="the ablation without MFA")
  parser.add_argument("--kernel_sizes", type=lambda s: [int(k) for k in s.split(",")],
                      default=None, help="comma-separated fine-grained kernel sizes "
                      "(default 3,5,7)")
  parser.add_argument("--no_strict", action="store_true", help="ignore unexpected torch keys")
  return parser


# The flags of one direction only: given in the other, a ``cli.UsageError`` (not ignored).
TO_RUN_FLAGS = ("format", "num_classes", "model_config", "mfa_variant", "no_mfa",
                "kernel_sizes", "no_strict")
TO_TORCH_FLAGS = ("checkpoint", "num_batches_tracked")


def _check_direction(args: argparse.Namespace) -> None:
  """A ``cli.UsageError`` for the first flag given that the other direction reads (all
  default to None or False): ``--format`` with ``--to_torch``, ``--checkpoint`` without."""
  if args.to_torch:
    names, belongs = TO_RUN_FLAGS, ("a flag of the .pth -> run direction (without --to_torch); "
                                    "not read with --to_torch")
  else:
    names, belongs = TO_TORCH_FLAGS, ("a flag of --to_torch (a run or variables .npz -> .pth); "
                                      "not read without it")
  for name in names:
    value = getattr(args, name)
    if value is None or value is False:
      continue
    if value is True:
      flag = f"--{name}"
    elif isinstance(value, list):
      flag = f"--{name}={','.join(map(str, value))}"
    else:
      flag = f"--{name}={value}"
    raise cli.UsageError(f"{flag}: {belongs}")


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """Command-line entry point; returns the path written.

  Args:
    argv: arguments without the program name (default: ``sys.argv[1:]``).

  Returns:
    The written file.
  """
  parser = _parser()
  args = parser.parse_args(argv)
  _check_direction(args)

  src, dst = pathlib.Path(args.src), pathlib.Path(args.dst).absolute()
  if not (src.is_file() or (args.to_torch and src.is_dir())):
    found = "a folder" if src.is_dir() else "no such file"
    parser.error(f"src: {found} {src}" + (" (a training run's folder, or a variables .npz, "
                                          "with --to_torch)" if args.to_torch
                                          else "; expected a .pth file"))
  if args.num_batches_tracked is not None and args.num_batches_tracked < 0:
    raise cli.UsageError(f"--num_batches_tracked={args.num_batches_tracked}: expected an int "
                         ">= 0 (the training steps the weights had)")
  cli.check_files(("--model_config", args.model_config))
  if args.to_torch:  # a run's checkpoint (its step) or a variables .npz (0)
    if src.is_dir():
      from dsf3n_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
      if not (src / workdir_lib.RUN_FILE).is_file():
        raise cli.UsageError(f"--to_torch {args.src}: no training run here "
                             f"({workdir_lib.RUN_FILE} not found); expected a training run's "
                             "folder or a variables .npz")
      variables, step, fields = _run_variables(src, args.checkpoint or "best")
      tracked = run_num_batches_tracked(src, step)
    else:
      if args.checkpoint is not None:
        raise cli.UsageError(f"--checkpoint={args.checkpoint}: read with --to_torch of a "
                             f"training run's folder only; {args.src} is a variables file "
                             "(one set of weights)")
      from dsf3n_jax import retrieval  # pylint: disable=g-import-not-at-top
      variables, tracked, fields = load_npz(src), 0, retrieval.load_variables(src)[1] or {}
    if args.num_batches_tracked is not None:
      tracked = args.num_batches_tracked
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_torch_checkpoint(to_torch_state_dict(variables, num_batches_tracked=tracked), dst)
    fields = {k: fields[k] for k in ("num_classes", *TORCH_FIELDS) if k in fields}
    if fields:  # what converting the .pth back needs beyond its shapes (the stem's stride)
      paths.atomic_write(fields_path(dst), json.dumps(fields, indent=2) + "\n")
    return dst

  args.format = args.format or "orbax"
  if args.format == "orbax" and dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    found = "a file" if not dst.is_dir() else ", ".join(sorted(p.name for p in dst.iterdir())[:5])
    parser.error(f"dst: {dst} is not an empty folder ({found}); the orbax format writes a new "
                 "run there (config.json, checkpoints/0): name a new folder, or pass --format npz")
  raw = read_torch_checkpoint(src)
  state_dict = normalize_state_dict(raw)
  fields = _fields_from_args(args, src)
  saved_classes = fields.pop("num_classes", None)
  num_classes = args.num_classes or saved_classes or num_classes_of(state_dict)
  from dsf3n_jax import train  # pylint: disable=g-import-not-at-top
  from dsf3n_jax.models import DSF3N, registry  # pylint: disable=g-import-not-at-top
  model = train.build_model({  # build_model takes the widths as given: DSF3N's by default
      "branch_features": registry.model_fields(DSF3N)["branch_features"],
      "num_classes": num_classes, **fields}, axis_name=None)
  try:
    variables = from_torch_state_dict(state_dict, model=model, strict=not args.no_strict)
  except ValueError as e:
    hint = (" (a .pth of other sizes: --model_config=FILE, its .model_config.json or the "
            "run's config.json, or the size flags)" if "mis-shaped" in str(e) else "")
    raise ValueError(f"{src}: {e}{hint}") from None
  model_config = json.dumps(dict(num_classes=num_classes, **fields), indent=2) + "\n"
  if args.format != "orbax":
    dst.mkdir(parents=True, exist_ok=True)
    path = WRITERS[args.format](variables, dst, {**fields, "num_classes": num_classes})
    paths.atomic_write(dst / "model_config.json", model_config)
    return path
  # A new run, written beside dst and renamed into its place (dst is empty, checked above): a
  # failure or a kill leaves no half-written run.
  def fill(tmp):
    path = WRITERS[args.format](variables, tmp, fields)
    (tmp / "model_config.json").write_text(model_config)
    (tmp / TORCH_SOURCE).write_text(json.dumps(_torch_source(src, raw, variables), indent=2)
                                    + "\n")
    return path.relative_to(tmp)

  return dst / paths.publish_folder(dst, fill)


if __name__ == "__main__":
  # Errors: `error: ...` lines (--verbose: the traceback too).
  sys.exit(cli.run(lambda argv: print(main(argv))))
