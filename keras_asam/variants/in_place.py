"""`InPlace`: a variant's state update that the step writes in place."""

from keras import ops


class InPlace:
    """New values for one of a variant's `state_names`, given as an update
    the step writes in place instead of as the new values themselves:

        s_i <- decay * s_i + scale * x_i    where `when` holds
                                            (x_i - y_i for x_i with `minus`)
        s_i <- x_i                          where `reset` holds as well
        s_i unchanged                       where `when` does not hold

    for each weight i (`x_i = None`: s_i unchanged). A hook that returns
    new state (`descent`, `off_step`, `decide`, `after_pass`,
    `after_gradient`, `after_update`) may give an `InPlace` for a name of
    `state_names` wherever it would give the list of new values, and
    `after_apply` one for the weights. The values are the
    same as those of the list it stands for,
    `where(when, where(reset, x, decay * s + scale * x), s)`, computed with
    the same operations (a factor that is the Python number 1 is left
    out, and so is a `reset` or `when` that is `None`).

    What changes is memory. Written as a list, every entry of the new
    state is a tensor of its own before the step writes it, and without a
    compiler TensorFlow's graph executor computes those of all weights at
    once, plus the selects on `when`: up to a few copies of the whole
    state at the end of a step. With `InPlace`, TensorFlow's graph without
    XLA writes one weight's update after the other, inside a single
    conditional on `when` (no select), so that the temporaries of one
    weight at a time are alive; one from `after_gradient` it writes before
    the ascent, handing each weight's g to the ascent as its state is
    written (the ascent reads the state as it was). Under XLA, on JAX and
    on PyTorch the step computes the list above; XLA fuses it into the
    writes.

    Args:
        values: List aligned with the trainable variables: the x_i, `None`
            where the state stays as it is.
        decay: Float or float32 scalar tensor. Defaults to `1.0`.
        scale: Float or float32 scalar tensor. Defaults to `1.0`.
        when: `None` (always) or a boolean scalar tensor. Defaults to
            `None`.
        reset: `None` (never) or a boolean scalar tensor: where it holds,
            the state becomes x (a first step, for example). Defaults to
            `None`.
        minus: `None`, or a list aligned with `values`: the y_i that x_i
            stands less, subtracted weight by weight inside the update
            (no temporary of every difference at once). Defaults to
            `None`.

    Example: Momentum-SAM's velocity, v <- 0.9 v + g, left as it was where
    g is not finite:

    ```python
    def descent(self, gradients, adversarial, state, ctx):
        finite = keras_asam.variants.all_finite(adversarial)
        return adversarial, {"velocity": keras_asam.variants.InPlace(
            adversarial, decay=0.9, when=finite)}
    ```
    """

    def __init__(self, values, decay=1.0, scale=1.0, when=None,
                 reset=None, minus=None):
        self.values = values
        self.decay = decay
        self.scale = scale
        self.when = when
        self.reset = reset
        self.minus = minus

    def pairs(self):
        """`(x_i, y_i)` for each entry (`y_i` `None` without `minus`)."""
        return list(zip(self.values, self.minus or [None] * len(
            self.values)))

    def updated(self, current, x, y=None):
        """The new value of a state entry `current` from its x (and y), in
        float32 (`when` not applied)."""
        x = ops.cast(x, "float32")
        if y is not None:
            x = x - ops.cast(y, "float32")
        scaled = x if _is_one(self.scale) else self.scale * x
        if _is_one(self.decay):
            value = current + scaled
        else:
            value = self.decay * current + scaled
        if self.reset is not None:
            value = ops.where(self.reset, x, value)
        return value

    def new_values(self, current):
        """The list of new values it stands for, given the current values
        (a list aligned with `values`): what the step writes where it does
        not write in place."""
        new = []
        for s, (x, y) in zip(current, self.pairs()):
            if x is None:
                new.append(None)
                continue
            value = self.updated(s, x, y)
            if self.when is not None:
                value = ops.where(self.when, value, s)
            new.append(value)
        return new

    def __repr__(self):
        return (f"InPlace(<{len(self.values)} values>, decay={self.decay!r},"
                f" scale={self.scale!r}, when={self.when!r}, "
                f"reset={self.reset!r})")


def _is_one(factor):
    """Whether `factor` is the Python number 1 (left out of the product)."""
    return isinstance(factor, (int, float)) and not isinstance(
        factor, bool) and factor == 1


def all_finite(tensors):
    """Boolean scalar: every entry of `tensors` (a list; `None` entries are
    skipped) is finite.

    Checked through the sum of each tensor, one reduction per tensor and
    no temporary of its size: a NaN or an infinity in any entry makes the
    sum non-finite; finite entries make it non-finite only past the
    float32 range (about 3.4e38 in all), which counts as not finite too.

    Example:

    ```python
    finite = keras_asam.variants.all_finite(gradients)
    ```
    """
    total = None
    for t in tensors:
        if t is None:
            continue
        term = ops.sum(ops.cast(t, "float32"))
        total = term if total is None else total + term
    if total is None:
        return ops.convert_to_tensor(True)
    return ops.isfinite(total)
