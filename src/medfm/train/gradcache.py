"""Gradient caching: a large contrastive batch on small memory (Gao et al., "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup", 2021), written for medfm's dual encoders.

The contrastive loss couples every pair in the batch, but only through the embeddings. So:

1. embed the whole batch chunk by chunk **without** building graphs (memory: one chunk of activations);
2. compute the loss on the full batch of (detached) embeddings and backpropagate to the embeddings only,
   giving d loss / d embedding for every sample (and the gradient of any loss parameter, e.g. temperature);
3. for each chunk again: recompute its embeddings **with** a graph and call ``backward`` with the cached
   embedding gradients — the chain rule makes the accumulated parameter gradients equal to the full-batch
   ones. Random state (dropout) is replayed so step 3 sees exactly the activations of step 1.

Per-sample losses (image-text matching, captioning) need no coupling beyond the chunk and are added in
step 3 through ``extra_loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

EmbedFn = Callable[[slice], tuple[torch.Tensor, ...]]


def _rng_state(device: torch.device) -> tuple[Any, Any]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Any, Any], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def chunks(n: int, size: int) -> list[slice]:
    size = max(1, int(size))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def cached_backward(
    embed: EmbedFn,
    n: int,
    chunk: int,
    loss_fn: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    n_inputs: int = 2,
    extra_loss: Callable[[slice, tuple[torch.Tensor, ...]], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate ``loss_fn(full-batch embeddings)`` (+ per-chunk ``extra_loss``) chunk by chunk.

    ``embed(sl)`` returns a tuple of tensors for samples ``sl``: the first ``n_inputs`` are embeddings that
    enter the full-batch ``loss_fn`` (e.g. image and text embeddings); any further outputs (visual / text
    tokens) are only passed on to ``extra_loss(sl, outputs)``. Gradients accumulate in ``.grad`` as if the
    full batch had been processed at once; parameters used inside ``loss_fn`` itself (a learnable
    temperature) get theirs from the full-batch loss. Returns (full-batch loss, summed extra loss), detached.
    """
    device = device or torch.device("cpu")
    slices = chunks(n, chunk)
    states, parts = [], []
    with torch.no_grad():
        for sl in slices:
            states.append(_rng_state(device))
            parts.append([t.detach() for t in embed(sl)[:n_inputs]])
    full = [torch.cat([p[j] for p in parts]).requires_grad_(True) for j in range(n_inputs)]
    loss = loss_fn(full)
    loss.backward()  # fills full[j].grad and the loss's own parameters' .grad
    grads = [f.grad for f in full]
    extra_total = torch.zeros(())
    for sl, state in zip(slices, states):
        _set_rng_state(state, device)
        outs = embed(sl)
        surrogate = sum((o * g[sl]).sum() for o, g in zip(outs[:n_inputs], grads) if g is not None)
        if extra_loss is not None:
            e = extra_loss(sl, outs)
            surrogate = surrogate + e
            extra_total = extra_total + e.detach().cpu()
        if isinstance(surrogate, torch.Tensor) and surrogate.requires_grad:
            surrogate.backward()
    return loss.detach(), extra_total
