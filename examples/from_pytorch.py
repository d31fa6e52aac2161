"""Converting a small PyTorch CNN (Conv2d, BatchNorm2d, GroupNorm, LayerNorm) to flax + normjax.

The flax model is built from `normjax.linen`; its variables come from the PyTorch
`state_dict`: normalization layers through `normjax.from_torch_state_dict`, convolution and
linear kernels transposed to flax's layouts (`[out, in, kh, kw]` -> `[kh, kw, in, out]`,
`[out, in]` -> `[in, out]`), activations NHWC instead of NCHW. The evaluation outputs agree to
1e-5.

    python examples/from_pytorch.py
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import normjax as nj
import normjax.linen as njnn


def torch_model():
  """The PyTorch model (imported here: the rest of the file needs no torch)."""
  import torch
  return torch.nn.Sequential(
      torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
      torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
      torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.LayerNorm(8),
      torch.nn.Linear(8, 4))


class FlaxModel(nn.Module):
  """The same network in flax, channels last."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding=1, name="conv0")(x)
    x = nn.relu(njnn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn1")(x))
    x = nn.Conv(8, (3, 3), padding=1, name="conv3")(x)
    x = nn.relu(njnn.GroupNorm(num_groups=2, epsilon=1e-5, name="gn4")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = njnn.LayerNorm(epsilon=1e-5, name="ln8")(x)
    return nn.Dense(4, name="fc9")(x)


def convert(state_dict) -> dict:
  """Flax variables for `FlaxModel` from the PyTorch model's `state_dict`."""
  sd = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        for k, v in state_dict.items()}
  params, batch_stats = {}, {}
  for i in (0, 3):
    params[f"conv{i}"] = {"kernel": jnp.asarray(sd[f"{i}.weight"].transpose(2, 3, 1, 0)),
                          "bias": jnp.asarray(sd[f"{i}.bias"])}
  params["fc9"] = {"kernel": jnp.asarray(sd["9.weight"].T), "bias": jnp.asarray(sd["9.bias"])}
  bn = nj.from_torch_state_dict(sd, prefix="1.")
  params["bn1"] = {"scale": bn["scale"], "bias": bn["bias"]}
  # PyTorch's running_var is the unbiased one; evaluation uses it as stored, as ours does.
  batch_stats["bn1"] = {"mean": bn["stats"].mean, "var": bn["stats"].var}
  for name, i in (("gn4", 4), ("ln8", 8)):
    p = nj.from_torch_state_dict(sd, prefix=f"{i}.")
    params[name] = {"scale": p["scale"], "bias": p["bias"]}
  return {"params": params, "batch_stats": batch_stats}


def main(seed: int = 0) -> float:
  """Converts a randomly initialized, briefly trained model; returns the max output difference."""
  import torch
  torch.manual_seed(seed)
  model = torch_model()
  model.train()
  for _ in range(3):   # non-trivial running statistics
    model(torch.randn(8, 3, 8, 8) * 2 + 1)
  with torch.no_grad():
    for m in model:
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
        m.weight.normal_(), m.bias.normal_()
  model.eval()
  x = torch.randn(2, 3, 8, 8)
  y_torch = model(x).detach().numpy()
  variables = convert(model.state_dict())
  y = FlaxModel().apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  diff = float(np.max(np.abs(np.asarray(y) - y_torch)))
  print(f"max |flax - torch| = {diff:.2e}")
  return diff


if __name__ == "__main__":
  main()
