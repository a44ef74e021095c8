"""Cases of the PyTorch baseline (the original's network, same weights and batch)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks import sysinfo
from benchmarks.harness import (
  NUM_CLASSES,
  host_peak_bytes,
  minor_faults,
  rates,
  repeat,
  synthetic_batch,
)


def call_blocking(fn, *args):
  import jax
  return jax.block_until_ready(fn(*args))


def match_jax_settings(torch, device) -> dict[str, Any]:
  """PyTorch set as JAX runs, so that the comparison is of the code: as many CPU threads as
  XLA:CPU uses (every core this process may run on; PyTorch's default is the physical
  cores), and on a GPU float32 products in TF32 where JAX's default precision uses it
  (``jax_default_matmul_precision`` unset or "default"; PyTorch's default is full float32).
  Returns the settings, for the results."""
  import jax
  device = torch.device(device)
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  precision = jax.config.jax_default_matmul_precision
  tf32 = device.type == "cuda" and str(precision or "default").lower() in ("default", "none")
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
  return {"torch_threads": threads, "torch_tf32": tf32, "jax_matmul_precision": str(precision)}


def torch_model(params, *, einsum: bool, device):
  import torch

  from benchmarks import torch_dsf3n
  match_jax_settings(torch, device)
  kwargs = {k: v for k, v in (params.get("model") or {}).items()}
  for key in ("kernel_sizes", "branch_features"):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  model = torch_dsf3n.CrossModalNN(NUM_CLASSES, einsum_bilinear=einsum, **kwargs)
  from dsf3n_jax.datasets import validation
  saved = validation.read_npz(params["weights"], expected=(
      "a weights .npz of arrays (model/<torch state-dict key> and centers)"))
  state_dict = {k[len("model/"):]: torch.from_numpy(v) for k, v in saved.items()
                if k.startswith("model/")}
  missing, unexpected = model.load_state_dict(state_dict, strict=False)
  missing = [k for k in missing if not k.endswith("num_batches_tracked")]
  if missing or unexpected:
    raise ValueError(f"{params['weights']}: state dict does not fit CrossModalNN: missing "
                     f"{missing[:5]}, unexpected {unexpected[:5]}")
  centers = torch_dsf3n.CenterLoss(NUM_CLASSES, saved["centers"].shape[1])
  with torch.no_grad():
    centers.center.copy_(torch.from_numpy(saved["centers"]))
  return model.to(device), centers.to(device)


def torch_sync(device):
  import torch
  if device.type == "cuda":
    torch.cuda.synchronize()


def case_torch_train(params: Mapping[str, Any]) -> dict[str, Any]:
  """The PyTorch baseline's training step: Adam on the net, SGD on the centres, eager or compiled.

  ``params["einsum"]``: False is ``nn.Bilinear`` (the original's code path),
  True the einsum bilinear. ``params["compile"]``: wrap the model in
  ``torch.compile`` (the optimiser steps stay eager).
  """
  import torch

  from benchmarks import torch_dsf3n
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  batch_size = int(params["batch_size"])
  model, centers = torch_model(params, einsum=bool(params["einsum"]), device=device)
  model.train()
  forward = torch.compile(model) if params.get("compile") else model
  net_opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.999), eps=1e-8)
  center_opt = torch.optim.SGD(centers.parameters(), lr=0.05)
  batch = {k: torch.from_numpy(v).to(device) for k, v in synthetic_batch(batch_size).items()}
  steps = int(params["steps_per_repeat"])
  losses = []

  def run():
    for _ in range(steps):
      net_opt.zero_grad(set_to_none=True)
      center_opt.zero_grad(set_to_none=True)
      outputs = forward(batch["visual"], batch["audio"])
      loss, _ = torch_dsf3n.total_loss(outputs, batch["label"], centers, alpha=1e-4, beta=5e-4)
      loss.backward()
      net_opt.step()
      center_opt.step()
    torch_sync(device)
    losses.append(float(loss.detach()))

  t0 = time.perf_counter()
  run()  # first call: torch.compile compiles here
  first_s = time.perf_counter() - t0
  for _ in range(max(params["warmup"] - 1, 0)):
    run()
  faults0 = minor_faults()
  times = repeat(run, warmup=0, repeats=params["repeats"],
                 budget_s=params.get("budget_s", float("inf")))
  calls = len(times)
  out = {"batch_size": batch_size, "einsum": bool(params["einsum"]),
         "compile": bool(params.get("compile")), "device": str(device),
         "first_call_s": first_s, "samples_per_s": rates(batch_size * steps, times),
         "minor_faults_per_step": (minor_faults() - faults0) / (calls * steps),
         "host_peak_bytes": host_peak_bytes(),
         "device_peak_bytes": (int(torch.cuda.max_memory_allocated())
                               if device.type == "cuda" else None),
         "loss_finite": bool(np.isfinite(losses[-1])), "threads": torch.get_num_threads(),
         "allocator": sysinfo.active_allocator(), **match_jax_settings(torch, device)}
  return out


