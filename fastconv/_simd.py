"""Kernels written as LLVM vector code, where Numba's loops do not vectorise, and a prefetch hint.

LLVM vectorises a Numba loop when it is long and its arrays cannot overlap. Three hot loops of fastconv are
neither: a GEMM tile only 16 columns wide (LLVM unrolls the 16-column loop first, then vectorises across rows,
with gathers), the Winograd input transform (16 output rows that might alias the input, more runtime
overlap checks than LLVM makes), and col2im's runs of a few to a few dozen values (LLVM's vector loop leaves
up to 15 of them to a scalar one; ``_add_run`` ends with one masked vector instead). They are built from
``<lanes x float>`` values directly, through ``numba.extending.intrinsic``: one AVX-512 register per vector,
unaligned loads and stores, the same arithmetic in the same order as the scalar code they stand for, so
results are the same bits. The narrow tile and ``_add_run`` are here; the input transform
(``_winograd._transform_tile_vector``) is built from the helpers below.
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


def _lane_mask(builder, count, lanes):
    """``<lanes x i1>`` with lane ``i`` set when ``i < count`` (an i64 value)."""
    i64 = ir.IntType(64)
    splat = builder.insert_element(ir.Constant(ir.VectorType(i64, lanes), ir.Undefined), count, ir.IntType(32)(0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))
    return builder.icmp_signed("<", ir.Constant(ir.VectorType(i64, lanes), list(range(lanes))), splat)


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
def _narrow_tile(typingctx, kc, a_panel, a_next, b_panel, tile):
    """``tile[:2*MR, :NARROW] = A~ @ B~[:, :NARROW]`` for two A micro-panels (``a_panel`` on top of ``a_next``,
    kc x MR each) and the first NARROW columns of a kc x NR micro-panel of B.

    A last micro-panel of B with few valid columns (a 392-column B ends with 8) costs the full MR x NR tile in
    the micro-kernel; this tile is 2 * MR rows of NARROW values, 8 vector registers of float32 or 16 of
    float64, with one FMA per row, vector and step in the micro-kernel's order (the same sums, bit for bit).
    ``tile`` points to 2 * MR * NARROW values.
    """
    dtype = b_panel.dtype

    def codegen(context, builder, signature, args):
        kc, _, _, _, tile = args
        a_data = [context.make_array(signature.args[i])(context, builder, args[i]).data for i in (1, 2)]
        b_data = context.make_array(signature.args[3])(context, builder, args[3]).data
        vector, lanes, size = vector_type(context, dtype)
        per_row = NARROW // lanes
        index = ir.IntType(64)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{lanes}f{8 * size}"
        )
        broadcast = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
        accumulators = [  # promoted to registers by LLVM
            cgutils.alloca_once_value(builder, ir.Constant(vector, [0.0] * lanes)) for _ in range(2 * MR * per_row)
        ]
        with cgutils.for_range(builder, kc) as loop:
            b_row = builder.mul(loop.index, index(NR))
            b = [load(builder, vector, b_data, builder.add(b_row, index(v * lanes)), size) for v in range(per_row)]
            for half in range(2):
                a_row = builder.gep(a_data[half], [builder.mul(loop.index, index(MR))])
                for i in range(MR):
                    a = builder.load(builder.gep(a_row, [index(i)]))
                    a = builder.insert_element(ir.Constant(vector, ir.Undefined), a, ir.IntType(32)(0))
                    a = builder.shuffle_vector(a, a, broadcast)
                    for v in range(per_row):
                        accumulator = accumulators[(half * MR + i) * per_row + v]
                        builder.store(builder.call(fma, [a, b[v], builder.load(accumulator)]), accumulator)
        for row in range(2 * MR):
            for v in range(per_row):
                store(builder, builder.load(accumulators[row * per_row + v]), tile, row * NARROW + v * lanes, size)
        return context.get_dummy_value()

    return types.none(kc, a_panel, a_next, b_panel, tile), codegen


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


@intrinsic
def _add_run(typingctx, target, target_start, source, source_start, length):
    """``target[target_start:][:length] += source[source_start:][:length]`` through two pointers: whole vectors,
    then the last 1 to lanes - 1 values as one masked vector (no scalar loop, no access past the run).

    Measured, col2im of conv_transpose2d 8x128x16x16 -> 64, 4x4 s2 (runs of 15 and 16 values): 0.41 -> 0.31 ms
    against LLVM's own vector loop, in the same kernel.
    """
    dtype = target.dtype

    def codegen(context, builder, signature, args):
        target, target_start, source, source_start, length = args
        vector, lanes, size = vector_type(context, dtype)
        index, int32 = ir.IntType(64), ir.IntType(32)
        mask_type, pointer_type = ir.VectorType(ir.IntType(1), lanes), vector.as_pointer()
        suffix = f"v{lanes}f{8 * size}.p0"
        masked_load = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vector, [pointer_type, int32, mask_type, vector]),
            "llvm.masked.load." + suffix,
        )
        masked_store = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [vector, pointer_type, int32, mask_type]),
            "llvm.masked.store." + suffix,
        )
        target = builder.gep(target, [target_start])
        source = builder.gep(source, [source_start])
        whole = builder.udiv(length, index(lanes))
        with cgutils.for_range(builder, whole) as loop:
            offset = builder.mul(loop.index, index(lanes))
            values = [load(builder, vector, pointer, offset, size) for pointer in (target, source)]
            store(builder, builder.fadd(*values), target, offset, size)
        offset = builder.mul(whole, index(lanes))
        rest = builder.sub(length, offset)
        with builder.if_then(builder.icmp_signed(">", rest, index(0))):
            mask = _lane_mask(builder, rest, lanes)
            zero = ir.Constant(vector, [0.0] * lanes)
            addresses = [builder.bitcast(builder.gep(p, [offset]), pointer_type) for p in (target, source)]
            values = [builder.call(masked_load, [a, int32(size), mask, zero]) for a in addresses]
            builder.call(masked_store, [builder.fadd(*values), addresses[0], int32(size), mask])
        return context.get_dummy_value()

    return types.none(target, target_start, source, source_start, length), codegen
