"""Run 2:4-sparse linears on sparse tensor cores: PyTorch's semi-structured sparse tensors (CUDA, sm80+).

The checkpoint stores sparse weights in a portable compressed form; the device-specific layout
(cuSPARSELt or CUTLASS values + metadata) is built here, after loading, on the GPU that runs the model.
"""

from __future__ import annotations

import torch
from torch import nn

from slmkit.errors import SlmkitError, first_line
from slmkit.models.arch import block_linears, blocks, get_spec
from slmkit.prune.masks import is_n_m_sparse

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def to_semi_structured(model: nn.Module) -> dict[str, str]:
    """Convert every 2:4-sparse block ``nn.Linear`` of a CUDA fp16/bf16 model to a semi-structured weight.

    Linears that are not 2:4 sparse, or whose shape the sparse kernels do not support, stay dense.
    Convert after loading and before inference; save the model before converting (the sparse GPU
    layout is not saved).

    Returns:
        ``{module path: "2:4 sparse" | reason it stayed dense}`` for every block linear.

    Example:
        >>> model = slmkit.load_model("out/smollm2-2of4", dtype=torch.float16, device="cuda")
        >>> from slmkit.prune import to_semi_structured
        >>> to_semi_structured(model)
    """
    from torch.sparse import to_sparse_semi_structured

    parameter = next(model.parameters())
    if parameter.device.type != "cuda":
        raise SlmkitError("2:4 sparse kernels need the model on a CUDA device (load it with device='cuda')")
    if torch.cuda.get_device_capability(parameter.device) < (8, 0):
        raise SlmkitError("2:4 sparse tensor cores need an Ampere (sm80) or newer GPU")
    result = {}
    layers = get_spec(model).layers
    for index, block in enumerate(blocks(model)):
        for name, module in block_linears(model, block):
            path = f"{layers}.{index}.{name}"
            weight = getattr(module, "weight", None)
            if type(module) is not nn.Linear:
                result[path] = f"{type(module).__name__} is not an nn.Linear"
            elif weight.dtype not in SUPPORTED_DTYPES:
                result[path] = f"dtype {weight.dtype} (needs float16 or bfloat16)"
            elif not is_n_m_sparse(weight.data, 2, 4):
                result[path] = "not 2:4 sparse"
            else:
                try:
                    sparse = to_sparse_semi_structured(weight.data)
                except (RuntimeError, ValueError) as error:  # shape constraints of the sparse kernels
                    result[path] = f"unsupported by the sparse kernels ({first_line(error, 120)})"
                    continue
                module.weight = nn.Parameter(sparse, requires_grad=False)
                result[path] = "2:4 sparse"
    return result
