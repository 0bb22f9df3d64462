# Experiment: F-SAM's hooks one at a time (FSAM_PART in the environment).
#   state:   m exists (1 P) but no hook uses it (plain ASAM otherwise)
#   ascent:  d = g - sigma m for eps, m never updated
#   update:  eps from g, m updated after pass 2
import os

from keras_asam.variants import FriendlySAM, Variant

part = os.environ["FSAM_PART"]
if part in ("state", "update"):
    FriendlySAM.ascent = Variant.ascent
if part in ("state", "ascent"):
    FriendlySAM.descent = lambda self, g, ga, state, ctx: (ga, {})
