"""herd.quant: smaller weights for faster CPU decoding and for llama.cpp's formats.

- int8.py   Int8Linear: per-channel int8 weight-only linear (torch._weight_int8pack_mm on CPU),
            with an input gradient for fine-tuning adapters on a frozen int8 base
- int4.py   Int4Linear: group-wise int4 weight-only linear (_weight_int4pack_mm_for_cpu)
- model.py  QuantConfig and quantize_model (a model transform: replaces linear layers)
- ggml.py   llama.cpp's Q8_0 / Q4_0 blocks, bit-equal to ggml-quants.c (used by the GGUF writer)

Only PyTorch's own CPU kernels are used; torchao was measured slower on CPU here.
"""

from herd.quant.ggml import dequantize_blocks, quantize_blocks
from herd.quant.int4 import Int4Linear, dequantize_int4, quantize_int4
from herd.quant.int8 import Int8Linear, dequantize_int8, quantize_int8
from herd.quant.model import METHODS, QuantConfig, quantize_model, quantized_bytes

__all__ = ["Int8Linear", "Int4Linear", "QuantConfig", "quantize_model", "quantized_bytes", "METHODS",
           "quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4",
           "quantize_blocks", "dequantize_blocks"]
