"""Shapes shared by the benchmark modules."""

import numpy as np

# (N, C, H, W, K, R, S, stride, padding, groups): ResNet / VGG-style layers, kept small enough for --quick runs.
CONV_LAYERS = {
    "3x3_64ch_56px": (8, 64, 56, 56, 64, 3, 3, 1, 1, 1),
    "3x3_256ch_14px": (8, 256, 14, 14, 256, 3, 3, 1, 1, 1),
    "1x1_256to64_56px": (8, 256, 56, 56, 64, 1, 1, 1, 0, 1),
    "7x7_s2_224px": (8, 3, 224, 224, 64, 7, 7, 2, 3, 1),
    "depthwise_3x3_28px": (8, 256, 28, 28, 256, 3, 3, 1, 1, 256),
    # Each on a path of its own: patches gathered value by value (7-pixel output rows), a strided 1x1 as a plain
    # GEMM of the subsampled input, and one image through a wide layer (too few tiles for Winograd).
    "3x3_s2_256to512_14px": (8, 256, 14, 14, 512, 3, 3, 2, 1, 1),
    "1x1_s2_256to512_56px": (8, 256, 56, 56, 512, 1, 1, 2, 0, 1),
    "3x3_512ch_7px_batch1": (1, 512, 7, 7, 512, 3, 3, 1, 1, 1),
    # Few filters: B read straight from the padded input (_shifted.py), forward and weight gradient.
    "3x3_32ch_32px_cifar": (32, 32, 32, 32, 32, 3, 3, 1, 1, 1),
    "3x3_16ch_56px": (8, 16, 56, 56, 16, 3, 3, 1, 1, 1),
    # ResNet's downsampling: the input gradient one stride phase of the input at a time.
    "3x3_s2_64to128_56px": (8, 64, 56, 56, 128, 3, 3, 2, 1, 1),
    # 4x4 stride 2 (a DCGAN / PatchGAN discriminator): Winograd over the input's stride phases.
    "4x4_s2_64to128_32px": (8, 64, 32, 32, 128, 4, 4, 2, 1, 1),
}


def conv_arrays(layer, dtype, seed=0):
    N, C, H, W, K, R, S, stride, padding, groups = CONV_LAYERS[layer]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C // groups, R, S)).astype(dtype)
    return x, w, dict(stride=stride, padding=padding, groups=groups)


# (N, C_in, H, W, C_out, kernel, stride, padding): decoder layers (DCGAN, U-Net).
TRANSPOSE_LAYERS = {
    "dcgan_512to256_4px": (8, 512, 4, 4, 256, 4, 2, 1),
    "dcgan_128to64_16px": (8, 128, 16, 16, 64, 4, 2, 1),
    "unet_128to64_28px": (8, 128, 28, 28, 64, 2, 2, 0),
    "decoder_3x3_s2_128to64_28px": (8, 128, 28, 28, 64, 3, 2, 1),  # by the output's stride phases
}


def transpose_arrays(layer, dtype, seed=0):
    N, C, H, W, K, R, stride, padding = TRANSPOSE_LAYERS[layer]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((C, K, R, R)).astype(dtype)
    return x, w, dict(stride=stride, padding=padding)
