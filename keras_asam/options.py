"""`Options`: the hyperparameters of an `ASAMModel`, checked, in one record.

`rho` is not here: it is training state (a variable the step reads, settable
during training, or a schedule). The variant is not either: it is an object
with its own arguments (`keras_asam.variants`).
"""

import dataclasses
import math
import typing

from keras_asam import second_pass, selection, validation


@dataclasses.dataclass(frozen=True)
class Options:
    """The checked hyperparameters of an `ASAMModel` (see its docstring for
    what each means). Build it with `Options.checked(...)`."""

    eta: float = 0.01
    adaptive: bool = True
    normalization: str = "elementwise"
    p: float = 2
    num_batch_splits: int = 1
    perturb: typing.Any = None
    sync_perturbation: bool = False
    keep_perturbed_state: bool = False
    non_finite_step: str = "clean_gradient"
    asam_every: int = 1
    asam_probability: float = 1.0
    asam_seed: int = second_pass.DEFAULT_SEED

    @classmethod
    def checked(cls, **values):
        """The record of `values`, each checked (a clear `ValueError` or
        `TypeError` naming the argument and the value received)."""
        checks = {
            "eta": lambda v: validation.check_non_negative("eta", v),
            "adaptive": lambda v: validation.check_bool("adaptive", v),
            "normalization": validation.check_normalization,
            "p": validation.check_p,
            "num_batch_splits": lambda v: validation.check_positive_int(
                "num_batch_splits", v),
            "perturb": selection.check_perturb,
            "sync_perturbation": lambda v: validation.check_bool(
                "sync_perturbation", v),
            "keep_perturbed_state": lambda v: validation.check_bool(
                "keep_perturbed_state", v),
            "non_finite_step": validation.check_non_finite_step,
            "asam_every": lambda v: validation.check_positive_int(
                "asam_every", v),
            "asam_probability": lambda v: validation.check_probability(
                "asam_probability", v),
            "asam_seed": lambda v: validation.check_seed("asam_seed", v),
        }
        return cls(**{name: checks[name](value)
                      for name, value in values.items()})

    @property
    def has_step_schedule(self):
        """Whether some steps skip the perturbed pass by schedule."""
        return not (self.asam_every == 1 and self.asam_probability == 1.0)

    def get_config(self):
        """The options as `ASAMModel.get_config` stores them."""
        config = dataclasses.asdict(self)
        config["perturb"] = selection.serialize_perturb(self.perturb)
        if config["p"] == math.inf:
            config["p"] = "inf"
        return config


NAMES = tuple(field.name for field in dataclasses.fields(Options))
