"""ResNet-20/56 (He et al., 2016) and WideResNet-28-10 (Zagoruyko and
Komodakis, 2016) for 32x32 CIFAR images, as Keras functional models.

Kernels carry an L2 penalty of `weight_decay / 2`, whose gradient
`weight_decay * w` is PyTorch's SGD weight decay used by the official ASAM
recipe.
"""

import keras


def _conv(filters, kernel_size, strides, weight_decay):
    return keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(weight_decay / 2))


def _bn():
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)


def resnet(depth, num_classes, weight_decay=5e-4):
    """CIFAR ResNet of depth 6n + 2 (20, 56, ...), basic blocks."""
    if (depth - 2) % 6:
        raise ValueError(f"`depth` must be 6n + 2. Received: depth={depth}")
    blocks = (depth - 2) // 6
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.ReLU()(_bn()(_conv(16, 3, 1, weight_decay)(inputs)))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = keras.layers.ReLU()(_bn()(_conv(filters, 3, strides,
                                                weight_decay)(x)))
            y = _bn()(_conv(filters, 3, 1, weight_decay)(y))
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = _bn()(_conv(filters, 1, strides,
                                       weight_decay)(shortcut))
            x = keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(
        num_classes, kernel_regularizer=keras.regularizers.L2(weight_decay / 2),
        dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def wide_resnet(depth, width, num_classes, weight_decay=5e-4):
    """Pre-activation WideResNet-depth-width (28-10 in the paper)."""
    if (depth - 4) % 6:
        raise ValueError(f"`depth` must be 6n + 4. Received: depth={depth}")
    blocks = (depth - 4) // 6
    inputs = keras.Input((32, 32, 3))
    x = _conv(16, 3, 1, weight_decay)(inputs)
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            pre = keras.layers.ReLU()(_bn()(x))
            shortcut = x
            if strides != 1 or x.shape[-1] != filters:
                shortcut = _conv(filters, 1, strides, weight_decay)(pre)
            y = _conv(filters, 3, strides, weight_decay)(pre)
            y = _conv(filters, 3, 1, weight_decay)(
                keras.layers.ReLU()(_bn()(y)))
            x = keras.layers.Add()([shortcut, y])
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(_bn()(x)))
    outputs = keras.layers.Dense(
        num_classes, kernel_regularizer=keras.regularizers.L2(weight_decay / 2),
        dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"wrn{depth}_{width}")


def get(name, num_classes, weight_decay=5e-4):
    """`resnet20`, `resnet56` or `wrn28_10`."""
    builders = {
        "resnet20": lambda: resnet(20, num_classes, weight_decay),
        "resnet56": lambda: resnet(56, num_classes, weight_decay),
        "wrn28_10": lambda: wide_resnet(28, 10, num_classes, weight_decay),
    }
    if name not in builders:
        raise ValueError(f"`model` must be one of {sorted(builders)}. "
                         f"Received: model={name!r}")
    return builders[name]()
