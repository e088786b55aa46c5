"""Independent reference: per-example gradients by a loop of batch-size-1 backward passes."""

import torch


def per_example_grads(model, inputs, loss_fn):
    """{param: (B, *shape)} from B separate backward passes (loss_fn(model, example_inputs))."""
    params = [p for p in model.parameters() if p.requires_grad]
    B = inputs[0].shape[0]
    out = {id(p): [] for p in params}
    for i in range(B):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, tuple(x[i:i + 1] for x in inputs))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            out[id(p)].append(torch.zeros_like(p) if g is None else g)
    return {pid: torch.stack(v) for pid, v in out.items()}


def clipped_sum(per_example, clip, per_layer=False, automatic=False, gamma=0.01):
    """Reference Σ_i c_i g_i with flat or per-tensor clipping."""
    pids = list(per_example)
    B = per_example[pids[0]].shape[0]
    if per_layer:
        clip_t = clip / len(pids) ** 0.5
        out = {}
        for pid in pids:
            n = per_example[pid].reshape(B, -1).norm(dim=1)
            c = (clip_t / n).clamp(max=1)
            out[pid] = torch.einsum("b...,b->...", per_example[pid], c)
        return out
    norms = torch.sqrt(sum(per_example[pid].reshape(B, -1).pow(2).sum(1) for pid in pids))
    c = clip / (norms + gamma) if automatic else (clip / norms).clamp(max=1)
    return {pid: torch.einsum("b...,b->...", per_example[pid], c) for pid in pids}
