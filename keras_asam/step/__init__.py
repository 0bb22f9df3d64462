"""The train step of `ASAMModel`, written once for every backend.

One step of `ASAMModel`, read top to bottom:

    rho_t = rho(counter), 0 if negative or not finite   `_rho_this_step`
    run   = does this step take the perturbed pass?     schedules, rho_t > 0
    t     = f(x; variant.teacher())                     optional, no gradient
    g     = grad [L(w) + variant.loss_term()]           clean pass (backend)
    state <- variant.after_pass(y_pred)                 optional
    run   = run and variant.decide(g)                   optional, in the graph
    a     = variant.ascent(g)                           `_ascent`
    eps   = rho_t * T_w^2 a / ||T_w a||_2               `_eps`
    g_adv = grad L(w + eps)                             perturbed pass
                                                        (backend); g where
                                                        L(w + eps) is not
                                                        finite, by default
    d     = variant.descent(g, g_adv), or off_step(g)   `_descent`
    w     <- optimizer(w, d)                            `_update`: none with
                                                        non_finite_step="skip"
                                                        where L(w + eps) or d
                                                        is not finite
    w     <- w + variant.after_apply(g, g_adv)          `_after_apply`
    state <- variant.after_update(w)                    optional
    logs: loss and metrics of the clean pass, mean of L(w + eps) - L(w)

With `num_batch_splits = n` the batch is cut into n parts s (sizes as in
`numpy.array_split`), each perturbing along its own gradient g_s; the
backend's split passes return

    g     = sum_s |s| / |B| grad L_s(w)
    g_adv = sum_s |s| / |B| grad L_s(w + eps_s)
    L_adv = L(w) + sum_s |s| / |B| (L_s(w + eps_s) - L_s(w))

A variant without a clean pass (`clean_pass = False`) builds eps from its
state (`variant.pre_pass`) and takes one pass, at w + eps, whose loss,
metrics and BatchNorm updates are the step's.

Everything here is written with `keras.ops` and the model's variables. A
backend's mixin (`keras_asam/backend/<name>_step.py`) provides the
primitives declared in `primitives.py`: the passes, the loop over parts,
the conditional, the update, replica context and all-reduce, and how values
are read and written (`_read`, `_write`: JAX keeps them in its stateless
state).

The modules, one concept each:

    sequence.py       `SharedStep`: the sequence above (`_step`), the
                      passes and the split batch
    primitives.py     what a backend provides (declared, documented)
    variant_calls.py  the variant's hooks called, checked, and their reach
                      (teacher, loss term, decision), the ascent and eps
    descent.py        the descent direction, the update, the correction
    decisions.py      decisions made before the passes, checks, the host's
                      choice of each step's kind
    state.py          the model's own variables and the variant's state
    logs.py           the loss, metrics and `sharpness` logs
"""

from keras_asam.step.sequence import SharedStep, add_weighted

__all__ = ["SharedStep", "add_weighted"]
