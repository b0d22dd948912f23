"""Zeroth-order optimizers on the perturbation engine: LOZO, LOZO-M and MeZO.

Both estimate the gradient from two forward passes at W ± ε·Z on the same batch and step along Z.
Weights are only ever written through :mod:`zofast.perturb` (plus one documented ``mul_`` for weight
decay), every noise tensor is regenerated from seeds, and every step is recorded in
``opt.trajectory`` (see :mod:`zofast.trajectory`), so a run can be replayed bit for bit.

The step
    ``step(closure)``, with ``closure()`` evaluating the loss of one batch (it is run under
    ``torch.no_grad()``):

    1. perturb: W += ε·Z_t (one engine pass per tensor);
    2. L+ = closure();
    3. W −= 2ε·Z_t (one pass); L− = closure();
    4. g = (L+ − L−)/(2ε), rounded to float32 (the value that is recorded and used);
    5. restore and update fused into ONE pass per tensor: W += ε·Z_t − lr·g·Z_t (LOZO-M: the
       momentum term instead of −lr·g·Z_t). The update uses exactly the U, V, z of the
       perturbation that produced g, also on V-refresh steps (LOZO's public code redraws U there).

    ``step`` returns (L+ + L−)/2 as a Python float: the loss at the unperturbed weights up to
    O(ε²), a better training-loss signal than L+ alone. ``opt.last_losses`` holds (L+, L−).

Several directions per step (``directions=q``, default 1)
    Steps 1–3 run for each of q directions in turn (in place, one pass moves the weights from
    −ε·Z of one direction to +ε·Z of the next), giving g_0 .. g_(q−1); step 5 applies the
    average of the q estimates, −lr·(1/q)·Σ_k g_k·Z_k, in its one pass. Under a process group the
    ranks share out the batch (``split="batch"``) or the directions (``split="directions"``,
    exact modes). ``step`` returns and ``last_losses`` hold the means over the directions. See
    :mod:`zofast.optim.directions`.

Noise
    Seeds come from ``zofast.rng.RunSeeds(seed)`` with tensor index = the tensor's position in
    the optimizer's flat parameter list (frozen tensors included, so freezing does not shift
    seeds). LOZO: every tensor with ndim ≥ 2 gets Z = U·Vᵀ (U: m×r from role "u" at index = step,
    with q directions per step index = step·q + k for direction k; V: n×r from role "v" at
    index = step // nu, a ≥3-D tensor viewed as (shape[0], rest), no 1/√r
    scaling as in the authors' code, r clamped to min(rank, m, n) per tensor); 1-D (and 0-D)
    tensors get full-rank z from role "full" at index = step (step·q + k). MeZO: everything
    full-rank.

LOZO-M (``momentum`` = β > 0)
    See :mod:`zofast.optim.momentum`: matrices keep the left factor N (m×r) of the momentum
    N·Vᵀ, carried into the new subspace on V refreshes; the update is W ← W − lr·N·Vᵀ.

Weight decay
    W ← (1 − lr·wd)·W − lr·(update). The engine adds terms but cannot scale W, so decay is one
    plain ``p.mul_(1 − lr·wd)`` (an extra pass over decayed tensors only), done on the
    −ε-perturbed weights right before the fused pass, whose restore term is scaled by the same
    factor (c·ε): the result is exactly c·W − lr·update up to rounding. No decay is applied where
    wd = 0 (use :func:`param_groups` to exempt biases and norm weights).

Pipelining (``pipeline=True``)
    The fused pass of step t also adds +ε·Z_{t+1}, so a steady-state step costs two weight passes
    instead of three. BETWEEN STEPS THE WEIGHTS THEN CARRY THE NEXT STEP'S +ε PERTURBATION.
    Call ``opt.settle()`` (one pass; idempotent) before evaluating, saving or exporting the model;
    the next ``step`` re-perturbs. ``state_dict()`` records the pending step, so a checkpoint of
    the unsettled weights together with the optimizer state resumes bit-identically.

Failures inside a step
    Any exception or KeyboardInterrupt in the closure, a closure result that is not a real scalar
    (ValueError), one that requires grad (ValueError), or a NaN/inf loss, g or momentum
    (FloatingPointError): the perturbation is undone through the engine (−ε after the first
    evaluation, +ε after the second) and the exception propagates; the step counter does not
    advance and the trajectory records the abort (its passes round the weights, so replay repeats
    them). KeyboardInterrupts arriving during an engine pass are held until the pass is over
    (main thread only). A loss returned as a CUDA tensor is read (synchronised) only after the
    second evaluation has been queued, so a NaN L+ from the GPU is caught after the second
    evaluation and undone from there (+ε).

    Rounding bound of such a restore, per element, with M = |w| + 2ε·|Z| the largest magnitude
    the element passes through (ulp taken at M): an engine pass rounds once per fused
    multiply-add in float32 registers (k = 1 per pass for full-rank noise, k = r for rank-r noise)
    and once more to the weight dtype. An abort at the first evaluation costs two passes (+ε, −ε),
    at the second three (+ε, −2ε, +ε). float32 weights: |w_restored − w| ≤ (passes·k/2) ulp, i.e.
    ≤ 1 ulp (full-rank) / r ulp (LOZO) at the first evaluation, ≤ 1.5 ulp / 1.5·r ulp at the
    second. bfloat16 / float16 weights: ≤ (passes/2) ulp of that dtype (1 ulp, 1.5 ulp), plus at
    most passes·k·2⁻¹⁴ of its ulp from the float32 registers. Most elements come back
    bit-identical (measured: ~95 % after a first-evaluation abort, ~50 % after a second), but not
    all: undoing a rounded addition exactly would need a copy of the weights.
    Errors detected before any write (bad hyperparameters, no trainable parameters, a missing
    closure, changed requires_grad, a parameter the engine cannot take) leave the weights
    untouched.

Trained parameters
    Only tensors with requires_grad=True when the optimizer is created are trained (torch
    optimizers likewise skip tensors without .grad). Changing requires_grad later raises
    ValueError from ``step`` (a trajectory covers one fixed set of trained tensors: create a new
    optimizer). Each trained tensor must be contiguous float32 / bfloat16 / float16.

Speed
    On one GPU every pass is a CUDA graph (zofast.graphed.GraphedPass) per term count, replayed
    with the step's seeds and scales: no Python call per tensor (a V-refresh step's last pass,
    whose terms span the old and the new V, is a graph of its own). LOZO-M's momentum pass runs
    eagerly. Both give bit-identical results; ZOFAST_CUDA_GRAPHS=0 turns the graphs off. When
    the closure returns its loss as a GPU tensor, the step's last pass is queued right behind
    the second forward, its −lr·g computed on the GPU (no momentum, virtual tensors or weight
    decay): the GPU does not idle while the host reads the losses.

Modes
    ``mode="auto"`` (default): an exact mode when any trained tensor is bf16 / fp16 (in-place
    roundings would random-walk those weights), ``"inplace"`` when all are float32. The exact
    mode is LOZO's ``"virtual"`` (its other tensors in shadow mode) where no group has weight
    decay: its updates are summed in float32 and written once per V epoch, which keeps them
    better than writing bf16 weights every step (bench/results/cpu-2026-12-02-precision);
    ``"shadow"`` otherwise (MeZO always).

    ``mode="inplace"``: the forwards see the perturbation because the weights carry it; every
    step writes every trained tensor (three passes, two pipelined). On bf16 / fp16 weights it
    warns once.

    ``mode="shadow"`` (every optimizer; needs the model): exact. The forwards see W + c·Z through
    zofast.shadow's hooks while the stored weights are written by the update pass alone (see
    :mod:`zofast.optim.shadow`); failures and lr = 0 leave them bit-identical.

    ``rounding`` ("auto": "stochastic" for bf16 / fp16, "nearest" for float32): how the passes
    that write an update round (the update pass, LOZO-M's pass, the virtual flush); stochastic
    rounding keeps the mean of updates far below half an ulp, with reproducible seeded bits.

    ``mode="virtual"`` (LOZO only; ``LOZO(model, ...)`` or ``LOZO(params, ..., model=model)``):
    a trained matrix whose every use in the model is as the ``.weight`` of an ``nn.Linear``,
    transformers' GPT-2 ``Conv1D`` or an ``nn.Embedding`` (stock forward; tied embedding / LM
    head pairs included) is never written during a step. Forward hooks on those layers add the
    low-rank term, ``y += (x·V)·(A + c·U_t)ᵀ`` for a Linear (see :mod:`zofast.virtual` for all
    three), with c = +ε in the first forward, −ε in the second, 0 otherwise. A (m×r, float32,
    ``state[p]["virtual_factor"]``, on the V epoch ``state[p]["virtual_epoch"]``) holds the
    updates not yet written: A ← A − lr·g·U_t (LOZO-M: A ← A − lr·N); at the end of a V-refresh
    step the old A goes into W in one fused pass, W += A·V_oldᵀ (during that step's forwards the
    hooks apply [A | c·U_t]·[V_old | V_new]ᵀ), and A restarts on the new V. The iterates are
    those of in-place LOZO / LOZO-M (same seeds, same g's up to the float rounding of the
    forwards). Every other tensor (1-D ones, matrices of other layers, e.g. OPT's learned
    positional embedding) runs in place as above for float32 weights, and in shadow mode for
    bf16 / fp16 ones (``virtual_rest``). ``opt.virtual_names`` lists the virtual ones.

    * Between steps the hooks apply A·V_Aᵀ, so evaluating the model needs nothing; the STORED
      weights lack it: ``opt.settle()`` (one pass per tensor, recorded, replayed) before saving,
      exporting or copying the model. ``opt.detach()`` settles and removes the hooks (the
      optimizer cannot step afterwards); ``zofast.virtual.detach(model)`` does it for a model
      whose optimizer is gone. A second virtual optimizer on the same layers is refused.
    * weight_decay must be 0 on the groups of virtual tensors (ValueError at construction and in
      step): decay would need a full pass every step.
    * Failures: nothing was written to a virtual tensor, c returns to 0: bit-identical.
    * ``state_dict()`` holds A (float32); stored weights + optimizer state resume bit-identically.
      The trajectory records the mode and ``virtual_indices`` (which tensors were virtual), so
      :func:`zofast.replay` repeats the flushes and rebuilds the weights bit for bit.
    * ``pipeline=True``: the in-place tensors pipeline as above; virtual tensors need no passes.
    * Limits: code that reads ``layer.weight`` itself, or calls ``layer.forward`` directly, sees
      the stored W (such models need mode="inplace"). MeZO has no virtual mode.

Where things are
    :mod:`zofast.optim.base` (the step protocol), :mod:`zofast.optim.inplace`,
    :mod:`zofast.optim.virtual` (the ways of applying a perturbation),
    :mod:`zofast.optim.shadow`, :mod:`zofast.optim.passes`, :mod:`zofast.optim.modes` ("auto"),
    :mod:`zofast.optim.setup` (parts, pre-step checks), :mod:`zofast.optim.state` (state_dict),
    :mod:`zofast.optim.properties`, :mod:`zofast.optim.settle` (settle, detach),
    :mod:`zofast.optim.replaying`, :mod:`zofast.optim.losses` (closure results, g),
    :mod:`zofast.optim.momentum` (its flat vectors: :mod:`zofast.optim.momentum_flat`,
    :mod:`zofast.optim.momentum_update`; its flat matrices: :mod:`zofast.optim.momentum_matrices`),
    :mod:`zofast.optim.noise` (seeds),
    :mod:`zofast.optim.directions` (q per step, split), :mod:`zofast.optim.methods`
    (LOZO, MeZO, param_groups); :func:`zofast.replay` rebuilds weights from a trajectory.
"""

from zofast.optim.base import ZerothOrder
from zofast.optim.methods import LOZO, METHODS, MeZO, param_groups
from zofast.optim.modes import MODES, ROUNDINGS

__all__ = ["LOZO", "MeZO", "param_groups", "MODES", "ROUNDINGS", "METHODS", "ZerothOrder"]
