"""Simulated low-precision arithmetic: float formats, rounding, chunked dot products.

Wang et al. 2018 (FP8 training with chunk-based accumulation) and Sakr et al. 2019
(accumulation bit-width), papers.md section 3.
"""
from accel.lowprec.formats import (BF16, E4M3, E5M2, E6M9, FORMATS, FP16, FP32, FloatFormat,
                                   get_format, is_representable, quantize)
from accel.lowprec.chunked import chunked_dot_general, make_chunked_dot_general
from accel.lowprec.rounding import add_rounded
from accel.lowprec.gemm import (GemmSettings, LayerSettings, LowPrecConv, LowPrecDotGeneral,
                                accumulation_lengths)
from accel.lowprec.optimizer import lowprec_updates, scale_gradient
