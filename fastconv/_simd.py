"""Kernels written as LLVM vector code, where Numba's loops do not vectorise, and a prefetch hint.

LLVM vectorises a Numba loop when it is long and its arrays cannot overlap. Four hot loops of fastconv are
neither: a GEMM tile only 16 columns wide (LLVM unrolls the 16-column loop first, then vectorises across rows,
with gathers), the Winograd input transform (16 output rows that might alias the input, more runtime
overlap checks than LLVM makes), runs of a few to a few dozen values (col2im's, the packers', the direct
kernel's rows: LLVM's vector loop leaves up to 15 of them to a scalar one; ``_add_run`` and ``_copy_run`` end
with one masked vector instead), and the patch packers' gathers of values spread over the image
(``_gather_taps``). They are built from ``<lanes x float>`` values directly, through
``numba.extending.intrinsic``: one AVX-512 register per vector, unaligned loads and stores, the same
arithmetic in the same order as the scalar code they stand for, so results are the same bits. The narrow
tile, the runs and the gathers are here; the Winograd transforms (``_winograd._transform_tile_vector``,
``_winograd._output_tiles_vector``) are built from the helpers below, masked loads and stores for a last,
partial vector among them.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import MR, NR

#: Columns of the narrow micro-kernel, for a last micro-panel of B with at most this many valid columns.
NARROW = 16

_VECTOR_BYTES = 64  # an AVX-512 register


def vector_type(context, dtype):
    """``(<lanes x dtype>, lanes, bytes per value)`` for one vector register of ``dtype``."""
    element = context.get_data_type(dtype)
    size = context.get_abi_sizeof(element)
    lanes = _VECTOR_BYTES // size
    return ir.VectorType(element, lanes), lanes, size


def load(builder, vector, pointer, offset, size):
    """The vector at ``pointer + offset`` (in values), unaligned."""
    address = builder.gep(pointer, [ir.IntType(64)(offset) if isinstance(offset, int) else offset])
    return builder.load(builder.bitcast(address, vector.as_pointer()), align=size)


def store(builder, value, pointer, offset, size):
    """Store the vector ``value`` at ``pointer + offset`` (in values), unaligned."""
    address = builder.gep(pointer, [ir.IntType(64)(offset) if isinstance(offset, int) else offset])
    builder.store(value, builder.bitcast(address, value.type.as_pointer()), align=size)


def store_streaming(builder, value, pointer, offset, size):
    """Store the vector ``value`` at ``pointer + offset`` (in values) past the caches (a non-temporal store, no
    read of the lines first) where that address is a multiple of a vector register's width, as such stores
    need; elsewhere an ordinary store. The stores are weakly ordered: ``_store_fence`` before they are read."""
    address = builder.gep(pointer, [ir.IntType(64)(offset) if isinstance(offset, int) else offset])
    target = builder.bitcast(address, value.type.as_pointer())
    misaligned = builder.and_(builder.ptrtoint(address, ir.IntType(64)), ir.IntType(64)(_VECTOR_BYTES - 1))
    with builder.if_else(builder.icmp_unsigned("==", misaligned, ir.IntType(64)(0))) as (aligned, other):
        with aligned:
            streamed = builder.store(value, target, align=_VECTOR_BYTES)
            streamed.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        with other:
            builder.store(value, target, align=size)


@intrinsic
def _store_fence(typingctx):
    """``sfence``: the non-temporal stores this thread made before it (``store_streaming``) reach memory before
    any store after it, so that another thread which sees the later ones reads them."""

    def codegen(context, builder, signature, args):
        no_arguments = ir.FunctionType(ir.VoidType(), [])
        builder.call(cgutils.get_or_insert_function(builder.module, no_arguments, "llvm.x86.sse.sfence"), [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _stream_row(typingctx, target, target_start, tile, row):
    """``target[target_start : target_start + NR] = tile[row * NR : (row + 1) * NR]``, stored past the caches
    (``store_streaming``): row ``row`` of a register tile (``tile`` a pointer to it) into C (``target`` a
    pointer to its data). The caller fences the stores (``_store_fence``) before C is read."""

    def codegen(context, builder, signature, args):
        target, target_start, tile, row = args
        vector, lanes, size = vector_type(context, signature.args[0].dtype)
        source = builder.gep(tile, [builder.mul(row, ir.IntType(64)(NR))])
        for v in range(0, NR, lanes):
            value = load(builder, vector, source, v, size)
            store_streaming(builder, value, target, builder.add(target_start, ir.IntType(64)(v)), size)
        return context.get_dummy_value()

    return types.none(target, target_start, tile, row), codegen


@intrinsic
def _stream_vectors(typingctx, target, target_start, source, source_start, count):
    """``count`` vector registers of values from ``source + source_start`` stored at ``target + target_start``
    past the caches (``store_streaming``; ``target`` and ``source`` pointers, ``target + target_start`` best on a
    cache line). The caller fences the stores (``_store_fence``) before they are read."""

    def codegen(context, builder, signature, args):
        target, target_start, source, source_start, count = args
        vector, lanes, size = vector_type(context, signature.args[0].dtype)
        with cgutils.for_range(builder, count) as loop:
            offset = builder.mul(loop.index, ir.IntType(64)(lanes))
            value = load(builder, vector, source, builder.add(source_start, offset), size)
            store_streaming(builder, value, target, builder.add(target_start, offset), size)
        return context.get_dummy_value()

    return types.none(target, target_start, source, source_start, count), codegen


def deinterleaved_columns(context, builder, dtype, row, count, valid=None):
    """The first ``count`` of the vectors of columns ``2l``, ``2l + 1``, ``2l + 2``, ``2l + 3`` (lane ``l``) from
    the pointer ``row``: two double-width loads, at 0 and 2, each split into its even and odd values. A vector
    register of Winograd tiles reads each of its rows so (``_winograd``, ``_winograd_strided``). Given
    ``valid`` (an i64 value), only lanes below it are read, the others are 0: nothing past them is touched."""
    vector, lanes, size = vector_type(context, dtype)
    double = ir.VectorType(vector.element, 2 * lanes)
    mask = None if valid is None else _lane_mask(builder, builder.mul(valid, ir.IntType(64)(2)), 2 * lanes)
    out = []
    for offset in (0, 2):
        if mask is None:
            value = load(builder, double, row, offset, size)
        else:
            value = _masked_load(builder, double, size, row, ir.IntType(64)(offset), mask)
        out += even_odd(builder, value)
    return out[:count]


def even_odd(builder, value):
    """``[even lanes, odd lanes]`` of a vector of ``2n`` lanes, as two vectors of ``n``: a row of pairs split
    into its two columns."""
    lanes = value.type.count // 2
    columns = ir.VectorType(ir.IntType(32), lanes)
    return [builder.shuffle_vector(value, value, ir.Constant(columns, list(range(k, 2 * lanes, 2)))) for k in (0, 1)]


def interleaved(builder, first, second, width=1):
    """Two vectors of ``n`` lanes as one of ``2n``: ``width`` lanes of ``first``, ``width`` of ``second``, in
    turn (with width 1, lane by lane)."""
    n = first.type.count
    order = [lane // (2 * width) * width + lane % width + lane // width % 2 * n for lane in range(2 * n)]
    return builder.shuffle_vector(first, second, ir.Constant(ir.VectorType(ir.IntType(32), 2 * n), order))


def _splat(builder, value, lanes):
    """A vector of ``lanes`` copies of the scalar ``value``."""
    vector = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.IntType(32)(0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _accumulators(builder, vector, count):
    """``(fma, accumulators)``: the ``llvm.fma`` of ``vector`` and ``count`` zeroed vector slots on the stack,
    which LLVM promotes to registers: a register tile's accumulators."""
    lanes = vector.count
    name = f"llvm.fma.v{lanes}f{64 if isinstance(vector.element, ir.DoubleType) else 32}"
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3), name)
    zero = ir.Constant(vector, [0.0] * lanes)
    return fma, [cgutils.alloca_once_value(builder, zero) for _ in range(count)]


def _add_outer_product(builder, fma, accumulators, scalars, vectors):
    """``accumulators[i * len(vectors) + k] += scalars[i] * vectors[k]``, each scalar broadcast to every lane:
    one step of a register tile of outer products (``_accumulators``)."""
    lanes = vectors[0].type.count
    for i, scalar in enumerate(scalars):
        broadcast = _splat(builder, scalar, lanes)
        for k, value in enumerate(vectors):
            accumulator = accumulators[i * len(vectors) + k]
            builder.store(builder.call(fma, [broadcast, value, builder.load(accumulator)]), accumulator)


def _store_accumulators(builder, accumulators, pointer, size):
    """Store a register tile's accumulators one after the other from ``pointer``."""
    for k, accumulator in enumerate(accumulators):
        value = builder.load(accumulator)
        store(builder, value, pointer, k * value.type.count, size)


def _lane_mask(builder, count, lanes):
    """``<lanes x i1>`` with lane ``i`` set when ``i < count`` (an i64 value)."""
    lane = ir.Constant(ir.VectorType(ir.IntType(64), lanes), list(range(lanes)))
    return builder.icmp_signed("<", lane, _splat(builder, count, lanes))


def _masked_load(builder, vector, size, pointer, offset, mask):
    """``llvm.masked.load`` of a ``vector`` at ``pointer + offset``: lanes off in ``mask`` are 0, not read."""
    lanes, int32 = vector.count, ir.IntType(32)
    function = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(vector, [vector.as_pointer(), int32, ir.VectorType(ir.IntType(1), lanes), vector]),
        f"llvm.masked.load.v{lanes}f{8 * size}.p0",
    )
    address = builder.bitcast(builder.gep(pointer, [offset]), vector.as_pointer())
    return builder.call(function, [address, int32(size), mask, ir.Constant(vector, [0.0] * lanes)])


def _masked_store(builder, value, size, pointer, offset, mask):
    """``llvm.masked.store`` of the vector ``value`` at ``pointer + offset``: lanes off in ``mask`` are not
    written."""
    vector = value.type
    lanes, int32 = vector.count, ir.IntType(32)
    function = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VoidType(), [vector, vector.as_pointer(), int32, ir.VectorType(ir.IntType(1), lanes)]),
        f"llvm.masked.store.v{lanes}f{8 * size}.p0",
    )
    address = builder.bitcast(builder.gep(pointer, [offset]), vector.as_pointer())
    builder.call(function, [value, address, int32(size), mask])


def _gather(builder, vector, size, addresses, mask):
    """``llvm.masked.gather`` of a ``vector`` from ``addresses``, a vector of i64 addresses (llvmlite's gep
    takes no vector of indices): lanes off in ``mask`` are 0 and not read."""
    lanes = vector.count
    pointers = ir.VectorType(vector.element.as_pointer(), lanes)
    mask_type, int32 = ir.VectorType(ir.IntType(1), lanes), ir.IntType(32)
    function = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(vector, [pointers, int32, mask_type, vector]),
        f"llvm.masked.gather.v{lanes}f{8 * size}.v{lanes}p0",
    )
    zero = ir.Constant(vector, [0.0] * lanes)
    return builder.call(function, [builder.inttoptr(addresses, pointers), int32(size), mask, zero])


class Vector:
    """An LLVM vector value whose ``+`` and ``-`` emit ``fadd`` and ``fsub``: the transforms written for Numba's
    scalars (``_winograd._bt_d_b``) build vector code when given these."""

    def __init__(self, builder, value):
        self.builder, self.value = builder, value

    def __add__(self, other):
        return Vector(self.builder, self.builder.fadd(self.value, other.value))

    def __sub__(self, other):
        return Vector(self.builder, self.builder.fsub(self.value, other.value))


@intrinsic
def _narrow_tile(typingctx, kc, a_panel, a_next, b_panel, b_stride, tile):
    """``tile[:2*MR, :NARROW] = A~ @ B~[:, :NARROW]`` for two A micro-panels (``a_panel`` on top of ``a_next``,
    kc x MR each) and the first NARROW columns of a micro-panel of B: kc rows of NR values, ``b_stride`` apart
    (NR where packed).

    A last micro-panel of B with few valid columns (a 392-column B ends with 8) costs the full MR x NR tile in
    the micro-kernel; this tile is 2 * MR rows of NARROW values, 8 vector registers of float32 or 16 of
    float64, with one FMA per row, vector and step in the micro-kernel's order (the same sums, bit for bit).
    ``tile`` points to 2 * MR * NARROW values.
    """
    dtype = b_panel.dtype

    def codegen(context, builder, signature, args):
        kc, _, _, _, b_stride, tile = args
        a_data = [context.make_array(signature.args[i])(context, builder, args[i]).data for i in (1, 2)]
        b_data = context.make_array(signature.args[3])(context, builder, args[3]).data
        vector, lanes, size = vector_type(context, dtype)
        per_row = NARROW // lanes
        index = ir.IntType(64)
        fma, accumulators = _accumulators(builder, vector, 2 * MR * per_row)
        with cgutils.for_range(builder, kc) as loop:
            b_row = builder.mul(loop.index, b_stride)
            b = [load(builder, vector, b_data, builder.add(b_row, index(v * lanes)), size) for v in range(per_row)]
            a_rows = [builder.gep(a_data[half], [builder.mul(loop.index, index(MR))]) for half in range(2)]
            a = [builder.load(builder.gep(row, [index(i)])) for row in a_rows for i in range(MR)]
            _add_outer_product(builder, fma, accumulators, a, b)
        _store_accumulators(builder, accumulators, tile, size)  # row by row: NARROW values a row
        return context.get_dummy_value()

    return types.none(kc, a_panel, a_next, b_panel, b_stride, tile), codegen


@intrinsic
def _prefetch(typingctx, pointer, offset):
    """Hint that the cache line holding ``pointer[offset]`` will be read soon (``llvm.prefetch``, into L1)."""

    def codegen(context, builder, signature, args):
        pointer, offset = args
        i8_pointer = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [i8_pointer, ir.IntType(32), ir.IntType(32), ir.IntType(32)]),
            "llvm.prefetch.p0",
        )
        address = builder.bitcast(builder.gep(pointer, [offset]), i8_pointer)
        builder.call(fn, [address, ir.IntType(32)(0), ir.IntType(32)(3), ir.IntType(32)(1)])
        return context.get_dummy_value()

    return types.none(pointer, offset), codegen


def _run_codegen(dtype, add):
    """Code for ``target[:length] (+)= source[:length]`` (``_add_run``, ``_copy_run``): whole vectors, then the
    last 1 to lanes - 1 values as one masked vector (no scalar loop, no access past the run)."""

    def codegen(context, builder, signature, args):
        target, target_start, source, source_start, length = args
        vector, lanes, size = vector_type(context, dtype)
        index, int32 = ir.IntType(64), ir.IntType(32)
        mask_type, pointer_type = ir.VectorType(ir.IntType(1), lanes), vector.as_pointer()
        masked_store = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [vector, pointer_type, int32, mask_type]),
            f"llvm.masked.store.v{lanes}f{8 * size}.p0",
        )
        target = builder.gep(target, [target_start])
        source = builder.gep(source, [source_start])
        whole = builder.udiv(length, index(lanes))
        with cgutils.for_range(builder, whole) as loop:
            offset = builder.mul(loop.index, index(lanes))
            value = load(builder, vector, source, offset, size)
            if add:
                value = builder.fadd(load(builder, vector, target, offset, size), value)
            store(builder, value, target, offset, size)
        offset = builder.mul(whole, index(lanes))
        rest = builder.sub(length, offset)
        with builder.if_then(builder.icmp_signed(">", rest, index(0))):
            mask = _lane_mask(builder, rest, lanes)
            value = _masked_load(builder, vector, size, source, offset, mask)
            if add:
                value = builder.fadd(_masked_load(builder, vector, size, target, offset, mask), value)
            to = builder.bitcast(builder.gep(target, [offset]), pointer_type)
            builder.call(masked_store, [value, to, int32(size), mask])
        return context.get_dummy_value()

    return codegen


@intrinsic
def _add_run(typingctx, target, target_start, source, source_start, length):
    """``target[target_start:][:length] += source[source_start:][:length]`` through two pointers, in vectors
    (``_run_codegen``).

    Measured, col2im of conv_transpose2d 8x128x16x16 -> 64, 4x4 s2 (runs of 15 and 16 values): 0.41 -> 0.31 ms
    against LLVM's own vector loop, in the same kernel.
    """
    signature = types.none(target, target_start, source, source_start, length)
    return signature, _run_codegen(target.dtype, add=True)


@intrinsic
def _copy_run(typingctx, target, target_start, source, source_start, length):
    """``target[target_start:][:length] = source[source_start:][:length]``, as ``_add_run``: the direct kernel's
    rows of a few pixels, which LLVM's vector loop leaves to its scalar one whole."""
    signature = types.none(target, target_start, source, source_start, length)
    return signature, _run_codegen(target.dtype, add=False)


@intrinsic
def _deinterleave_run(typingctx, first, first_start, second, second_start, source, source_start, pairs):
    """``first[first_start + j] = source[source_start + 2j]`` and ``second[second_start + j] = source[source_start
    + 2j + 1]`` for ``j < pairs`` (three pointers): a row split into its even and odd columns, two vectors from
    each double-width load, the last 1 to lanes - 1 pairs by masked loads and stores (``_run_codegen``'s way)."""
    dtype = source.dtype

    def codegen(context, builder, signature, args):
        first, first_start, second, second_start, source, source_start, pairs = args
        vector, lanes, size = vector_type(context, dtype)
        double = ir.VectorType(vector.element, 2 * lanes)
        index = ir.IntType(64)
        first, second = builder.gep(first, [first_start]), builder.gep(second, [second_start])
        source = builder.gep(source, [source_start])
        whole = builder.udiv(pairs, index(lanes))
        with cgutils.for_range(builder, whole) as loop:
            j = builder.mul(loop.index, index(lanes))
            value = load(builder, double, source, builder.mul(j, index(2)), size)
            for column, to in zip(even_odd(builder, value), (first, second)):
                store(builder, column, to, j, size)
        j = builder.mul(whole, index(lanes))
        rest = builder.sub(pairs, j)
        with builder.if_then(builder.icmp_signed(">", rest, index(0))):
            pairs_mask = _lane_mask(builder, builder.mul(rest, index(2)), 2 * lanes)
            value = _masked_load(builder, double, size, source, builder.mul(j, index(2)), pairs_mask)
            mask = _lane_mask(builder, rest, lanes)
            for column, to in zip(even_odd(builder, value), (first, second)):
                _masked_store(builder, column, size, to, j, mask)
        return context.get_dummy_value()

    return types.none(first, first_start, second, second_start, source, source_start, pairs), codegen


@intrinsic
def _gather_taps(typingctx, panel, panel_start, x, pixel, offsets, h_offsets, w_offsets, first, h, w, H, W):
    """One row of a patch panel, NR values gathered with masks: in the weight gradient's transposed panel the
    NR taps of one output pixel, in the forward pass's gathered panel one tap at NR pixels.

    For ``t = first + j``, ``j < NR``: ``panel[panel_start + j] = x[pixel + offsets[t]]`` when the input pixel
    ``(h + h_offsets[t], w + w_offsets[t])`` lies inside ``H x W``, else 0 (and ``x`` is not read). All
    arguments but ``panel`` and ``x`` (pointers) are int64, the three tables pointers to int64.

    Measured, packing a weight gradient's B (one thread, ns per value, this against the former copy of four
    taps at a time plus borders value by value): 8x512x7x7 3x3 2.97 -> 0.39, 8x256x14x14 1.70 -> 0.43,
    8x64x32x32 4x4 s2 1.48 -> 0.34, 8x64x56x56 0.61 -> 0.37, 8x3x224x224 7x7 s2 0.52 -> 0.44; the forward
    pass by GEMM on 7x7 images, against LLVM's own gathers: 5.55-5.74 -> 4.62-4.79 ms (8x512x7x7).
    """
    dtype = panel.dtype

    def codegen(context, builder, signature, args):
        panel, panel_start, x, pixel, offsets, h_offsets, w_offsets, first, h, w, H, W = args
        vector, lanes, size = vector_type(context, dtype)
        index = ir.IntType(64)
        indices = ir.VectorType(index, lanes)
        base = _splat(builder, builder.ptrtoint(builder.gep(x, [pixel]), index), lanes)
        h, w, H, W = (_splat(builder, value, lanes) for value in (h, w, H, W))
        step = _splat(builder, index(size), lanes)
        for v in range(NR // lanes):
            tap = builder.add(first, index(v * lanes))
            row, column = (
                builder.add(o, load(builder, indices, t, tap, 8)) for o, t in ((h, h_offsets), (w, w_offsets))
            )
            # Unsigned: a negative row or column is out of range too.
            inside = builder.and_(builder.icmp_unsigned("<", row, H), builder.icmp_unsigned("<", column, W))
            address = builder.add(base, builder.mul(load(builder, indices, offsets, tap, 8), step))
            values = _gather(builder, vector, size, address, inside)
            store(builder, values, panel, builder.add(panel_start, index(v * lanes)), size)
        return context.get_dummy_value()

    return types.none(panel, panel_start, x, pixel, offsets, h_offsets, w_offsets, first, h, w, H, W), codegen


def _tap_filter_tile(taps, vectors):
    """An intrinsic ``(x, x0, offsets, t0, dy, d0, blocks, x_steps, d_steps, length, d_stride, out)`` that writes
    into ``out`` a tile of the weight gradient, ``taps`` taps by ``vectors`` vector registers of filters::

        out[(i * vectors + k) * lanes + f] = sum over block < blocks[0], row < blocks[1], q < length of
            x[x0 + offsets[min(t0 + i, len(offsets) - 1)] + block * x_steps[0] + row * x_steps[1] + q]
            * dy[d0 + block * d_steps[0] + row * d_steps[1] + q * d_stride + k * lanes + f]

    ``x`` is the padded input (tap ``t`` of an output pixel read at ``offsets[t]`` from it, ``_shifted``), ``dy``
    the output gradient with its filters side by side, pixel by pixel (``d_stride`` apart). Each step of ``q``
    broadcasts one value of each tap and loads ``vectors`` vectors of filters: an outer product into
    ``taps * vectors`` accumulators held in registers over every row and block (taps past the last are the
    last again; the caller drops their sums). No masked lanes, no lane sums: the vectors run along the
    filters, whatever the width of the rows."""

    def typer(typingctx, x, x0, offsets, t0, dy, d0, blocks, x_steps, d_steps, length, d_stride, out):
        dtype = x.dtype

        def codegen(context, builder, signature, args):
            x, x0, offsets, t0, dy, d0, blocks, x_steps, d_steps, length, d_stride, out = args
            (images, rows), (x_image, x_row), (d_image, d_row) = (
                cgutils.unpack_tuple(builder, pair, 2) for pair in (blocks, x_steps, d_steps)
            )
            vector, lanes, size = vector_type(context, dtype)
            index = ir.IntType(64)
            x_data, d_data, out_data = (
                context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 4, 11)
            )
            tap_offsets = context.make_array(signature.args[2])(context, builder, offsets)
            last = builder.sub(cgutils.unpack_tuple(builder, tap_offsets.shape, 1)[0], index(1))
            x_first = []
            for i in range(taps):
                tap = builder.add(t0, index(i))
                tap = builder.select(builder.icmp_signed("<", tap, last), tap, last)
                offset = builder.load(builder.gep(tap_offsets.data, [tap]))
                x_first.append(builder.gep(x_data, [builder.add(x0, offset)]))
            d_first = builder.gep(d_data, [d0])
            fma, accumulators = _accumulators(builder, vector, taps * vectors)
            with cgutils.for_range(builder, images) as image:
                x_image_start = [builder.gep(p, [builder.mul(image.index, x_image)]) for p in x_first]
                d_image_start = builder.gep(d_first, [builder.mul(image.index, d_image)])
                with cgutils.for_range(builder, rows) as row:
                    # The row's pointers once, so that the loop along it holds only them and q in registers.
                    x_here = [builder.gep(p, [builder.mul(row.index, x_row)]) for p in x_image_start]
                    d_here = builder.gep(d_image_start, [builder.mul(row.index, d_row)])
                    with cgutils.for_range(builder, length) as step:
                        filters = builder.mul(step.index, d_stride)
                        d_values = [
                            load(builder, vector, d_here, builder.add(filters, index(k * lanes)), size)
                            for k in range(vectors)
                        ]
                        x_values = [builder.load(builder.gep(p, [step.index])) for p in x_here]
                        _add_outer_product(builder, fma, accumulators, x_values, d_values)
            _store_accumulators(builder, accumulators, out_data, size)
            return context.get_dummy_value()

        signature = types.none(x, x0, offsets, t0, dy, d0, blocks, x_steps, d_steps, length, d_stride, out)
        return signature, codegen

    return intrinsic(typer)


def _pixel_filter_tile(pixels, vectors, step):
    """An intrinsic ``(x, x0, taps, w, w0, w_stride, out)`` that writes into ``out`` a tile of a convolution's
    output, ``pixels`` output pixels of a row by ``vectors`` vector registers of filters::

        out[(i * vectors + k) * lanes + f] = sum over t < len(taps) of
            x[x0 + taps[t] + i * step] * w[w0 + t * w_stride + k * lanes + f]

    ``x`` is the padded input (pixel ``i`` of the tile read ``step`` values after pixel ``i - 1``: the stride,
    a constant here, so that one pointer and immediate offsets address every pixel), ``taps`` the offset of
    each tap from a pixel's first, and ``w`` the filters with each tap's side by side (``w_stride`` apart). Each
    tap broadcasts one value per pixel into an outer product with ``vectors`` vectors of filters:
    ``_tap_filter_tile`` with pixels in the place of taps, summing over the taps instead of the pixels."""

    def typer(typingctx, x, x0, taps, w, w0, w_stride, out):
        dtype = x.dtype

        def codegen(context, builder, signature, args):
            x, x0, taps, w, w0, w_stride, out = args
            vector, lanes, size = vector_type(context, dtype)
            index = ir.IntType(64)
            x_data, w_data, out_data = (
                context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 3, 6)
            )
            tap_offsets = context.make_array(signature.args[2])(context, builder, taps)
            count = cgutils.unpack_tuple(builder, tap_offsets.shape, 1)[0]
            x_first, w_first = builder.gep(x_data, [x0]), builder.gep(w_data, [w0])
            fma, accumulators = _accumulators(builder, vector, pixels * vectors)
            with cgutils.for_range(builder, count) as tap:
                here = builder.gep(x_first, [builder.load(builder.gep(tap_offsets.data, [tap.index]))])
                filters = builder.mul(tap.index, w_stride)
                w_values = [
                    load(builder, vector, w_first, builder.add(filters, index(k * lanes)), size) for k in range(vectors)
                ]
                x_values = [builder.load(builder.gep(here, [index(i * step)])) for i in range(pixels)]
                _add_outer_product(builder, fma, accumulators, x_values, w_values)
            _store_accumulators(builder, accumulators, out_data, size)
            return context.get_dummy_value()

        return types.none(x, x0, taps, w, w0, w_stride, out), codegen

    return intrinsic(typer)


def transpose_lanes(builder, rows):
    """The transpose of a square block held as ``lanes`` vectors of ``lanes`` values: vector ``i`` of the
    result holds lane ``i`` of every input vector. A butterfly: at each step, vectors ``b`` apart swap
    blocks of ``b`` lanes (two-input shuffles, ``lanes * log2(lanes)`` of them)."""
    lanes = len(rows)
    rows = list(rows)
    b = 1
    while b < lanes:
        first = ir.Constant(
            ir.VectorType(ir.IntType(32), lanes), [lane if not lane & b else lanes + lane - b for lane in range(lanes)]
        )
        second = ir.Constant(
            ir.VectorType(ir.IntType(32), lanes), [lane + b if not lane & b else lanes + lane for lane in range(lanes)]
        )
        for i in range(lanes):
            if not i & b:
                x, y = rows[i], rows[i + b]
                rows[i], rows[i + b] = builder.shuffle_vector(x, y, first), builder.shuffle_vector(x, y, second)
        b *= 2
    return rows


@intrinsic
def _transposed_block(typingctx, panel, panel_start, panel_stride, source, source_start, source_stride, rows):
    """``panel[panel_start + p * panel_stride + j] = source[source_start + j * source_stride + p]`` for ``p, j <
    lanes`` (16 float32 or 8 float64): a square block of a matrix stored by rows, written transposed; rows ``j
    >= rows`` of ``source`` are not read, their values written as 0. Packs a micro-panel of a B stored
    transposed (``_gemm._pack_b_panel_transposed``): ``lanes`` loads, ``lanes * log2(lanes)`` shuffles and
    ``lanes`` stores for ``lanes**2`` values, where a copy value by value or gathers cost a load each."""
    dtype = panel.dtype

    def codegen(context, builder, signature, args):
        panel, panel_start, panel_stride, source, source_start, source_stride, rows = args
        vector, lanes, size = vector_type(context, dtype)
        index = ir.IntType(64)
        source = builder.gep(source, [source_start])
        panel = builder.gep(panel, [panel_start])
        values = []
        for j in range(lanes):
            slot = cgutils.alloca_once_value(builder, ir.Constant(vector, [0.0] * lanes))
            with builder.if_then(builder.icmp_signed("<", index(j), rows), likely=True):
                builder.store(load(builder, vector, source, builder.mul(index(j), source_stride), size), slot)
            values.append(builder.load(slot))
        for p, value in enumerate(transpose_lanes(builder, values)):
            store(builder, value, panel, builder.mul(index(p), panel_stride), size)
        return context.get_dummy_value()

    signature = types.none(panel, panel_start, panel_stride, source, source_start, source_stride, rows)
    return signature, codegen
