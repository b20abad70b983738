"""Built-in quantization methods; importing this package registers them."""

from toolchain.methods import balanced, efficientdm, minmax, passionsr, qartsr, qdiffusion, svdquant  # noqa: F401
from toolchain.quant.registry import METHODS, MethodContext, QuantMethod, get_method, register_method

__all__ = ["METHODS", "MethodContext", "QuantMethod", "get_method", "register_method"]
