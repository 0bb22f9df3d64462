# Experiment (not part of the library): F-SAM's m updated before pass 2,
# Momentum-SAM's eps built from v with -rho (no -v buffer).
from keras_asam import step
from keras_asam.variants import FriendlySAM, MomentumSAM

_ascent = step.SharedStep._ascent
_eps = step.SharedStep._eps


def ascent(self, gradients, ctx):
    variant = self._active_variant
    direction = _ascent(self, gradients, ctx)
    if isinstance(variant, FriendlySAM):
        self._write_state(variant._followed(gradients, self._state_values(),
                                            ctx))
    return direction


def eps(self, gradients, values, rho):
    if isinstance(self._active_variant, MomentumSAM):
        return _eps(self, gradients, values, -rho)
    return _eps(self, gradients, values, rho)


step.SharedStep._ascent = ascent
step.SharedStep._eps = eps
FriendlySAM.descent = lambda self, g, ga, state, ctx: (ga, {})
MomentumSAM.pre_pass = lambda self, state, ctx: list(state["velocity"])
