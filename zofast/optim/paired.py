"""Paired steps: (L+, L−) from ONE forward over the batch stacked twice (``LOZO(...,
paired=True)``).

A zeroth-order step evaluates one batch at W + ε·Z and at W − ε·Z. With LOZO's low-rank noise
both evaluations can be one forward over the batch stacked twice: the first copy's rows see
+ε·U·Vᵀ and the second copy's −ε·U·Vᵀ through per-row terms in the layers' hooks
(:mod:`zofast.paired_layers`), so every weight is read once and every kernel launched once per
step instead of twice. The optimizer still gets L+ and L− separately, so the closure returns the
loss of each copy:

    opt = LOZO(model, lr=1e-6, paired=True)
    loss = opt.step(lambda: zofast.paired.losses(model, batch))  # a transformers model

    def closure():  # or by hand: run the model once on the stacked batch
        out = model(torch.cat([x, x]))
        return torch.stack([loss_fn(out[:n], y), loss_fn(out[n:], y)])  # (L+, L−)

The closure is called once, under ``torch.no_grad()``; it must run the model on the batch
stacked twice along the first dimension (:func:`zofast.paired.stack`) and return (L+, L−), the
losses of the first and the second copy, as a two-element tensor or a pair of numbers. Rows of
the first copy are perturbed by +ε, of the second by −ε, so L+ must be the first copy's.

What is the same as the two-forward step
    The update: g = (L+ − L−)/(2ε) feeds the same update pass, flush, momentum and stochastic
    rounding (same seeds), so the iterates equal those of the two-forward step up to the float
    rounding of the forwards (a batch stacked twice is computed by different GEMM tilings); the
    trajectory is replayed the same way, and records ``"paired": True`` among its
    hyperparameters. The stored weights are not written during the forward: a failing step
    (an exception in the closure, a NaN loss) leaves them bit-identical. With a
    ``process_group`` each rank stacks its own shard and the step does one all-reduce of
    (L+, L−), weighted by ``examples``.

What can be paired
    LOZO and LOZO-M (MeZO's full-rank noise on big matrices has no cheap per-row form: refused
    with ValueError), in an exact mode: ``mode="auto"`` is then "virtual" (the other tensors in
    "shadow" mode) for every dtype, "shadow" with weight decay; ``mode="inplace"`` is refused (the
    weights cannot carry +ε and −ε at once). Every trained tensor is paired through one of the
    ways of :mod:`zofast.paired_layers`: low-rank products for the matrices of stock
    Linear / Conv1D / Embedding layers, the perturbed values for the biases of stock Linear /
    Conv1D and the affine parameters of stock LayerNorm / RMSNorm, and for any other module
    (OPT's learned positional embedding, a custom norm) a second run of that module alone. Every
    hooked layer must see the stacked batch as its first dimension (or its tokens flattened
    batch-major); a layer that does not raises ValueError in the forward (the step is aborted,
    the weights bit-identical).

Where things are
    The step is :meth:`zofast.optim.base.ZerothOrder.step` (its paired branch: per direction,
    enter → (L+, L−) = closure() → the rest as any step); the per-row hooks are
    :mod:`zofast.paired_layers` (which tensor takes which way) and :mod:`zofast.paired_ways` (the
    maths of each); the closures :mod:`zofast.paired`. ``directions=q`` takes one paired forward
    per direction.
"""
