"""Offload of heavy operators to the vendor kernels libtorch ships (oneDNN, MKL, cuDNN, cuBLAS).

TVM's untuned kernels for convolutions and matrix products are far slower than the vendor
libraries that libtorch already ships, on CPU and on CUDA. This pass rewrites them into
``R.call_pure_packed`` calls of the functions registered by the runtime library
(``src/contrib/torch/vendor_kernels.cc``; linear layers in ``linear_kernels.cc``):

* on CPU, ``conv2d`` (+ bias) (+ ReLU, ReLU6, SiLU, sigmoid, tanh, hardswish or hardsigmoid)
  (+ residual add) (+ ReLU) -> ``tvm_torch.conv2d_nhwc`` /
  ``tvm_torch.conv2d_add_nhwc`` on oneDNN, in NHWC (the graph's convolutions are switched to
  NHWC first; elementwise ops and pooling follow), or, for the 1x1 convolution of a 1x1 image
  with fewer than 64K weights (squeeze-excite gates), ``tvm_torch.matmul_bias`` (MKL). The
  weight goes through ``tvm_torch.conv2d_nhwc_prepack``, which ``LiftTransformParams`` moves
  into ``main_transform_params``: the runtime prepares every weight once, at the first call,
  and runs each float32 or bfloat16 chain as one oneDNN primitive on its own oneDNN
  (``src/contrib/torch/onednn_conv.cc``; else as a compiled oneDNN Graph partition inside
  libtorch, ``onednn_graph_conv.cc``); :func:`destination_passing_pass` makes the calls
  write into memory the program plans. CPU ``conv1d`` (Whisper's, Wav2Vec's)
  becomes such a conv2d of height 1 first. Convolutions
  whose tuned TVM kernel was measured faster (``tvm_wins``: :mod:`.vendor_choice`) stay TVM
  code.
* ``layer_norm`` (trailing axes) and ``softmax`` -> ``tvm_torch.layer_norm`` /
  ``tvm_torch.softmax`` (ATen's kernels), on CPU and CUDA; on CPU, a softmax that only
  matrix products read (attention's probabilities) -> ``tvm_torch.softmax_probabilities``,
  which sets its subnormal results to 0 (GEMMs are 10-50x slower on them). On CPU, Hugging
  Face's RMS norm (``weight * (x * rsqrt(mean(x * x) + eps))``, float32) ->
  ``tvm_torch.rms_norm`` (ATen's, bit for bit as the module computes it).
* ``mean`` over leading axes only (global pooling in NHWC; CPU, float32, 4096+ elements) ->
  ``tvm_torch.mean`` (ATen's vectorised reduction).
* ``max_pool2d`` / ``avg_pool2d`` in NHWC (CPU, symmetric padding, no dilation for average)
  -> ``tvm_torch.max_pool2d_nhwc`` / ``tvm_torch.avg_pool2d_nhwc`` (ATen's channels-last
  kernels; TVM's default schedules for them are ~10x slower).
* ``gelu``, ``gelu_tanh``, ``sigmoid``, ``tanh``, ``silu``, ``exp`` on CPU (float32, 4096+
  elements) -> ``tvm_torch.unary`` (ATen's vectorised kernels; TVM's default code calls scalar
  libm for them, 10-30x slower).
* ``matmul`` with a constant right-hand side (a linear layer) (+ bias) on CPU ->
  ``tvm_torch.linear`` with the weight prepacked once (at the first call)
  (``tvm_torch.linear_prepack``, lifted like the convolutions' prepack), with GELU (erf or
  tanh), SiLU, ReLU or a residual add (``tvm_torch.linear_add``). The runtime picks the GEMM
  when it prepacks: on Intel CPUs, float32 layers of a static row count and 512 KiB or more
  of weights run on MKL's packed GEMM (as Inductor's freezing runs them; the epilogue is an
  ATen pass after it), others on oneDNN's inner product, with the epilogue fused into it but ReLU after it. On CUDA
  (+ bias) (+ ReLU) -> ``tvm_torch.matmul_bias`` (cuBLAS).
  Other ``matmul`` -> ``tvm_torch.matmul`` (MKL on CPU, cuBLAS on CUDA).
* ``nn.attention`` (no window) -> ``tvm_torch.attention`` / ``tvm_torch.attention_masked``:
  ATen's fused ``scaled_dot_product_attention`` (flash attention), on CPU and CUDA; a mask
  made from a boolean one reaches ATen as the boolean mask (on CPU, the zeroing of rows with
  no key to attend to that the converter writes after it then goes: ATen's kernel gives those
  rows 0 itself). On CPU, where q, k and v are reshaped, transposed, sliced and split out of
  contiguous tensors (timm's and GPT-2's fused QKV projections),
  ``tvm_torch.attention_views`` / ``tvm_torch.attention_views_masked`` read them there as
  strided views instead.
* After it, :func:`nchw_input_pass`: a CPU convolution of the program's own NCHW input reads
  it as it is (``tvm_torch.conv2d_nchw_input``) instead of after a TVM transpose to NHWC.
* ``permute_dims(permute_dims(x))`` -> one permutation, or ``x`` when they cancel (the
  importer's layout changes around attention undo the model's own); on CPU, the transposes
  ConvertLayout puts around clips (relu6, hardswish, hardsigmoid) are dropped first.

On CUDA, convolutions (in NCHW: ``tvm_torch.conv2d_nchw`` / ``tvm_torch.conv2d_add_nchw``, no
prepacking), matrix products, layer norm, softmax and attention go to ATen (cuDNN / cuBLAS) in
float32 and float16, on the caller's current stream; pooling and the transcendental
elementwise ops stay TVM code there. On CPU only float32 is offloaded; a bfloat16 program
runs its convolutions, linear layers and attention in bfloat16 when the CPU has bfloat16
instructions, passing bfloat16 results between them (:mod:`.bfloat16_activations`).
Everything else stays TVM code.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import AbstractSet, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard
from tvm.relax.expr_functor import PyExprMutator, mutator

from .bfloat16_activations import bfloat16_activations
from .passes import VIEW_OPS, const_value, prim_number

logger = logging.getLogger(__name__)

def _offloaded_dtypes(gpu: bool) -> Tuple[str, ...]:
    """Dtypes the vendor kernels take: float32 on CPU, float32 and float16 on CUDA."""
    return ("float32", "float16") if gpu else ("float32",)


def _dims(expr: relax.Expr) -> Optional[list]:
    """Dims of a tensor expression: ints for static dims, None for symbolic ones."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]


def _static_shape(expr: relax.Expr) -> Optional[list]:
    """Dims of a tensor expression when all of them are static, else None."""
    dims = _dims(expr)
    return dims if dims is not None and None not in dims else None


def _shape(values) -> relax.ShapeExpr:
    return relax.ShapeExpr([int(v) for v in values])


#: Weight elements from which a 1x1 convolution of a 1x1 image runs as a compiled oneDNN
#: partition rather than MKL's GEMV (measured on MobileNetV3-L, EfficientNet-B0 and
#: RegNetY-016, see _ConvRewriter._is_gemv).
_GEMV_ON_ONEDNN = 1 << 16


@dataclasses.dataclass(frozen=True)
class ConvSite:
    """A CPU convolution the offload runs on oneDNN, which a tuned TVM kernel could run instead
    (see :mod:`.vendor_choice`).

    Attributes
    ----------
    key : str
        Its geometry (input shape and dtype, weight shape, strides, padding, dilation, groups,
        compute dtype): convolutions with one key share one choice.
    variant : str
        The key and the structure of its chain (epilogue, residual add): one TVM kernel each.
    inputs : list of relax.Var
        Fresh variables for its input and, if it has one, the residual added to it.
    expr : relax.Expr
        The matched chain on ``inputs``, as the model has it: the NHWC ``conv2d`` (weight
        constant) and its bias, epilogue and residual add.
    compute_dtype : str
        ``"float32"``, or ``"bfloat16"`` for oneDNN's bfloat16 kernels.
    """

    key: str
    variant: str
    inputs: List[relax.Var]
    expr: relax.Expr
    compute_dtype: str


def _signature(expr: relax.Expr) -> str:
    """The structure of a chain: its operators, constants' shapes and scalar arguments."""
    if isinstance(expr, relax.Call):
        return f"{expr.op.name}({','.join(_signature(a) for a in expr.args)})"
    if isinstance(expr, tvm.ir.GenericConst):
        return f"c{list(expr.value.shape)}"
    if isinstance(expr, relax.Var):
        return "v"
    number = prim_number(expr)  # clip's bounds
    return type(expr).__name__ if number is None else str(number)


def _bindings(func: relax.Function) -> Dict[relax.Var, relax.Expr]:
    """Each variable bound in ``func``'s body, to its value."""
    return {binding.var: binding.value for block in func.body.blocks
            for binding in block.bindings}


def _use_counts(func: relax.Function) -> Dict[relax.Var, int]:
    """How many times each variable is read in ``func``'s body and result."""
    counts: Dict[relax.Var, int] = {}

    def read(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1
        elif isinstance(expr, relax.Call):
            for arg in expr.args:
                read(arg)
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                read(field)
        elif isinstance(expr, relax.TupleGetItem):
            read(expr.tuple_value)
        else:  # nested scopes (If): each free variable read at least once
            for var in relax.analysis.free_vars(expr):
                read(var)

    for block in func.body.blocks:
        for binding in block.bindings:
            read(binding.value)
    read(func.body.body)
    return counts


def _feeds_matmul_lhs_only(var: relax.Var, bindings: Dict[relax.Var, relax.Expr],
                           uses: Dict[relax.Var, int]) -> bool:
    """Whether ``var`` is read only as the left operand of ``tvm_torch.matmul`` calls, directly
    or through reshapes and broadcasts to its own shape (attention's probabilities times the
    values)."""
    reads = [(bound, value) for bound, value in bindings.items()
             if isinstance(value, relax.Call) and any(a.same_as(var) for a in value.args)]
    if not reads or sum(sum(a.same_as(var) for a in value.args)
                        for _, value in reads) != uses.get(var, 0):
        return False  # also read elsewhere: by the result, a tuple, a nested scope
    for bound, value in reads:
        name = value.op.name if isinstance(value.op, tvm.ir.Op) else ""
        if name == "relax.call_pure_packed":
            if (str(value.args[0].global_symbol) != "tvm_torch.matmul" or
                    not value.args[1].same_as(var) or value.args[2].same_as(var)):
                return False
        elif name == "relax.reshape" or (name == "relax.broadcast_to" and
                                         _dims(value) == _dims(var)):
            if not _feeds_matmul_lhs_only(bound, bindings, uses):
                return False
        else:
            return False
    return True


class _Chains:
    """The bindings of a function and how often each of its variables is read.

    A pattern matches through variable bindings, so a fused chain may take in a result that
    another op also reads; that result would then be computed twice, inside the fused call
    and for its other reader (``x + conv(x)`` with ``x`` itself a convolution's result fused
    the add into a second run of ``x``'s convolution). :meth:`owns` says whether a chain
    owns its intermediate results.
    """

    def __init__(self, func: relax.Function):
        self.bindings = _bindings(func)
        self.uses = _use_counts(func)

    def owns(self, root: relax.Call, inner: relax.Call, matched: Mapping,
             leaves=(), extra=()) -> bool:
        """Whether every result on the path from ``root`` down to ``inner`` (a call the
        pattern matched below it, ``inner`` included) is read only by the chain: the calls
        ``matched`` maps patterns to, but for those of the ``leaves`` patterns (hardswish
        reads its input twice), and ``extra``."""
        if root.same_as(inner):
            return True
        reads: Dict[relax.Var, int] = {}
        chain = [value for pattern, value in matched.items()
                 if not any(pattern.same_as(leaf) for leaf in leaves)]
        calls = {self.bindings.get(c, c) if isinstance(c, relax.Var) else c
                 for c in [root, *chain, *extra]}  # an object once, whichever wrapper
        for call in (c for c in calls if isinstance(c, relax.Call)):
            for arg in call.args:
                if isinstance(arg, relax.Var):
                    reads[arg] = reads.get(arg, 0) + 1

        def walk(expr: relax.Call) -> Optional[bool]:
            # Down the chain's own calls only: its other inputs may be whole subgraphs.
            for arg in expr.args:
                value = self.bindings.get(arg) if isinstance(arg, relax.Var) else arg
                if not isinstance(value, relax.Call) or value not in calls:
                    continue
                reached = True if value.same_as(inner) else walk(value)
                if reached is None:
                    continue
                return reached and not (isinstance(arg, relax.Var) and
                                        self.uses.get(arg, 0) > reads.get(arg, 0))
            return None
        return bool(walk(root))

    def swap_residual(self, add: relax.Expr, side: relax.Call,
                      pattern) -> Optional[Tuple[dict, relax.Var]]:
        """For a residual add whose operand ``side`` (a value) a pattern matched as the chain
        to fuse: the match of ``pattern`` on its other operand, and ``side``'s variable (the
        residual when the other operand's chain is fused instead), or None."""
        if isinstance(add, relax.Var):
            add = self.bindings.get(add, add)
        if not isinstance(add, relax.Call) or len(add.args) != 2:
            return None
        values = [self.bindings.get(arg, arg) for arg in add.args]
        for mine, other in ((0, 1), (1, 0)):
            if values[mine].same_as(side) and isinstance(add.args[mine], relax.Var):
                matched = pattern.extract_matched_expr(values[other], var2val=self.bindings)
                return (matched, add.args[mine]) if matched else None
        return None


def _inline(expr: relax.Expr, bindings: Dict[relax.Var, relax.Expr],
            leaves: Dict[relax.Var, relax.Var]) -> relax.Expr:
    """``expr`` with its bound variables replaced by their values, down to ``leaves``."""
    if isinstance(expr, relax.Var):
        if expr in leaves:
            return leaves[expr]
        return _inline(bindings[expr], bindings, leaves)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [_inline(a, bindings, leaves) for a in expr.args],
                          expr.attrs, expr.ty_args)
    return expr


def conv_key(conv: relax.Call, compute_dtype: str) -> str:
    """The geometry of an NHWC conv2d, as a :class:`ConvSite` key."""
    attrs = conv.attrs
    ints = lambda values: ",".join(str(int(v)) for v in values)  # noqa: E731
    return (f"conv2d x={ints(_static_shape(conv.args[0]) or [])}:{conv.args[0].ty.dtype} "
            f"w={ints(_static_shape(conv.args[1]) or [])} s={ints(attrs.strides)} "
            f"p={ints(attrs.padding)} d={ints(attrs.dilation)} g={int(attrs.groups)} "
            f"{compute_dtype}")


class _ConvRewriter:
    """Builds the vendor call for one matched conv2d chain.

    ``gpu=False``: oneDNN in NHWC with prepacked weights (float32). ``gpu=True``: ATen's
    convolution (cuDNN) in NCHW, float32 or float16. On CPU, convolutions whose
    :func:`conv_key` is in ``keep_tvm`` stay TVM code. Given ``sites``, it is a dry run: it
    rewrites nothing and collects a :class:`ConvSite` for each convolution it would put on
    oneDNN, once, with its longest matched chain. :meth:`refresh` gives it the function each
    pattern's pass runs on.
    """

    def __init__(self, gpu: bool, compute_dtype: str = "float32",
                 keep_tvm: AbstractSet[str] = frozenset(),
                 sites: Optional[List[ConvSite]] = None):
        self.gpu = gpu
        self.compute_dtype = compute_dtype
        self.keep_tvm = keep_tvm
        self.sites = sites
        self.chains: Optional[_Chains] = None
        self.seen: set = set()  # the convolutions collected (dry run)
        self.count = 0

    def refresh(self, func: relax.Function) -> None:
        """Read ``func``'s bindings and variable uses (before a pattern's pass over it)."""
        self.chains = _Chains(func)

    def _site(self, key: str, root: relax.Expr, conv: relax.Call,
              residual: Optional[relax.Expr]) -> Optional[ConvSite]:
        leaves = {conv.args[0]: relax.Var(f"x{len(self.sites)}", conv.args[0].ty)}
        if residual is not None:
            # A pattern's match is the residual's value; the chain uses the variable bound to it.
            if not isinstance(residual, relax.Var):
                residual = next((var for var, value in self.chains.bindings.items()
                                 if value.same_as(residual)), None)
                if residual is None:
                    return None
            leaves[residual] = relax.Var(f"r{len(self.sites)}", residual.ty)
        try:
            expr = _inline(root, self.chains.bindings, leaves)
        except KeyError:  # the chain reaches past its leaves: not raced (still offloaded)
            logger.debug("convolution %s: chain not separable, not raced", key)
            return None
        return ConvSite(key, f"{key} | {_signature(expr)}", list(leaves.values()), expr,
                        self.compute_dtype)

    def conv_args(self, conv: relax.Call):
        attrs = conv.attrs
        layout = "NCHW" if self.gpu else "NHWC"
        if (attrs.data_layout != layout or attrs.kernel_layout != "OIHW"
                or attrs.out_layout != layout):
            return None
        x, weight = conv.args
        dtypes = {str(x.ty.dtype), str(conv.ty.dtype)} if isinstance(x.ty, relax.TensorType) \
            else set()
        if len(dtypes) != 1 or not dtypes <= set(_offloaded_dtypes(self.gpu)):
            return None
        dims = _dims(x)
        if dims is None or len(dims) != 4:
            return None
        top, left, bottom, right = (int(p) for p in attrs.padding)
        if top != bottom or left != right:
            return None
        # Symbolic dims (a dynamic batch) prepack for size 1: the layout suits any size.
        if self.gpu:
            n, c, h, w = (d if d is not None else 1 for d in dims)
        else:
            n, h, w, c = (d if d is not None else 1 for d in dims)
        return {
            "x": x,
            "weight": weight,
            "padding": _shape([top, left]),
            "stride": _shape(attrs.strides),
            "dilation": _shape(attrs.dilation),
            "groups": tvm.tirx.IntImm("int64", int(attrs.groups)),
            "input_size": _shape([n, c, h, w]),
            "out_channels": int(_static_shape(weight)[0]),  # OIHW
            "dtype": str(conv.ty.dtype),
        }

    @staticmethod
    def _is_gemv(conv: relax.Call, args: dict) -> bool:
        """Whether a CPU (NHWC) convolution is a matrix product of a 1x1 image (1x1 kernel, no
        padding, one group) that MKL's float32 GEMV runs best (squeeze-excite gates). MKL
        takes microseconds where the pointwise oneDNN op spends ~25 us setting up. From ~64K
        weights up (MobileNetV3-L's larger gates and head), the convolution's compiled oneDNN
        Graph partition is faster (float32 MobileNetV3-L 10.0 -> 9.7 ms); in bfloat16, where it
        reads half the bytes, more so (8.0 -> 6.9 ms). Below, it measured slower
        (EfficientNet-B0's gates in bfloat16)."""
        dims, weight = _dims(args["x"]), _static_shape(args["weight"])
        if int(np.prod(weight)) >= _GEMV_ON_ONEDNN:
            return False
        return dims is not None and dims[1:3] == [1, 1] and weight[2:] == [1, 1] and \
            [int(p) for p in conv.attrs.padding] == [0, 0, 0, 0] and int(conv.attrs.groups) == 1

    def build(self, root: relax.Call, conv: relax.Call, bias: Optional[relax.Expr],
              residual: Optional[relax.Expr], unary: str) -> Optional[relax.Expr]:
        """The vendor call for the chain ``root`` (``conv`` (+ ``bias``), then ``unary``
        (after the ``residual`` add, if any)), or None to leave it as it is."""
        out_ty = root.ty
        args = self.conv_args(conv)
        if args is None:
            return None
        channels = args["out_channels"]
        if bias is None:
            bias_value = np.zeros((channels,), dtype="float32")
        else:
            bias_value = const_value(bias).reshape(-1)
            if bias_value.size != channels:
                return None
        bias_const = relax.const(bias_value.astype(args["dtype"]))
        if residual is not None and (not tvm_ffi.structural_equal(residual.ty, conv.ty)
                                     or str(residual.ty.dtype) != args["dtype"]):
            return None
        geometry = [args["padding"], args["stride"], args["dilation"], args["groups"]]
        unary_imm = tvm.ir.StringImm(unary)
        gemv = not self.gpu and residual is None and self._is_gemv(conv, args)
        if not self.gpu and not gemv:
            key = conv_key(conv, self.compute_dtype)
            if key in self.keep_tvm:
                # Its tuned TVM kernels were measured faster. Every pattern that matches this
                # convolution (with or without its epilogue) comes here: it stays TVM code.
                return None
            if self.sites is not None:
                site = None
                if conv not in self.seen and _static_shape(args["x"]) is not None:
                    self.seen.add(conv)
                    site = self._site(key, root, conv, residual)
                if site is not None:
                    self.sites.append(site)
                return None
        self.count += 1
        if self.gpu:
            if residual is not None:
                return relax.call_pure_packed("tvm_torch.conv2d_add_nchw", args["x"], residual,
                                              args["weight"], bias_const, *geometry, unary_imm,
                                              ty_args=out_ty)
            return relax.call_pure_packed("tvm_torch.conv2d_nchw", args["x"], args["weight"],
                                          bias_const, *geometry, unary_imm, ty_args=out_ty)
        if gemv:
            # [N, 1, 1, C_in] @ [C_in, C_out]: a squeeze-excite gate's 1x1 convolution.
            weight = const_value(args["weight"]).reshape(channels, -1)
            return relax.call_pure_packed(
                "tvm_torch.matmul_bias", args["x"], relax.const(np.ascontiguousarray(weight.T)),
                bias_const, unary_imm, ty_args=out_ty)
        packed = relax.call_pure_packed(
            "tvm_torch.conv2d_nhwc_prepack", args["weight"], args["padding"], args["stride"],
            args["dilation"], args["groups"], args["input_size"],
            tvm.ir.StringImm(self.compute_dtype), ty_args=relax.ObjectType())
        if residual is not None:
            return relax.call_pure_packed("tvm_torch.conv2d_add_nhwc", args["x"], residual,
                                          packed, bias_const, *geometry, unary_imm,
                                          ty_args=out_ty)
        return relax.call_pure_packed("tvm_torch.conv2d_nhwc", args["x"], packed, bias_const,
                                      *geometry, unary_imm, ty_args=out_ty)


def _scalar(expr: relax.Expr) -> Optional[float]:
    """The value of a one-element float constant, else None."""
    if not isinstance(expr, tvm.ir.GenericConst):
        return None
    value = const_value(expr)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _hard_activations(x):
    """``relu6(x)``, ``hardsigmoid(x)`` and ``hardswish(x)`` as torch decomposes them (one
    ``clamp``, or ``clamp_min`` then ``clamp_max``), as ``(pattern, check, epilogue name)``:
    a pattern fixes the structure, its check (of the match) the constants: clips to [0, 6], a
    shift of 3, a division by 6.
    """
    def relu6(arg):
        inner = is_op("relax.clip")(arg, wildcard(), wildcard())
        outer = is_op("relax.clip")(inner, wildcard(), wildcard())
        return [(outer, (outer, inner)), (inner, (inner,))]

    def bounds_ok(matched, clips) -> bool:
        low, high = -np.inf, np.inf
        for clip in clips:
            lo, hi = (prim_number(arg) for arg in matched[clip].args[1:])
            if lo is None or hi is None:
                return False
            low, high = max(low, lo), min(high, hi)
        return (low, high) == (0.0, 6.0)

    swish, sigmoid = [], []
    three, six = is_const(), is_const()
    for clipped, clips in relu6(is_op("relax.add")(x, three)):
        def check(matched, clips=clips):
            return bounds_ok(matched, clips) and _scalar(matched[three]) == 3.0 and \
                _scalar(matched[six]) == 6.0
        gate = is_op("relax.divide")(clipped, six)
        sigmoid.append((gate, check, "hardsigmoid"))
        # x * (relu6(x + 3) / 6), and x * relu6(x + 3) / 6
        swish.append((is_op("relax.multiply")(x, gate) | is_op("relax.multiply")(gate, x),
                      check, "hardswish"))
        product = is_op("relax.multiply")(x, clipped) | is_op("relax.multiply")(clipped, x)
        swish.append((is_op("relax.divide")(product, six), check, "hardswish"))
    relu6s = [(clipped, lambda m, clips=clips: bounds_ok(m, clips), "relu6")
              for clipped, clips in relu6(x)]
    # Hardswish holds a hardsigmoid: it is matched first.
    return swish + sigmoid + relu6s


def _rewrite_convs(func: relax.Function, gpu: bool, compute_dtype: str = "float32",
                   tvm_wins: Optional[Mapping[str, bool]] = None,
                   sites: Optional[List[ConvSite]] = None) -> relax.Function:
    tvm_wins = tvm_wins or {}
    keep_tvm: AbstractSet[str] = frozenset()
    if not gpu and (sites is not None or tvm_wins):
        # The sites are collected by a dry run over the function as it is: rewriting gives
        # later matches new variables that its bindings do not know.
        found: List[ConvSite] = []
        collector = _ConvRewriter(gpu, compute_dtype, sites=found)
        collector.refresh(func)
        for pattern, fn in _conv_patterns(collector):
            rewrite_call(pattern, fn, func)
        if sites is not None:
            sites.extend(found)
        # A geometry stays TVM code only if every chain it has here won its race: a chain
        # without a race has no tuned kernel.
        keep_tvm = {site.key for site in found} - {site.key for site in found
                                                   if not tvm_wins.get(site.variant, False)}
    rewriter = _ConvRewriter(gpu, compute_dtype, keep_tvm)
    for pattern, fn in _conv_patterns(rewriter):
        rewriter.refresh(func)
        func = rewrite_call(pattern, fn, func)
    logger.debug("offloaded %d convolutions to %s", rewriter.count, "cuDNN" if gpu else "oneDNN")
    return func


def _conv_patterns(rewriter: _ConvRewriter) -> list:
    """The (pattern, rewrite) pairs of the convolution offload, longest chains first."""
    x, res = wildcard(), wildcard()
    conv = is_op("relax.nn.conv2d")(x, is_const())
    bias = is_const()
    conv_bias = is_op("relax.add")(conv, bias)
    with_res = is_op("relax.add")(conv_bias, res) | is_op("relax.add")(res, conv_bias)
    with_res_nobias = is_op("relax.add")(conv, res) | is_op("relax.add")(res, conv)

    def make(has_bias, has_res, unary):
        def rewrite(call, matched):
            conv_call = matched[conv]
            b = matched[bias] if has_bias else None
            r = matched[res] if has_res else None
            if has_res and isinstance(r, tvm.ir.GenericConst):
                return call  # a constant "residual" is a bias: another pattern takes it
            chains = rewriter.chains
            if not chains.owns(call, conv_call, matched, (x, res)):
                # Another op reads a result inside the chain. For a residual add, the other
                # operand's convolution may be the add's alone (``x + conv(x)`` where ``x``
                # is a convolution's result too): that one takes the add.
                if not has_res:
                    return call
                add = call.args[0] if call.op.name == "relax.nn.relu" else call
                side = matched[conv_bias] if has_bias else conv_call
                for other, other_has_bias in ((conv_bias, True), (conv, False)):
                    swapped = chains.swap_residual(add, side, other)
                    if swapped is not None:
                        break
                else:
                    return call
                found, r = swapped
                conv_call, b = found[conv], found[bias] if other_has_bias else None
                if not chains.owns(call, conv_call, found, (x,), (add,)):
                    return call
            new = rewriter.build(call, conv_call, b, r, unary)
            return call if new is None else new
        return rewrite

    # Epilogues the convolution kernels apply (oneDNN post-ops where they keep PyTorch's
    # NaN/Inf results, ATen otherwise); ReLU also after a residual add.
    epilogues = []
    for op_name, name in (("relax.nn.silu", "silu"), ("relax.sigmoid", "sigmoid"),
                          ("relax.tanh", "tanh")):
        epilogues += [(is_op(op_name)(conv_bias), make(True, False, name)),
                      (is_op(op_name)(conv), make(False, False, name))]
    for has_bias, source in ((True, conv_bias), (False, conv)):
        for pattern, check, name in _hard_activations(source):
            rewrite = make(has_bias, False, name)
            epilogues.append((pattern, lambda call, matched, check=check, rewrite=rewrite:
                              rewrite(call, matched) if check(matched) else call))
    patterns = epilogues + [
        (is_op("relax.nn.relu")(with_res), make(True, True, "relu")),
        (with_res, make(True, True, "none")),
        (is_op("relax.nn.relu")(with_res_nobias), make(False, True, "relu")),
        (is_op("relax.nn.relu")(conv_bias), make(True, False, "relu")),
        (conv_bias, make(True, False, "none")),
        (is_op("relax.nn.relu")(conv), make(False, False, "relu")),
        (conv, make(False, False, "none")),
    ]
    return patterns


def _unflatten_linears(func: relax.Function) -> relax.Function:
    """``reshape(matmul(reshape(x, [M, K]), W) (+ b), [..., N])`` -> ``matmul(x, W) (+ b)``.

    A linear layer on a 3-D input is exported as flatten / 2-D GEMM / unflatten; the vendor
    linear kernels take N-D inputs, and without the reshapes the activation or residual add
    that follows sits right on the GEMM, where :func:`_rewrite_matmuls` fuses it.
    """
    x, w, b = wildcard(), is_const(), is_const()
    flat = is_op("relax.reshape")(x, wildcard())
    mm = is_op("relax.matmul")(flat, w | is_op("relax.permute_dims")(w))
    with_bias = is_op("relax.add")(mm, b) | is_op("relax.add")(b, mm)
    outer = is_op("relax.reshape")(with_bias | mm, wildcard())

    def rewrite(call, matched):
        source = matched[x]
        src, flat_dims, out = (_static_shape(source), _static_shape(matched[flat]),
                               _static_shape(call))
        if src is None or flat_dims is None or out is None or len(src) < 3:
            return call
        if flat_dims != [int(np.prod(src[:-1])), src[-1]] or out[:-1] != src[:-1]:
            return call
        new = relax.op.matmul(source, matched[mm].args[1])
        bias = matched.get(b)
        return new if bias is None else relax.op.add(new, bias)

    return rewrite_call(outer, rewrite, func)


def _rewrite_matmuls(func: relax.Function, gpu: bool,
                     compute_dtype: str = "float32") -> relax.Function:
    ok_dtypes = _offloaded_dtypes(gpu)

    def _ok(*exprs) -> bool:
        return all(isinstance(e.ty, relax.TensorType) and str(e.ty.dtype) in ok_dtypes
                   for e in exprs) and len({str(e.ty.dtype) for e in exprs}) == 1

    x, w, b = wildcard(), is_const(), is_const()
    # A constant right-hand side, or the transpose of one (nn.Linear's weight.T).
    w_t = is_op("relax.permute_dims")(w)
    mm_const = is_op("relax.matmul")(x, w | w_t)
    mm_bias = is_op("relax.add")(mm_const, b) | is_op("relax.add")(b, mm_const)
    mm_any = is_op("relax.matmul")(wildcard(), wildcard())

    def constant_weight(mm: relax.Call):
        """``(constant, transposed)`` for a 2-D constant right-hand side, used as it is or
        through its transpose (nn.Linear's ``weight.T``: the constant is then [out, in]);
        None otherwise."""
        rhs = mm.args[1]
        if isinstance(rhs, tvm.ir.GenericConst):
            return (rhs, False) if len(_static_shape(rhs) or []) == 2 else None
        if isinstance(rhs, relax.Call) and isinstance(rhs.args[0], tvm.ir.GenericConst):
            axes = rhs.attrs.axes
            if len(_static_shape(rhs.args[0]) or []) != 2 or \
                    (axes is not None and [int(a) for a in axes] != [1, 0]):
                return None
            return rhs.args[0], True
        return None

    def transposed_const(const: relax.Expr) -> relax.Expr:
        return relax.const(np.ascontiguousarray(const_value(const).T))

    chains: List[_Chains] = []  # the function of the current pattern's pass

    def owned(call, matched, has_bias, residual):
        """``(matmul, bias, residual)`` of a chain that owns its intermediate results (see
        :class:`_Chains`), or None. For a residual add whose matched linear layer's result
        another op reads too, the other operand's linear layer, if that one is the add's
        alone."""
        mm = matched[mm_const]
        bias = matched.get(b) if has_bias else None
        other = matched[residual] if residual is not None else None
        if chains[-1].owns(call, mm, matched, (x, residual)):
            return mm, bias, other
        if residual is None:
            return None
        side = matched[mm_bias] if has_bias else mm
        for pattern, other_has_bias in ((mm_bias, True), (mm_const, False)):
            swapped = chains[-1].swap_residual(call, side, pattern)
            if swapped is not None:
                found, other = swapped
                mm, bias = found[mm_const], found[b] if other_has_bias else None
                return (mm, bias, other) if chains[-1].owns(call, mm, found, (x,)) else None
        return None

    def linear(unary, has_bias, residual=None):
        def rewrite(call, matched):
            chain = owned(call, matched, has_bias, residual)
            if chain is None:
                return call
            mm, bias_expr, other = chain
            lhs = mm.args[0]
            found = constant_weight(mm)
            if found is None or not _ok(lhs, found[0], call):
                return call
            const, transposed = found
            rows, cols = _static_shape(const)
            out_features = rows if transposed else cols
            if bias_expr is not None:
                bias_value = const_value(bias_expr).reshape(-1)
                if bias_value.size != out_features:
                    return call
            else:
                bias_value = np.zeros((out_features,), dtype="float32")
            bias_const = relax.const(bias_value.astype(str(call.ty.dtype)))
            if gpu:  # cuBLAS takes the weight as [in, out]
                if residual is not None or unary not in ("none", "relu"):
                    return call  # the CUDA kernel has no such epilogue
                rhs = transposed_const(const) if transposed else const
                return relax.call_pure_packed("tvm_torch.matmul_bias", lhs, rhs, bias_const,
                                              tvm.ir.StringImm(unary), ty_args=call.ty)
            # oneDNN takes it as [out, in]
            weight = const if transposed else transposed_const(const)
            return _cpu_linear(call, lhs, weight, bias_const, unary, other)
        return rewrite

    def _cpu_linear(call, lhs, weight, bias_const, unary, other):
        """oneDNN's linear on a prepacked weight (the prepack call depends on constants
        only: LiftTransformParams moves it into the params' transform function)."""
        dims = _dims(lhs)
        if dims is None or len(dims) < 2:
            return call
        if other is not None and (isinstance(other, tvm.ir.GenericConst) or
                                  not tvm_ffi.structural_equal(other.ty, call.ty)):
            return call  # a constant "residual" is a bias; a broadcast one is not fused
        rows = int(np.prod(dims[:-1])) if None not in dims[:-1] else 0
        packed = relax.call_pure_packed("tvm_torch.linear_prepack", weight,
                                        tvm.tirx.IntImm("int64", rows),
                                        tvm.ir.StringImm(compute_dtype),
                                        ty_args=relax.ObjectType())
        if other is not None:
            return relax.call_pure_packed("tvm_torch.linear_add", lhs, other, packed,
                                          bias_const, ty_args=call.ty)
        return relax.call_pure_packed("tvm_torch.linear", lhs, packed, bias_const,
                                      tvm.ir.StringImm(unary), ty_args=call.ty)

    def generic(call, _matched):
        lhs, rhs = call.args
        if not _ok(lhs, rhs, call):
            return call
        if _static_shape(lhs) is None or _static_shape(rhs) is None:
            return call
        if len(_static_shape(lhs)) < 2 or len(_static_shape(rhs)) < 2:
            return call
        return relax.call_pure_packed("tvm_torch.matmul", lhs, rhs, ty_args=call.ty)

    reshaped = is_op("relax.reshape")(mm_bias, wildcard())

    def relu_through_reshape(call, matched):
        """``relu(reshape(linear))`` -> ``reshape(linear + relu)`` (the relu runs inside the
        linear kernel's call instead of a TVM kernel of its own)."""
        linear_call = matched[mm_bias]
        if not chains[-1].owns(call, linear_call, matched, (x,)):
            return call
        fused = linear("relu", True)(linear_call, matched)
        if fused.same_as(linear_call):
            return call
        return relax.op.reshape(fused, matched[reshaped].args[1])

    res = wildcard()
    epilogues = [] if gpu else [
        # On CPU, the residual add, GELU and SiLU run in oneDNN's GEMM epilogue.
        (is_op("relax.add")(mm_bias, res) | is_op("relax.add")(res, mm_bias),
         linear("none", True, res)),
        # A linear layer without a bias (T5's, Llama's) and a residual add.
        (is_op("relax.add")(mm_const, res) | is_op("relax.add")(res, mm_const),
         linear("none", False, res)),
        (is_op("relax.nn.gelu")(mm_bias), linear("gelu", True)),
        (is_op("relax.nn.gelu_tanh")(mm_bias), linear("gelu_tanh", True)),
        (is_op("relax.nn.gelu")(mm_const), linear("gelu", False)),
        (is_op("relax.nn.gelu_tanh")(mm_const), linear("gelu_tanh", False)),
        (is_op("relax.nn.silu")(mm_bias), linear("silu", True)),
        (is_op("relax.nn.silu")(mm_const), linear("silu", False)),
    ]
    for pattern, fn in epilogues + [
        (is_op("relax.nn.relu")(reshaped), relu_through_reshape),
        (is_op("relax.nn.relu")(mm_bias), linear("relu", True)),
        (is_op("relax.nn.relu")(mm_const), linear("relu", False)),
        (mm_bias, linear("none", True)),
        (mm_const, linear("none", False)),
        (mm_any, generic),
    ]:
        chains.append(_Chains(func))
        func = rewrite_call(pattern, fn, func)
    return func


def _rewrite_normalizations(func: relax.Function, gpu: bool) -> relax.Function:
    """layer_norm over the last axis (constant gamma/beta), RMS norm (on CPU) and softmax ->
    ATen kernels."""
    ok_dtypes = _offloaded_dtypes(gpu)
    x, gamma, beta = wildcard(), is_const(), is_const()
    layer_norm = is_op("relax.nn.layer_norm")(x, gamma, beta)
    softmax = is_op("relax.nn.softmax")(wildcard())

    def rewrite_layer_norm(call, matched):
        data = call.args[0]
        dims = _dims(data)
        if dims is None or str(call.ty.dtype) not in ok_dtypes:
            return call
        axes = sorted(int(a) % len(dims) for a in call.attrs.axes)
        if axes != list(range(len(dims) - len(axes), len(dims))):
            return call  # ATen normalises trailing dims only
        if not (call.attrs.center and call.attrs.scale):
            return call
        return relax.call_pure_packed("tvm_torch.layer_norm", data, call.args[1], call.args[2],
                                      tvm.tirx.FloatImm("float64", float(call.attrs.epsilon)),
                                      ty_args=call.ty)

    def rewrite_softmax(call, _matched):
        if _dims(call.args[0]) is None or str(call.ty.dtype) not in ok_dtypes:
            return call
        # Probabilities that only multiply the values (attention) may be flushed where they
        # are subnormal (< 1.2e-38): that moves the product by at most keys x 1.2e-38 x
        # max|v|, far below its rounding, and GEMMs run 10-50x slower on subnormal operands
        # (Swin's -100 window masks give exp(-100)). Other readers (a log, the model's
        # output) get them as PyTorch computes them.
        var = bound_to.get(call)
        flush = (not gpu and var is not None and str(call.ty.dtype) in ("float32", "bfloat16")
                 and _feeds_matmul_lhs_only(var, bindings, uses))
        return relax.call_pure_packed(
            "tvm_torch.softmax_probabilities" if flush else "tvm_torch.softmax", call.args[0],
            tvm.tirx.IntImm("int64", int(call.attrs.axis)), ty_args=call.ty)

    func = rewrite_call(layer_norm, rewrite_layer_norm, func)
    if not gpu:  # not yet checked on a GPU
        func = _rewrite_rms_norms(func)
    bindings, uses = _bindings(func), _use_counts(func)
    bound_to = {value: var for var, value in bindings.items()}
    return rewrite_call(softmax, rewrite_softmax, func)


def _rewrite_rms_norms(func: relax.Function) -> relax.Function:
    """``weight * (x * rsqrt(mean(x * x, -1, keepdims) + eps))`` (Hugging Face's T5 and Llama
    RMSNorm, float32, a constant 1-D weight) -> ``tvm_torch.rms_norm``: ATen's kernel, which
    computes it bit for bit as those modules do, in one call instead of TVM's untuned
    reduction and elementwise kernels."""
    x, eps, weight, exponent = wildcard(), is_const(), is_const(), is_const()
    square = is_op("relax.multiply")(x, x) | is_op("relax.power")(x, exponent)
    mean = is_op("relax.mean")(square)
    scale = is_op("relax.rsqrt")(is_op("relax.add")(mean, eps))
    normed = is_op("relax.multiply")(x, scale) | is_op("relax.multiply")(scale, x)
    pattern = is_op("relax.multiply")(weight, normed) | is_op("relax.multiply")(normed, weight)

    def rewrite(call, matched):
        data, w, m = matched[x], matched[weight], matched[mean]
        dims, w_dims = _dims(data), _dims(w)
        if dims is None or str(call.ty.dtype) != "float32" or str(w.ty.dtype) != "float32" or \
                w_dims is None or len(w_dims) != 1 or w_dims[0] != dims[-1] or \
                _dims(call) != dims:
            return call
        axes = [int(a) % len(dims) for a in m.attrs.axis] if m.attrs.axis is not None else None
        if axes != [len(dims) - 1] or not m.attrs.keepdims:
            return call
        if exponent in matched and _scalar(matched[exponent]) != 2.0:
            return call
        epsilon = _scalar(matched[eps])
        if epsilon is None:
            return call
        return relax.call_pure_packed("tvm_torch.rms_norm", data, w,
                                      tvm.tirx.FloatImm("float64", epsilon), ty_args=call.ty)

    return rewrite_call(pattern, rewrite, func)


def _rewrite_pools(func: relax.Function, gpu: bool) -> relax.Function:
    """NHWC max/avg pooling (float32, symmetric padding) -> ATen's channels-last kernels."""
    if gpu:
        return func

    def geometry(call):
        """(input, padding [top, left]) when ATen can take the call, else None."""
        attrs = call.attrs
        if attrs.layout != "NHWC" or attrs.out_layout != "NHWC" or \
                len(_static_shape(call.args[0]) or []) != 4 or str(call.ty.dtype) != "float32":
            return None
        top, left, bottom, right = (int(p) for p in attrs.padding)
        return None if (top, left) != (bottom, right) else [top, left]

    def max_pool(call, _matched):
        padding = geometry(call)
        if padding is None:
            return call
        attrs = call.attrs
        return relax.call_pure_packed(
            "tvm_torch.max_pool2d_nhwc", call.args[0], _shape(attrs.pool_size),
            _shape(attrs.strides), _shape(padding), _shape(attrs.dilation),
            tvm.tirx.IntImm("bool", bool(attrs.ceil_mode)), ty_args=call.ty)

    def avg_pool(call, _matched):
        padding = geometry(call)
        attrs = call.attrs
        if padding is None or any(int(d) != 1 for d in attrs.dilation):
            return call
        return relax.call_pure_packed(
            "tvm_torch.avg_pool2d_nhwc", call.args[0], _shape(attrs.pool_size),
            _shape(attrs.strides), _shape(padding),
            tvm.tirx.IntImm("bool", bool(attrs.ceil_mode)),
            tvm.tirx.IntImm("bool", bool(attrs.count_include_pad)), ty_args=call.ty)

    func = rewrite_call(is_op("relax.nn.max_pool2d")(wildcard()), max_pool, func)
    return rewrite_call(is_op("relax.nn.avg_pool2d")(wildcard()), avg_pool, func)


def _rewrite_means(func: relax.Function, gpu: bool) -> relax.Function:
    """CPU float32 means over leading axes only (global pooling of an NHWC image) ->
    ATen's vectorised reduction; TVM's untuned code reads them with the channel stride."""
    if gpu:
        return func

    def rewrite(call, _matched):
        dims = _static_shape(call.args[0])
        if dims is None or call.attrs.axis is None or str(call.ty.dtype) != "float32" or \
                int(np.prod(dims)) < _UNARY_MIN_ELEMENTS:
            return call
        axes = sorted(int(a) % len(dims) for a in call.attrs.axis)
        if len(dims) - 1 in axes:
            return call
        return relax.call_pure_packed("tvm_torch.mean", call.args[0], _shape(axes),
                                      tvm.tirx.IntImm("bool", bool(call.attrs.keepdims)),
                                      ty_args=call.ty)

    return rewrite_call(is_op("relax.mean")(wildcard()), rewrite, func)


#: Relax elementwise ops whose TVM code calls scalar libm -> name for ``tvm_torch.unary``.
_UNARY = {"relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh", "relax.sigmoid": "sigmoid",
          "relax.tanh": "tanh", "relax.nn.silu": "silu", "relax.exp": "exp"}

#: Below this many elements a fused TVM kernel beats a vendor call's fixed cost.
_UNARY_MIN_ELEMENTS = 4096


def _rewrite_unary(func: relax.Function, gpu: bool) -> relax.Function:
    """Transcendental elementwise ops on large float32 CPU tensors -> ATen's kernels."""
    if gpu:
        return func
    for op_name, name in _UNARY.items():
        def rewrite(call, _matched, name=name):
            dims = _dims(call.args[0])
            if dims is None or str(call.ty.dtype) != "float32":
                return call
            if None not in dims and int(np.prod(dims)) < _UNARY_MIN_ELEMENTS:
                return call
            return relax.call_pure_packed("tvm_torch.unary", call.args[0],
                                          tvm.ir.StringImm(name), ty_args=call.ty)
        func = rewrite_call(is_op(op_name)(wildcard()), rewrite, func)
    return func


def _rewrite_attention(func: relax.Function, gpu: bool) -> relax.Function:
    """relax.nn.attention(q, k, v) / attention_bias(q, k, v, bias) -> ATen's
    scaled_dot_product_attention.

    A bias made from a boolean mask (``where(mask, 0, -inf)``, as
    :mod:`tvm.contrib.torch.converters` writes it) reaches ATen as the boolean mask itself,
    which its fused kernel takes natively; any other bias goes as an additive mask.
    """
    ok = _offloaded_dtypes(gpu)
    q, k, v = wildcard(), wildcard(), wildcard()
    mask, zero, neg_inf = wildcard(), is_const(), is_const()
    from_bool = is_op("relax.where")(mask, zero, neg_inf)
    bias = wildcard()
    plain = is_op("relax.nn.attention")(q, k, v)
    masked_bool = is_op("relax.nn.attention_bias")(q, k, v, from_bool)
    masked = is_op("relax.nn.attention_bias")(q, k, v, bias)

    def scalars(call):
        """(scale, causal) arguments, or None when ATen's kernel cannot take the call."""
        attrs = call.attrs
        causal = attrs.causal_mask
        if attrs.window_size is not None or causal not in (None, "TopLeft"):
            return None
        if any(len(_dims(a) or []) != 4 for a in call.args) or str(call.ty.dtype) not in ok:
            return None
        scale = float(attrs.scale) if attrs.scale is not None else -1.0
        return [tvm.tirx.FloatImm("float64", scale),
                tvm.tirx.IntImm("bool", causal == "TopLeft")]

    def rewrite_plain(call, _matched):
        extra = scalars(call)
        if extra is None:
            return call
        return relax.call_pure_packed("tvm_torch.attention", *call.args, *extra,
                                      ty_args=call.ty)

    def rewrite_bool(call, matched):
        extra = scalars(call)
        boolean = matched[mask]
        if extra is None or str(boolean.ty.dtype) != "bool" or \
                float(const_value(matched[zero])) != 0.0 or \
                float(const_value(matched[neg_inf])) != float("-inf"):
            return call
        return relax.call_pure_packed("tvm_torch.attention_masked", *call.args[:3], boolean,
                                      *extra, ty_args=call.ty)

    def rewrite_masked(call, _matched):
        extra = scalars(call)
        if extra is None or str(call.args[3].ty.dtype) != str(call.ty.dtype):
            return call
        return relax.call_pure_packed("tvm_torch.attention_masked", *call.args, *extra,
                                      ty_args=call.ty)

    func = rewrite_call(masked_bool, rewrite_bool, func)
    func = rewrite_call(masked, rewrite_masked, func)
    return rewrite_call(plain, rewrite_plain, func)


def _convs_read_nchw_inputs(func: relax.Function) -> relax.Function:
    """``tvm_torch.conv2d_nhwc(permute_dims(x, [0, 2, 3, 1]), ...)`` for a parameter ``x`` of
    the function (the program's NCHW input, which ConvertLayout transposes for the first
    convolution) -> ``tvm_torch.conv2d_nchw_input(x, ...)``: oneDNN reads the NCHW tensor as
    it is, instead of a TVM kernel transposing it first (0.14 ms for a 224x224 image)."""
    params = set(func.params)
    bound = _bindings(func)

    def rewrite(call: relax.Call, name: str) -> Optional[relax.Expr]:
        if name != "tvm_torch.conv2d_nhwc":
            return None
        permute = bound.get(call.args[1]) if isinstance(call.args[1], relax.Var) else None
        if not isinstance(permute, relax.Call) or permute.op != tvm.ir.Op.get(
                "relax.permute_dims") or permute.args[0] not in params or \
                _permutation(permute) != [0, 2, 3, 1]:
            return None
        return relax.call_pure_packed("tvm_torch.conv2d_nchw_input", permute.args[0],
                                      *call.args[2:], ty_args=call.ty)

    return _rewrite_packed_calls(func, rewrite)


def _rewrite_packed_calls(
        func: relax.Function,
        rewrite: Callable[[relax.Call, str], Optional[relax.Expr]]) -> relax.Function:
    """``rewrite(call, name)`` for each ``R.call_pure_packed`` call of ``func`` (``name``: the
    packed function's), which returns its replacement or None to keep it; the function as it
    was when it kept them all."""

    @mutator
    class _Rewrite(PyExprMutator):  # pylint: disable=abstract-method
        rewrote = 0

        def visit_call_(self, call):  # pylint: disable=arguments-renamed
            call = super().visit_call_(call)
            if call.op != tvm.ir.Op.get("relax.call_pure_packed"):
                return call
            replacement = rewrite(call, str(call.args[0].global_symbol))
            if replacement is None:
                return call
            self.rewrote += 1
            return replacement

    rewriter = _Rewrite()
    rewritten = rewriter.visit_expr(func)
    return rewritten if rewriter.rewrote else func


def _main_pass(name: str, rewrite_main: Callable[[relax.Function], relax.Function],
               dead_code: bool) -> tvm.transform.Pass:
    """A module pass applying ``rewrite_main`` to ``main`` (then dead-code elimination when
    ``dead_code``); the module as it was when ``main`` comes back unchanged."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = rewrite_main(mod["main"])
        if func.same_as(mod["main"]):
            return mod
        mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
        mod["main"] = func
        return relax.transform.DeadCodeElimination(["main"])(mod) if dead_code else mod

    return _pass


def _drop_row_zeroing(func: relax.Function) -> relax.Function:
    """``where(max(astype(mask), -1) > 0, permute_dims(attention_masked(q, k, v, mask)), 0)``
    -> the ``permute_dims``, for a boolean ``mask``: the zeroing that
    :func:`.converters.scaled_dot_product_attention` writes after attention, so that a query
    row with no key to attend to gives 0 as in PyTorch, is what ATen's kernel computes already
    when it takes the boolean mask itself (checked on CPU)."""
    bound = _bindings(func)

    def value(expr, op_name):
        """The call of ``op_name`` that ``expr`` is or is bound to, else None."""
        found = bound.get(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(found, relax.Call) and isinstance(found.op, tvm.ir.Op) and \
                found.op.name == op_name:
            return found
        return None

    def redundant(call: relax.Call) -> bool:
        cond, out, zero = call.args
        greater, permute = value(cond, "relax.greater"), value(out, "relax.permute_dims")
        if greater is None or permute is None or _scalar(zero) != 0.0 or \
                _scalar(greater.args[1]) != 0.0 or _dims(call) != _dims(out):
            return False
        row_max = value(greater.args[0], "relax.max")
        attention = value(permute.args[0], "relax.call_pure_packed")
        if row_max is None or attention is None or \
                str(attention.args[0].global_symbol) != "tvm_torch.attention_masked":
            return False
        cast = value(row_max.args[0], "relax.astype")
        rank = len(_dims(row_max.args[0]) or [])
        axes = [int(a) % rank for a in row_max.attrs.axis] if rank and \
            row_max.attrs.axis is not None else None
        mask = attention.args[4]
        return cast is not None and axes == [rank - 1] and bool(row_max.attrs.keepdims) and \
            str(mask.ty.dtype) == "bool" and cast.args[0].same_as(mask)

    @mutator
    class _Drop(PyExprMutator):  # pylint: disable=abstract-method
        def visit_call_(self, call):  # pylint: disable=arguments-renamed
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.where" and \
                    redundant(call):
                return call.args[1]
            return call

    return _Drop().visit_expr(func)


def _fold_permutes(func: relax.Function) -> relax.Function:
    """permute_dims of a permute_dims: one permutation, none when they cancel."""
    inner = is_op("relax.permute_dims")(wildcard())
    outer = is_op("relax.permute_dims")(inner)

    def rewrite(call, matched):
        first = matched[inner]
        first_axes, second_axes = _permutation(first), _permutation(call)
        if first_axes is None or second_axes is None:
            return call
        composed = [first_axes[a] for a in second_axes]
        source = first.args[0]
        if composed == list(range(len(composed))):
            return source
        return relax.op.permute_dims(source, composed)

    return rewrite_call(outer, rewrite, func)


def _ints(expr) -> Optional[list]:
    """A tuple of ints / a ShapeExpr / an Array of ints, as a list; None if symbolic."""
    fields = expr.fields if isinstance(expr, relax.Tuple) else \
        expr.values if isinstance(expr, relax.ShapeExpr) else expr
    out = []
    for field in fields:
        while hasattr(field, "value"):  # PrimValue -> IntImm -> int
            field = field.value
        if not isinstance(field, int):
            return None
        out.append(field)
    return out


def _split_bounds(item: relax.TupleGetItem, bound) -> Optional[Tuple[int, int, int]]:
    """``(axis, begin, end)`` of ``item`` when it takes a part of a ``relax.split`` of a tensor
    with a static extent along the split axis; None otherwise."""
    split = bound.get(item.tuple_value) if isinstance(item.tuple_value, relax.Var) else None
    if not isinstance(split, relax.Call) or not isinstance(split.op, tvm.ir.Op) or \
            split.op.name != "relax.split":
        return None
    dims = _dims(split.args[0])
    if dims is None:
        return None
    axis = int(split.attrs.axis) % len(dims)
    extent = dims[axis]
    sections = split.attrs.indices_or_sections
    if extent is None:
        return None
    if isinstance(sections, tvm.tirx.IntImm):
        step = -(-extent // int(sections))  # equal parts rounded up, the last one smaller
        cuts = list(range(step, extent, step))
    else:
        cuts = _ints(sections)
        if cuts is None:
            return None
    edges = [0] + [min(max(c, 0), extent) for c in cuts] + [extent]
    index = int(item.index)
    if not 0 <= index < len(edges) - 1:
        return None
    return axis, edges[index], max(edges[index + 1], edges[index])


def _as_view(expr: relax.Expr, bound) -> Optional[Tuple[relax.Expr, List[int]]]:
    """``(root, view)`` when ``expr`` is a chain of :data:`.passes.VIEW_OPS` and parts of
    ``relax.split`` over ``root`` (static shapes), with ``view`` its 4 sizes, 4 strides and
    storage offset into the contiguous ``root``; None otherwise (one op, or a reshape no view
    can express, breaks it)."""
    chain = []
    while isinstance(expr, relax.Var):
        value = bound.get(expr)
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and \
                value.op.name in VIEW_OPS:
            chain.append(value)
            expr = value.args[0]
        elif isinstance(value, relax.TupleGetItem) and _split_bounds(value, bound) is not None:
            chain.append(value)
            expr = bound[value.tuple_value].args[0]
        else:
            break
    root_dims = _dims(expr)
    if not chain or root_dims is None or None in root_dims:
        return None
    t = torch.empty(root_dims, device="meta")
    try:
        for call in reversed(chain):
            if isinstance(call, relax.TupleGetItem):
                axis, begin, end = _split_bounds(call, bound)
                t = t.narrow(axis, begin, end - begin)
                if list(t.shape) != _dims(call):
                    return None
                continue
            name = call.op.name
            if name == "relax.permute_dims":
                t = t.permute(_permutation(call))
            elif name == "relax.squeeze":
                axes = _ints(call.attrs.axis) if call.attrs.axis is not None else None
                t = t.squeeze(tuple(axes)) if axes is not None else t.squeeze()
            elif name == "relax.strided_slice":
                axes, begin, end = (_ints(a) for a in call.args[1:4])
                steps = _ints(call.args[4]) if len(call.args) > 4 else [1] * len(axes)
                if None in (axes, begin, end, steps) or any(step != 1 for step in steps):
                    return None
                for axis, b, e in zip(axes, begin, end):
                    size = t.shape[axis]
                    b, e = (min(max(i + size if i < 0 else i, 0), size) for i in (b, e))
                    t = t.narrow(axis, b, e - b)
            else:  # reshape: torch's view raises where strides cannot express it
                t = t.view(_dims(call))
            if list(t.shape) != _dims(call):
                return None
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    if t.dim() != 4:
        return None
    return expr, list(t.shape) + list(t.stride()) + [t.storage_offset()]


@mutator
class _AttentionOnViews(PyExprMutator):  # pylint: disable=abstract-method
    """See :func:`_attention_on_views`."""

    def __init__(self, bound: Dict[relax.Var, relax.Expr]):
        super().__init__()
        self.bound = bound

    def visit_call_(self, call):  # pylint: disable=arguments-renamed
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_pure_packed"):
            return call
        name = str(call.args[0].global_symbol)
        if name not in ("tvm_torch.attention", "tvm_torch.attention_masked"):
            return call
        views = [_as_view(arg, self.bound) for arg in call.args[1:4]]
        if None in views:
            return call
        return relax.call_pure_packed(
            name.replace("attention", "attention_views", 1), *(root for root, _ in views),
            relax.ShapeExpr([i for _, view in views for i in view]), *call.args[4:],
            ty_args=call.ty)


def _attention_on_views(func: relax.Function) -> relax.Function:
    """``tvm_torch.attention(q, k, v)`` (``attention_masked``) where q, k and v are transposed,
    sliced, split and reshaped from contiguous tensors (timm's fused QKV projection: reshape,
    permute, unbind; GPT-2's: split, view, transpose) -> ``tvm_torch.attention_views``
    (``attention_views_masked``) on those tensors, which ATen reads as strided views, instead
    of TVM kernels copying each of q, k and v twice."""
    return _AttentionOnViews(_bindings(func)).visit_expr(func)


_SCALAR_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


def _permutation(call: relax.Call) -> Optional[list]:
    """The axes of a ``permute_dims`` call (its default reverses them)."""
    rank = len(_dims(call.args[0]) or [])
    if not rank:
        return None
    if call.attrs.axes is None:
        return list(reversed(range(rank)))
    return [int(a) % rank for a in call.attrs.axes]


def _drop_permutes_around_elementwise(func: relax.Function, depth: int = 4) -> relax.Function:
    """``permute_dims(f(permute_dims(x)))`` -> ``f(x)`` when the permutations cancel and ``f`` is
    a chain of up to ``depth`` clips and arithmetic with one-element constants; and
    ``mean(f(permute_dims(x)))`` -> a mean of ``f(x)`` over the same axes of ``x``.

    ConvertLayout has no layout rule for ``clip``: it goes back to NCHW around each clip of an
    NHWC tensor (relu6, hardswish, hardsigmoid), and the transposes, fused into the
    elementwise kernel, make it walk memory with a stride. Without them the activation can
    become a convolution epilogue (:func:`_rewrite_convs`).
    """
    bound = _bindings(func)

    def elementwise(expr) -> bool:
        if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
            return False
        if expr.op.name == "relax.clip":
            return True
        return expr.op.name in _SCALAR_BINARY and _scalar(expr.args[1]) is not None

    def below(call):
        """``(chain, source)``: the elementwise ops (up to ``depth``) that ``call`` reads
        through, outermost first, and the value under them."""
        chain, expr = [], bound.get(call.args[0], call.args[0])
        while elementwise(expr) and len(chain) < depth:
            chain.append(expr)
            expr = bound.get(expr.args[0], expr.args[0])
        return chain, expr

    def replay(chain, source):
        """The elementwise ``chain`` applied to ``source`` instead."""
        for op in reversed(chain):
            source = relax.Call(op.op, [source] + list(op.args[1:]), op.attrs)
        return source

    def rewrite(call, _matched):
        chain, expr = below(call)
        if not chain or not isinstance(expr, relax.Call) or expr.op.name != "relax.permute_dims":
            return call
        first, second = _permutation(expr), _permutation(call)
        if first is None or second is None or len(first) != len(second) or \
                [first[a] for a in second] != list(range(len(first))):
            return call  # also when a constant's broadcast changed the rank
        return replay(chain, expr.args[0])

    def rewrite_mean(call, _matched):
        """``mean(f(permute_dims(x, p)), axes)`` -> ``mean(f(x), p[axes])``, then the
        permutation of its few elements: global pooling after a clip (MobileNetV2's last
        relu6) reads the NHWC tensor in place, and the clip fuses into its convolution."""
        chain, expr = below(call)
        perm = _permutation(expr) if isinstance(expr, relax.Call) and \
            expr.op.name == "relax.permute_dims" else None
        axes = _ints(call.attrs.axis) if call.attrs.axis is not None else None
        if not chain or perm is None or axes is None or \
                any(len(_dims(op) or []) != len(perm) for op in chain):
            return call  # also when a constant's broadcast changed the rank
        axes = [a + len(perm) if a < 0 else a for a in axes]
        source_axes = sorted(perm[a] for a in axes)
        kept = [perm[i] for i in range(len(perm)) if i not in axes]  # source dims, in order
        keepdims = bool(call.attrs.keepdims)
        if not keepdims and kept != sorted(kept):
            return call
        result = relax.op.mean(replay(chain, expr.args[0]), source_axes, keepdims)
        return relax.op.permute_dims(result, perm) if keepdims else result

    func = rewrite_call(is_op("relax.permute_dims")(wildcard()), rewrite, func)
    bound = _bindings(func)
    return rewrite_call(is_op("relax.mean")(wildcard()), rewrite_mean, func)


def _calls_op(func: relax.Function, op_name: str) -> bool:
    """Whether ``func`` calls the Relax operator ``op_name`` anywhere."""
    op = tvm.ir.Op.get(op_name)
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.same_as(op):
            found.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return bool(found)


def _conv1d_as_conv2d(func: relax.Function) -> relax.Function:
    """CPU conv1d (NCW, constant weight, float32) -> an NHWC conv2d of height 1, which
    :func:`_rewrite_convs` gives to oneDNN (TVM's default conv1d schedule is ~100x slower).

    The transposes around it cancel against a model's own (``x.permute(0, 2, 1)`` after
    Whisper's convolutions) in :func:`_fold_permutes`.
    """
    def rewrite(call, _matched):
        attrs = call.attrs
        x, weight = call.args
        dims = _static_shape(x)
        if (attrs.data_layout != "NCW" or attrs.kernel_layout != "OIW"
                or attrs.out_layout != "NCW" or dims is None or len(dims) != 3
                or str(call.ty.dtype) != "float32" or str(x.ty.dtype) != "float32"):
            return call
        left, right = (int(p) for p in attrs.padding)
        kernel = const_value(weight)
        rows = relax.op.expand_dims(relax.op.permute_dims(x, [0, 2, 1]), 1)  # N, 1, W, C
        conv = relax.op.nn.conv2d(
            rows, relax.const(kernel[:, :, None, :]), strides=(1, int(attrs.strides[0])),
            padding=(0, left, 0, right), dilation=(1, int(attrs.dilation[0])),
            groups=int(attrs.groups), data_layout="NHWC", kernel_layout="OIHW",
            out_layout="NHWC", out_dtype="float32")
        return relax.op.permute_dims(relax.op.squeeze(conv, [1]), [0, 2, 1])

    return rewrite_call(is_op("relax.nn.conv1d")(wildcard(), is_const()), rewrite, func)


def offload_pass(gpu: bool = False, bfloat16: bool = False,
                 tvm_wins: Optional[Mapping[str, bool]] = None,
                 sites: Optional[List[ConvSite]] = None) -> tvm.transform.Pass:
    """The offload as a module pass over ``main`` (after params were bound as constants).

    Parameters
    ----------
    gpu : bool
        Build for CUDA (cuDNN/cuBLAS through ATen, NCHW, float32/float16) instead of the CPU
        (oneDNN NHWC with prepacked weights and MKL, float32).
    bfloat16 : bool
        On CPU, run the convolutions, linear layers and attention in bfloat16 (oneDNN's and
        ATen's kernels, weights in bfloat16, results in bfloat16 as under ``torch.autocast``,
        passed as bfloat16 from one such kernel to the next: :mod:`.bfloat16_activations`);
        the TVM kernels between them compute in float32.
    tvm_wins : mapping of str to bool, optional
        Per :attr:`ConvSite.variant`, whether its tuned TVM kernel was measured faster than
        oneDNN's (:mod:`.vendor_choice`): a CPU convolution geometry whose every chain here won
        stays TVM code.
    sites : list of ConvSite, optional
        Collects the CPU convolutions (static shapes, not squeeze-excite gates) put on oneDNN.
    """
    compute_dtype = "bfloat16" if bfloat16 and not gpu else "float32"

    @tvm.transform.module_pass(opt_level=0, name="TvmTorchVendorOffload")
    def _offload(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        # ConvertLayout only where there are convolutions: it is not a no-op elsewhere (it
        # fails on the attention graphs of some exported transformer layers).
        if not gpu and _calls_op(mod["main"], "relax.nn.conv2d"):
            mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OIHW"]})(mod)
            mod = relax.transform.FoldConstant()(mod)
        func = mod["main"]
        if not gpu:
            func = _drop_permutes_around_elementwise(_conv1d_as_conv2d(func))
        func = _rewrite_convs(func, gpu, compute_dtype, tvm_wins, sites)
        func = _rewrite_matmuls(_unflatten_linears(func), gpu, compute_dtype)
        func = _rewrite_normalizations(func, gpu)
        func = _rewrite_pools(func, gpu)
        func = _rewrite_means(func, gpu)
        func = _rewrite_unary(func, gpu)
        func = _rewrite_attention(func, gpu)
        if not gpu:  # ATen's CUDA kernels not checked for rows with no key
            func = _drop_row_zeroing(func)
        func = _fold_permutes(func)
        if not gpu:  # not yet checked on a GPU
            func = _attention_on_views(func)
        if compute_dtype == "bfloat16":
            func = bfloat16_activations(func)
        mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
        mod["main"] = func
        mod = relax.transform.DeadCodeElimination(["main"])(mod)
        # bfloat16_activations casts the convolutions' biases: once, here.
        return relax.transform.FoldConstant()(mod) if compute_dtype == "bfloat16" else mod

    return _offload


def nchw_input_pass() -> tvm.transform.Pass:
    """A CPU program's convolutions of its own NCHW inputs read them as they are
    (``tvm_torch.conv2d_nchw_input``, see :func:`_convs_read_nchw_inputs`); run after
    :func:`offload_pass`."""
    return _main_pass("TvmTorchConvNchwInputs", _convs_read_nchw_inputs, dead_code=True)


#: CPU vendor kernels and their destination-passing variants, which write their result into
#: memory the program's plan allocated (reused between calls and between tensors whose
#: lifetimes do not overlap) instead of memory ATen allocates at every call: glibc's malloc
#: was 5-6% of MobileNetV2's time.
_DESTINATION_PASSING = {
    "tvm_torch.conv2d_nhwc": "tvm_torch.conv2d_nhwc_out",
    "tvm_torch.conv2d_nchw_input": "tvm_torch.conv2d_nchw_input_out",
    "tvm_torch.conv2d_add_nhwc": "tvm_torch.conv2d_add_nhwc_out",
}


def _results_in_planned_memory(func: relax.Function) -> relax.Function:
    """Each call of a kernel of :data:`_DESTINATION_PASSING` -> ``R.call_dps_packed`` of its
    destination-passing variant, with the same arguments and result type."""

    def rewrite(call: relax.Call, name: str) -> Optional[relax.Expr]:
        out = _DESTINATION_PASSING.get(name)
        if out is None or not isinstance(call.ty, relax.TensorType):
            return None
        return relax.call_dps_packed(out, relax.Tuple(list(call.args[1:])), call.ty)

    return _rewrite_packed_calls(func, rewrite)


def destination_passing_pass() -> tvm.transform.Pass:
    """A CPU program's convolutions write their results into memory the program plans
    (:func:`_results_in_planned_memory`); run last among the vendor passes (the others match
    the ``R.call_pure_packed`` form)."""
    return _main_pass("TvmTorchDestinationPassing", _results_in_planned_memory, dead_code=False)


__all__ = ["ConvSite", "conv_key", "destination_passing_pass", "nchw_input_pass",
           "offload_pass"]
