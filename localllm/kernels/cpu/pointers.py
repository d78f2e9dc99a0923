"""Raw pointers for the matvec kernels, where Numba's array indexing costs vector speed.

Indexing a Numba array with a computed index adds a negative-index fix-up per element, and a
Numba-allocated scratch array makes LLVM guard every vectorized loop with aliasing checks; both
turn 8-lane loads into element-by-element code. A raw pointer indexes with a plain load, and a
stack buffer provably aliases nothing. Kernels validate shapes in Python before using these.
"""

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def stack_pointer(typingctx, size):
    """Pointer to `size` (a compile-time constant) float32 values in the caller's stack frame."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    count = size.literal_value

    def codegen(context, builder, signature, args):
        # alloca_once puts the buffer in the entry block, so a call inside a loop reuses it.
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=count)

    return types.CPointer(types.float32)(size), codegen


@intrinsic
def data_pointer(typingctx, array):
    """Pointer to the first element of a C-contiguous array."""
    if not isinstance(array, types.Array) or array.layout != "C":
        return None

    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data

    return types.CPointer(array.dtype)(array), codegen
