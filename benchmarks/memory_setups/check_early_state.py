"""Checks that `setup_early_state.py` changes no number: F-SAM and
Momentum-SAM train a small model for 8 steps (XLA off and on) with and
without it, and the weights and variant state must be bitwise equal.

    python benchmarks/memory_setups/check_early_state.py
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def child(patched):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if patched:
        with open(os.path.join(HERE, "setup_early_state.py")) as f:
            exec(compile(f.read(), "setup_early_state.py", "exec"), {})
    import keras
    import numpy as np

    import keras_asam
    from keras_asam.variants import FriendlySAM, MomentumSAM

    values = []
    for name in ["fsam", "msam"]:
        for jit in [False, True]:
            keras.utils.set_random_seed(0)
            inner = keras.Sequential([
                keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(3)])
            if name == "fsam":
                model = keras_asam.ASAMModel(inner, variant=FriendlySAM())
            else:
                model = keras_asam.SAMModel(inner, rho=3.0,
                                            variant=MomentumSAM(0.9))
            model.compile(
                optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                jit_compile=jit)
            rs = np.random.RandomState(1)
            x = rs.rand(64, 8).astype("float32")
            y = rs.randint(0, 3, 64)
            model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                      shuffle=False)
            values += [v.numpy().tobytes() for v in model.variables]
    sys.stdout.buffer.write(b"".join(values))


def main():
    if len(sys.argv) > 1:
        return child(sys.argv[1] == "patched")
    outputs = [subprocess.run([sys.executable, __file__, mode],
                              capture_output=True, check=True).stdout
               for mode in ("plain", "patched")]
    same = outputs[0] == outputs[1]
    print(f"{len(outputs[0])} bytes of weights and state: "
          + ("bitwise equal" if same else "DIFFERENT"))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
