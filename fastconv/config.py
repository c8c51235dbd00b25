"""Tunables of fastconv's kernels, in one place.

These are compile-time constants: Numba freezes module globals into the machine code it compiles. The kernel
cache is keyed on all of fastconv's sources, this file included (``_cache.py``), so an edit here recompiles
the kernels on their next use.

The GEMM follows the BLIS vocabulary (see ``_gemm.py``): an ``MR x NR`` register tile computed by the
micro-kernel, blocks of ``MC`` rows of A, ``KC`` of the shared dimension and ``NC`` columns of B.
"""

#: Rows of the micro-kernel's register tile. With NR = 64 this is 4 x 64 accumulators: 16 AVX-512 registers
#: in float32, 32 in float64. Measured on Zen 4 (one core, kc = 256): 4x64 gives 258 GFLOP/s in float32 and
#: 82 GFLOP/s in float64 (100 since the tile is aligned to a cache line); 6x64 gives 255 / 65; tiles of NR = 32
#: or less were not vectorised by LLVM (3 GFLOP/s).
MR = 4

#: Columns of the micro-kernel's register tile (elements, whatever the dtype).
NR = 64

#: Depth of a packed block: one A micro-panel (KC x MR) and one B micro-panel (KC x NR) are what the
#: micro-kernel streams through for one tile. KC=512, MC=256, NC=2048 measured best of the 11 combinations
#: tried on Zen 4 (float32 GEMM, 2 threads): 2048^3 266 -> 384 GFLOP/s, 64x25088x576 243 -> 283, and no conv
#: layer slower.
KC = 512

#: Rows of A per block: an MC x KC block of packed A stays in the L2 cache (512 KiB of float32 of the 1 MiB
#: per core on Zen 4).
MC = 256

#: Columns of B per block: a KC x NC packed panel of B (4 MiB of float32) is shared by the threads from L3.
NC = 2048

#: Bytes the convolution drivers may use for one im2col / column buffer. Larger layers are processed in
#: chunks of output rows, so memory stays bounded whatever the image size.
COLUMN_BUFFER_BYTES = 32 * 2**20

#: A GEMM's C of at least this many bytes, overwritten in one pass over the shared dimension (the output of a
#: conv2d by GEMM, of ``gemm``), is stored past the caches (non-temporal stores, ``_simd._stream_row``): C
#: larger than the two cores' L2 caches goes to memory anyway, and an ordinary store first reads the line it
#: writes. Measured (float32, 2 threads, one process alternating, ms): conv2d 8x64x56x56 -> 256 1x1 5.89 ->
#: 4.56, 8x256x56x56 -> 64 5.59 -> 5.12, 8x64x28x28 -> 128 0.68 -> 0.58; conv2d_backward 8x256x56x56 -> 64
#: 11.6 -> 10.3; gemm 256x25088x64 5.55 -> 4.58. The next layer reading the output pays nothing for it:
#: 8x64x56x56 -> 256 -> 64 (two 1x1) 11.5 -> 9.8, 8x64x28x28 -> 128 1x1 then 3x3 4.37 -> 4.23.
STREAM_OUTPUT_BYTES = 2 * 2**20

#: The forward pass by GEMM in float32 reads B straight from the padded input (``_shifted.py``), not from packed
#: patches, when a group has at most SHIFTED_MAX_OUT_PER_GROUP filters and the positions it computes past the
#: output (at the end of each row, and in the last tile of NR of each image) cost less than packing, whose cost
#: per product falls as filters grow: ``(computed - P*Q) * Kg <= SHIFTED_WASTE_BUDGET * P*Q``. Measured (float32,
#: 2 threads), packed patches -> padded input: 32x32x32x32 -> 32 3x3 2.28-2.33 -> 1.57-1.61 ms, 32x3x32x32 -> 32
#: 0.38-0.40 -> 0.29-0.32, 8x32x28x28 -> 32 0.55-0.58 -> 0.36-0.38, 8x64x16x16 -> 64 0.52-0.59 -> 0.45-0.49,
#: 8x128x28x28 -> 128 4.8-5.2 -> 4.6-4.7, 8x64x56x56 -> 64 5.5-5.7 -> 4.5-4.7, 8x3x224x224 -> 64 7x7 s2
#: 5.64-5.78 -> 4.86-4.88, 1x3x224x224 0.73-0.77 -> 0.59, ConvNeXt's 4x4 s4 (3 -> 96) 0.91-0.95 -> 0.85-0.86;
#: 8x128x14x14 the same either way (1.29-1.40 / 1.36-1.38; 39 wasted positions per output, left out); slower
#: with 256 or 512 filters whatever the width (8x256x28x28 16.6-17.3 -> 18.0-18.2 ms, 8x512x14x14 17.3-18.6 ->
#: 19.7-20.5: each task streams all of A through the cache).
#: At a stride, only for at most SHIFTED_MAX_STRIDED_TAPS taps per group (``Cg * R * S``): with more, the taps
#: of a tile read four phases per channel and it measured slower (8x64x56x56 -> 128 3x3 s2 2.66-2.83 ->
#: 2.78-2.84, 32x32x32x32 -> 64 s2 1.02-1.10 -> 1.27-1.30, 2x2 s2 64 -> 128 1.13-1.17 -> 1.32-1.35), and not for
#: want of L1: summing the taps in blocks of 144, whose lines fit, gained nothing.
#: With more filters it pays still on small batches, where A, read once per tile of NR positions, makes at most
#: SHIFTED_MAX_A_TRAFFIC bytes in all: one launch, no panel of B packed by each of the tasks that share it
#: (algorithm='gemm'): 1x512x7x7 3x3 0.87-0.89 -> 0.75-0.78 ms, 2x512x7x7 1.53-1.55 -> 1.38, 1x256x7x7 0.41 ->
#: 0.36-0.37, 1x256x14x14 0.76 -> 0.67-0.68; but 4x512x7x7 (38 MiB of A) 2.50-2.55 -> 2.63.
SHIFTED_MAX_OUT_PER_GROUP = 128
SHIFTED_WASTE_BUDGET = 20
SHIFTED_MAX_STRIDED_TAPS = 160
SHIFTED_MAX_A_TRAFFIC = 20 * 2**20

#: The forward pass from the padded input writes an output of STREAM_OUTPUT_BYTES or more a block of output rows
#: per task, staged in SHIFTED_STAGING_BYTES of the thread's cache and then streamed out whole cache lines at a
#: time (``_shifted._shifted_gemm_staged``): the tiles' runs of a row start anywhere in a line, and streamed as
#: they come (the lines they cover whole) they gained nothing. Not where that leaves fewer than
#: SHIFTED_STAGED_MIN_TASKS tasks. Measured (float32, 2 threads, one process alternating, ms): the 7x7 stride-2
#: stem 8x3x224x224 -> 64 12.0 -> 10.7-10.8, 32x32x32x32 -> 32 3x3 3.93 -> 3.46.
SHIFTED_STAGING_BYTES = 512 * 2**10
SHIFTED_STAGED_MIN_TASKS = 16

#: Bytes of scratch each thread keeps from one call to the next (``_scratch.py``): packed weights and panels,
#: column buffers, stride phases. Beyond it, scratch is allocated for the call alone. Enough for the column
#: buffer and the stride phases (COLUMN_BUFFER_BYTES each) and the packed weights of a 512x512 3x3 layer.
SCRATCH_CACHE_BYTES = 96 * 2**20

#: ``algorithm="auto"`` computes a grouped convolution by direct loops (``_direct.py``) when each group has at
#: most this many output channels: the GEMM of such a group is too thin to fill the MR x NR register tile.
#: Depthwise convolutions (one output channel per group) always qualify.
DIRECT_MAX_OUT_PER_GROUP = 4

#: ``algorithm="auto"`` takes Winograd F(2x2, 3x3) for a 3x3 stride-1 layer with at least this many input and
#: output channels per group and this many 2x2 output tiles in the batch, per 256 channels beyond 256 (the
#: filters, transformed on every call, grow with channels in times channels out); below, its transforms cost
#: more than the multiplications they save (``_winograd.winograd_pays``). Measured, Winograd's speed-up over the
#: GEMM path with its gathered patches (float32, 2 threads): 512 channels on 7x7 images (16 tiles each), 64
#: tiles 0.87x, 80 tiles 0.72x, 96 tiles 0.92x, 128 tiles 1.08-1.12x, 256 tiles 1.18x; one 14x14 image (49
#: tiles), 512 channels 0.93-0.96x, 256 channels 1.07-1.09x; 256 channels, 64 tiles 1.07x, 98 tiles 1.36x,
#: one 11x11 image (36 tiles) 0.64x; 8 images of 28x28 (1568 tiles), 128 channels 1.40x, 32 channels 1.00x;
#: earlier, 8x28x28 with 16 channels 1.18x, but one 64x64 image (1024 tiles) 0.88x with 16 channels. Of these,
#: the rule misses 512 channels at 96 tiles (Winograd, 0.92x).
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_TILES = 48

#: Small images need no more tiles than that. The forward pass used to ask 2.5 times as many beyond 256
#: channels on outputs under 8 pixels, where three of four tiles overlapped the padding and were read a pixel
#: at a time (on a machine whose matmul reached 450 GFLOP/s, 8x512x7x7: Winograd 5.70-5.96 ms, GEMM
#: 5.05-5.33). Since the padded copy (WINOGRAD_PAD_MAX_SIZE) and the filters stored past the caches, on a
#: machine whose numpy.matmul reaches 200 GFLOP/s (float32, 2 threads, one process alternating, Winograd
#: against GEMM, ms): 512 channels on 7x7 images, 32 tiles 4.84 / 3.33, 64 tiles 6.07 / 6.37, 128 tiles
#: 8.70 / 10.38, 256 tiles 16.0 / 21.4; 8x384x7x7 (128 tiles) 6.73 / 7.07; 512 channels on 14x14, 49 tiles
#: 5.56 / 6.25, 98 tiles 9.39 / 11.42.

#: Transformed filters of at least this many bytes are stored past the caches (``_simd.store_streaming``): an
#: ordinary store first reads the line it writes, and 16 MiB of them (512 x 512 filters) do not stay in cache
#: for the GEMMs anyway. Measured on a machine whose numpy.matmul reaches 200 GFLOP/s (float32, 2 threads):
#: the filter transform alone, 512 x 512 filters 2.35 -> 1.14 ms, 256 x 512 0.50 -> 0.58; conv2d by Winograd,
#: in one process alternating, 8x512x7x7 10.97 -> 9.01 ms, 4x512x7x7 5.75 -> 4.60, 8x256x14x14 (4 MiB) 6.47
#: -> 6.40, 8x64x56x56 (256 KiB) 8.1 -> 9.1.
WINOGRAD_STREAM_FILTERS_BYTES = 8 * 2**20

#: On outputs at most this many pixels high or wide, Winograd reads a zero-padded copy of the input: every
#: tile then lies inside it and is transformed in vectors, where the tiles overlapping the padding (three of
#: four on 7x7 images, a quarter on 28x28) would be read a pixel at a time. Measured on a machine whose
#: numpy.matmul reaches 200 GFLOP/s (float32, 2 threads, conv2d by Winograd, one process alternating, ms):
#: 8x512x7x7 11.6 -> 10.9, 8x256x14x14 8.9 -> 8.5, 8x128x28x28 9.3 -> 8.5, 8x64x56x56 10.5 -> 9.9 (a slow
#: period of the machine); 1x64x224x224 16.8 -> 17.2 (3.5 % of its tiles on the border).
WINOGRAD_PAD_MAX_SIZE = 64

#: The weight gradient of such a layer takes Winograd (``_winograd_grad.py``) from this many 2x2 tiles in the
#: batch, split into at least 4 ranges (one partial sum of 16 x K x C/groups values each): with fewer tiles
#: per range, adding up the partial sums costs more than the multiplications saved. Beyond 128 channels it
#: asks for more tiles, with the square root of the channels (fitted: the GEMM path's gathered patches made
#: it the faster one on 256 channels up to about 500 tiles). Measured against the GEMM path (float32, 2
#: threads): 8x64x56x56 1.34x, 8x128x28x28 1.48x, 4x128x28x28 (784 tiles) 1.43x, 2x128x28x28 (392) 1.55x,
#: 16x128x14x14 1.30x; 8x256x28x28 1.32x, 4x256x28x28 (784) 1.16x, 12x256x14x14 (588) 1.10x, but
#: 8x256x14x14 (392) 0.94-0.96x, 16x512x7x7 (256 tiles) 0.56x, 8x32x56x56 0.75x (too few channels).
WINOGRAD_WEIGHT_GRAD_MIN_TILES = 384

#: The weight gradient is split into at most this many tasks, one serial GEMM each: ranges of its columns
#: when it is wide, else fixed, contiguous ranges of output pixels, each summed into a partial gradient of its
#: own and added in order at the end (see ``_conv_kernels._weight_grad_split``). Parallel with no two threads
#: adding into one element, and the same result whatever the thread count. A few per core balance the load;
#: each pixel range costs one copy of the weight gradient.
WEIGHT_GRAD_CHUNKS = 8

#: The forward pass gathers its patches value by value (``_im2col._gathered_patch_panel``, masked vector gathers)
#: when output rows have at most this many pixels, rather than copying one run per output row and tap
#: (``_patch_panel``), whose bounds cost more than the copy on short rows. Measured, whole conv2d by GEMM
#: (float32, 2 threads), gathered vs runs: 14-pixel rows 9 % faster (8x256x14x14), 16 pixels 12 % (4x4 s2),
#: 20 pixels 11 %, 24 pixels 3-6 %, 28 pixels 3 % faster at stride 2 but 6 % slower at stride 1 (8x128x28x28),
#: 56 pixels 42 % slower, 112 pixels (the 7x7 s2 stem) 25 % slower.
GATHER_MAX_WIDTH = 24

#: col2im (the strided input gradient, conv_transpose2d) splits each plane's rows into blocks until the call has
#: at least this many tasks, so that a batch of few channels (a 3-channel image's gradient) still keeps every
#: thread busy; more tasks than that only add overhead on small planes.
COL2IM_MIN_TASKS = 32

#: The input gradient of a 4x4 stride-2 layer (conv_transpose2d's 4x4 stride-2 forward pass) is computed by
#: Winograd F(2x2, 2x2) on its four stride phases (``_winograd_strided.py``) when each group has at least this many
#: channels of dx (conv_transpose2d's output) and each phase at least this many 2x2 tiles in the batch.
#: Measured against GEMM + col2im (float32, 2 threads, conv_transpose2d, input -> output channels): 8x256x8x8
#: -> 128 1.58-1.76 -> 1.10-1.13 ms, 8x128x16x16 -> 64 1.64-1.76 -> 1.13-1.14, 8x64x32x32 -> 32 2.17-2.39 ->
#: 1.48-1.49, 8x8x32x32 -> 8 0.34 -> 0.25, 8x4x32x32 -> 64 3.2-3.4 -> 1.3; equal at 8 channels out
#: (8x64x32x32 -> 8 0.56-0.57 / 0.55-0.56), slower with fewer (-> 4 0.34-0.35 -> 0.41-0.44, 8x256x16x16 -> 4
#: 0.25-0.26 -> 0.46-0.48); with 64 tiles per phase 16x512x4x4 -> 256 3.4-3.6 -> 2.5-2.6 and 4x256x8x8 ->
#: 128 0.83-0.85 -> 0.57-0.60, with 32 slower (8x512x4x4 -> 256 2.0-2.1 -> 2.3, 2x256x8x8 -> 128 0.48-0.50
#: -> 0.53).
SUBPIXEL_MIN_OUT_CHANNELS = 16
SUBPIXEL_MIN_TILES = 64

#: ``algorithm="auto"`` computes the forward pass of a 4x4 stride-2 layer by Winograd F(2x2, 2x2) over the
#: input's stride phases (``_winograd_strided.py``) with at least this many input and output channels per
#: group and this many 2x2 output tiles in the batch. Measured against the GEMM path (float32, 2 threads,
#: conv2d 4x4 s2 p1, input -> output channels): 8x64x32x32 -> 128 1.50-1.63 -> 0.99-1.08 ms, 8x128x16x16 ->
#: 256 1.38-1.40 -> 1.05-1.09, 8x32x64x64 -> 64 1.72-2.1 -> 1.14-1.26, 1x64x64x64 -> 128 0.73-0.76 ->
#: 0.48-0.50, 8x16x64x64 -> 32 0.60 -> 0.42-0.43, 16x64x16x16 -> 64 (256 tiles) 0.47-0.49 -> 0.35-0.37,
#: 8x64x16x16 -> 64 (128 tiles) 0.26 -> 0.24-0.25, 8x64x32x32 -> 16 0.51 -> 0.26; 8x16x64x64 -> 64 0.89-0.90
#: -> 0.73; slower with fewer channels in (8x8x64x64 -> 64 0.40 -> 0.54, 3 channels 0.21 -> 0.44) or 64 tiles
#: (4x64x16x16 -> 64 0.15 -> 0.19), equal at 8 channels out. The weight gradient of such a layer likewise, with
#: more than 32 filters per group (fewer take the padded-input weight gradient, ``_shifted.py``). Measured
#: against the GEMM path (conv2d_weight, same layers): 8x64x32x32 -> 128 1.75-1.77 -> 1.18-1.29 ms, 8x128x16x16
#: -> 256 1.41-1.42 -> 1.25, 8x32x64x64 -> 64 2.14-2.18 -> 1.51, 1x64x64x64 -> 128 0.85-0.86 -> 0.61-0.72,
#: 8x64x16x16 -> 64 0.50 -> 0.25, 2x64x32x32 -> 128 0.77 -> 0.36, 16x128x16x16 -> 128 1.52-1.55 -> 1.19-1.22,
#: 8x64x32x32 -> 48 0.91 -> 0.63-0.65; slower with 8 input channels (8x8x32x32 -> 64 0.16 -> 0.26), 32 filters
#: (8x16x64x64 -> 32, against the padded input: 0.59-0.62 -> 1.02-1.05) or 32 tiles (8x256x8x8 -> 512 1.43-1.45
#: -> 2.84), equal at 16 input channels.
STRIDED_WINOGRAD_MIN_CHANNELS = 16
STRIDED_WINOGRAD_MIN_TILES = 128

#: The input gradient of a strided layer (and so conv_transpose2d) is computed one stride phase of the input
#: at a time, each a stride-1 convolution by the taps that reach it (``conv._input_grad_by_phases``), where
#: the column matrix's GEMM is shallow, at most PHASES_MAX_FILTERS filters per group (its depth), the phases'
#: convolutions have at least PHASES_MIN_CHANNELS outputs per group, PHASES_MIN_PIXELS pixels per image and
#: PHASES_MIN_POSITIONS over the batch. Elsewhere, a GEMM into a column matrix and col2im.
#: Measured (float32, 2 threads, conv2d_input, ms, col2im -> phases): 8x64x56x56 -> 128 3x3 s2 4.53 -> 3.33,
#: 32x32x32x32 -> 64 3x3 s2 1.97 -> 1.42, 8x64x112x112 -> 64 3x3 s2 10.7 -> 9.9, conv_transpose2d 8x128x28x28 ->
#: 64 3x3 s2 4.31 -> 3.41, 8x64x32x32 -> 32 5x5 s2 5.29 -> 2.52, 4x64x64x64 -> 32 3x3 s2 4.12 -> 3.00; slower
#: with deep GEMMs (8x128x28x28 -> 256 2.99 -> 3.59, 8x256x14x14 -> 512 2.71 -> 4.56, 8x512x4x4 -> 256 4x4
#: conv_transpose2d 2.2 -> 17.5), RGB (the 7x7 s2 stem 10.2 -> 28.8), 14x14 phases (8x128x28x28 -> 128 1.75 ->
#: 2.04, 8x32x28x28 -> 64 0.44 -> 0.47) or 16 channels (8x16x64x64 -> 32 0.51 -> 0.62).
#: The positions, not the flops, tell small problems (in one process, alternating): from 2048 positions phases
#: win or tie whatever the work (16x64x32x32 -> 32, 0.15 GFLOP, 1.55 -> 1.06; 16x32x32x32 -> 32, 0.08 GFLOP,
#: 1.69 -> 0.77; 8x32x32x32 -> 64 1.04 -> 0.68; 1x32x112x112 -> 64 0.77 -> 0.67; 2x64x64x64 -> 64 0.81 -> 0.78;
#: 8x64x32x32 -> 128 1.37 -> 1.42), below they lose whatever the work (1x128x56x56 -> 128, 0.23 GFLOP, 0.90 ->
#: 1.26; 1x64x56x56 -> 128 0.55-0.76 -> 0.74-1.09; 1x64x64x64 -> 64 0.44 -> 0.53; 2x64x32x32 -> 64 0.28 -> 0.40)
#: but for 2x64x56x56 -> 128 (1568 positions, 1.48 -> 1.34).
PHASES_MAX_FILTERS = 128
PHASES_MIN_CHANNELS = 32
PHASES_MIN_PIXELS = 256
PHASES_MIN_POSITIONS = 2048

#: The input gradient (so conv_transpose2d) of at most SWAPPED_MAX_PIXELS output pixels in the batch, in one chunk, with
#: weights of SWAPPED_MIN_WEIGHT_BYTES or more, is computed as ``colᵀ = dyᵀ @ W``
#: (``_conv_kernels._input_grad_swapped_tasks``): W, the large operand, B read straight from its rows (packed
#: per task in float64), where as Wᵀ (A) it is packed transposed, a cache line from each of its rows, each value used
#: for only the few pixels. The same bits either way. Measured in one process, alternating (float32, 2 threads, ms, Wᵀ @
#: dy -> dyᵀ @ W): conv_transpose2d 8x512x4x4 -> 256 4x4 s2 (128 pixels) 4.03 -> 3.53, 1x512x4x4 0.85 -> 0.58,
#: 4x1024x4x4 -> 512 8.53 -> 7.42, 2x256x7x7 -> 128 3x3 s2 0.53 -> 0.46; conv2d_input 2x512x7x7 <- 512 3x3 (98 pixels)
#: 4.14 -> 3.35, 1x256x14x14 <- 512 3x3 s2 1.01 -> 0.88; from 392 pixels even or slower (8x256x7x7 -> 128 3x3 s2 1.76 ->
#: 1.65, 8x512x7x7 -> 256 5.48 -> 5.57, conv2d_input 8x128x14x14 <- 256 s2 1.80 -> 1.87, 784 pixels 4x64x28x28 <- 128 s2
#: 0.84 -> 0.94); slower with small weights, whose transposed packing is cheap (ms, 73 KiB: conv_transpose2d 4x64x8x8 ->
#: 32 3x3 s2 0.19 -> 0.24; 4.6 KiB: conv2d_input 4x8x16x16 <- 16 3x3 s2 0.070 -> 0.081), even at 512 KiB (8x128x4x4 ->
#: 64 4x4 s2 0.394 / 0.395).
SWAPPED_MAX_PIXELS = 256
SWAPPED_MIN_WEIGHT_BYTES = 2**20

#: A call of fewer floating-point operations than this (one convolution's: each gradient of conv2d_backward
#: counts as one) runs its kernels on the calling thread alone (``_parallel.sized``). A parallel loop's second
#: thread, asleep between calls, takes 5-10 us to wake, and a small call makes several such launches. Measured
#: (float32, in one process, alternating, us, 2 threads -> 1): conv2d 1x8x16x16 -> 8 3x3 (0.3 MFLOP) 39.9 ->
#: 31.2, 1x64x8x8 -> 64 1x1 41.2 -> 32.6, 1x3x64x64 -> 16 3x3 s2 45.1 -> 36.3, conv_transpose2d_backward
#: 2x8x8x8 -> 4 3x3 s2 90.4 -> 75.4, 1x16x8x8 -> 8 4x4 s2 114 -> 99, gemm 64^3 20.4 -> 18.2. Near 1 MFLOP
#: it is even (conv2d 1x16x16x16 -> 16 3x3: 40.6 -> 37.8, its weight gradient 61.3 -> 69.2); from 2 MFLOP two
#: threads win (2x16x16x16 -> 16: 42.9 against 45.7 alone; 4x16x16x16: 51.0 against 60.5).
SERIAL_MAX_FLOPS = 1e6
