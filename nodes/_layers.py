"""What the host does to a comfy.ops layer's weights at compute time: shared by the fp8 layers' direct path
and the CUDA-graph paths of DeepCache and the fp8 loaders (nodes/_unet_graph.py): all need layers the host
leaves alone."""
from __future__ import annotations

import comfy.ops


def host_free(layer) -> bool:
    """The host has nothing to do to this comfy.ops layer's weights at compute time: no weight/bias functions (a
    LoRA in low-VRAM mode, weight wrappers), no low-VRAM functions and no dynamic-VRAM staging (`_v`). Plain
    dict lookups: nn.Module's __getattr__ miss path (what hasattr/getattr take here) costs microseconds,
    and this runs for every layer of every step."""
    d = layer.__dict__
    return (not layer.weight_function and not layer.bias_function and d.get("weight_lowvram_function") is None
            and d.get("bias_lowvram_function") is None and "_v" not in d and "_v" not in layer._parameters
            and "_v" not in layer._buffers)


def host_casts(module) -> bool:
    """A comfy.ops layer whose weights the host casts, moves or patches per call (not a plain layer)."""
    return isinstance(module, comfy.ops.CastWeightBiasOp) and (module.comfy_cast_weights or not host_free(module))


def computes_plainly(module, x) -> bool:
    """Nothing for the host to do to this module's weights at compute time on x, and they already sit on
    x's device (floating ones in x's dtype): the work a CUDA graph can hold. A layer class may decide for
    itself with a method `sdxlopt_direct(x)` (the fp8 layers: an fp8 weight it upcasts itself is plain)."""
    direct = getattr(type(module), "sdxlopt_direct", None)
    if direct is not None:
        return direct(module, x)
    if host_casts(module):
        return False
    for t in (*module._parameters.values(), *module._buffers.values()):
        if t is not None and (t.device != x.device or (t.is_floating_point() and t.dtype != x.dtype)):
            return False
    return True
