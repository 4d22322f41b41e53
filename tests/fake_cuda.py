"""A CUDA device emulated on the CPU, to test the suite's GPU code paths where no GPU is present.

Inside :func:`fake_cuda`, ``torch.cuda.is_available()`` is true and a tensor moved or created on ``cuda`` is a
:class:`FakeCudaTensor`: a CPU tensor that reports ``device == cuda:0`` and computes on the CPU with the same
kernels, so a run's numbers are those of a CPU run. What a real GPU rejects is rejected here too, with the
error CUDA gives:

- an operation mixing a cuda tensor with a CPU tensor of one or more dimensions (a 0-dim CPU tensor is a
  scalar and allowed; indexing a cuda tensor with CPU indices is allowed, as on CUDA);
- a CPU ``torch.Generator`` passed to an operation on cuda tensors or to a factory on cuda;
- ``.numpy()`` of a cuda tensor.

It does not emulate CUDA's own random streams, kernels' rounding, streams or memory: it checks placement.
Limits: the wrapper is a CPU tensor to torch's C++ side (autograd's engine needs a device guard that a CPU
build lacks), so ``torch.autocast("cuda")`` does not cast (a bf16 run computes in fp32 here), and code under
``torch.func`` transforms (``vmap``, ``jvp``) cannot run on it: the transform re-enters the unwrapped CPU
computation and mixes devices that a GPU would not.
"""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten

# CUDA accepts CPU index tensors for these (they are copied to the device); every other op rejects a CPU tensor
MIXED_OK = {
    aten.index.Tensor,
    aten.index_put_.default,
    aten.index_put.default,
    aten._index_put_impl_.default,
    aten.copy_.default,
    aten._to_copy.default,
}


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor (``elem``) that says it is on ``cuda:0``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=elem.device,  # the CPU: torch's C++ side (autograd's streams) sees a CPU tensor
            requires_grad=elem.requires_grad,
        )
        out.elem = elem
        return out

    @property
    def device(self):  # what Python code sees
        return CUDA

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False

    def get_device(self):
        return 0

    def __reduce_ex__(self, protocol):  # saved as a cuda tensor is: restored on cuda whatever map_location says
        rebuild = _rebuild_fake_parameter if getattr(self, "_is_param", False) else _rebuild_fake
        return rebuild, (self.elem, self.requires_grad)

    def tolist(self):  # CUDA allows it (a copy to the host)
        return self.elem.tolist()

    def cpu(self, *args, **kwargs):
        return _FromFake.apply(self)

    def __repr__(self):
        return f"FakeCudaTensor({self.elem!r})"

    def numpy(self, *args, **kwargs):
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."
        )

    __torch_function__ = torch._C._disabled_torch_function_impl

    ops = 0  # operations computed on fake cuda tensors (a test can check that a run really went through them)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        FakeCudaTensor.ops += 1
        flat, _ = tree_flatten((args, kwargs))
        if func not in MIXED_OK:
            cpu = [t for t in flat if type(t) is torch.Tensor and t.dim() > 0]  # noqa: E721 (plain CPU tensors)
            if cpu:
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
                    f"(in {func}: CPU {[tuple(t.shape) for t in cpu]})"
                )
        _check_generator(kwargs, func)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            _unwrap(dst).copy_(_unwrap(src), *args[2:])
            return dst
        if func is aten._to_copy.default:  # a dtype change (moves to the CPU are .cpu()/.to("cpu"), in Python)
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func._schema.is_mutable or any(a.alias_info and a.alias_info.is_write for a in func._schema.returns):
            # in-place and out= ops: the elem was written; return the wrappers the caller holds
            mutated = [a for a in (list(args) + list(kwargs.values())) if isinstance(a, FakeCudaTensor)]
            if isinstance(out, torch.Tensor) and mutated:
                for m in mutated:
                    if m.elem is out:
                        return m
        return tree_map(_wrap, out)


def _check_generator(kwargs, func) -> None:
    gen = kwargs.get("generator")
    if gen is not None and gen.device.type != "cuda":
        raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{gen.device.type}' (in {func})")


def _rebuild_fake(elem, requires_grad):
    out = elem if isinstance(elem, FakeCudaTensor) else FakeCudaTensor(elem)
    return out.requires_grad_(requires_grad) if out.is_leaf else out


def _rebuild_fake_parameter(elem, requires_grad):
    return torch.nn.Parameter(_rebuild_fake(elem, False), requires_grad)


_LOADED_ON_CUDA: set[int] = set()  # data pointers of storages that torch.load's map_location put on cuda


_ORIGINAL_REBUILD = torch._utils._rebuild_tensor_v2


def _rebuild_tensor(storage, *args, **kwargs):
    """torch's tensor rebuild (in place of it while torch.load runs), on cuda when map_location put the storage
    there."""
    out = _ORIGINAL_REBUILD(storage, *args, **kwargs)
    return FakeCudaTensor(out) if storage.nbytes() and storage.data_ptr() in _LOADED_ON_CUDA else out


def _unwrap(x):
    return x.elem if isinstance(x, FakeCudaTensor) else x


def _wrap(x):
    return FakeCudaTensor(x) if type(x) is torch.Tensor else x  # noqa: E721


class _ToFake(torch.autograd.Function):
    """CPU → fake cuda, differentiable (the gradient comes back to the CPU)."""

    @staticmethod
    def forward(ctx, x):
        return FakeCudaTensor(x.detach().clone() if x.requires_grad else x)

    @staticmethod
    def backward(ctx, grad):
        return _unwrap(grad)


class _FromFake(torch.autograd.Function):
    """Fake cuda → CPU, differentiable."""

    @staticmethod
    def forward(ctx, x):
        return x.elem

    @staticmethod
    def backward(ctx, grad):
        return _wrap(grad)


class _FactoryMode(TorchDispatchMode):
    """Factories and copies asked for on cuda build on the CPU and wrap the result."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if not any(isinstance(t, FakeCudaTensor) for t in tree_flatten((args, kwargs))[0]) and _is_cuda(
            kwargs.get("device")
        ):
            _check_generator(kwargs, func)
            kwargs["device"] = torch.device("cpu")
            if func is aten._to_copy.default:
                return _ToFake.apply(func(*args, **kwargs))
            return _wrap(func(*args, **kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    """Emulate one CUDA device for the duration (see the module's docstring)."""
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if kwargs.get("copy"):  # _parse_to does not take it; a copy of what .to gives
            return to(self, *args, **{k: v for k, v in kwargs.items() if k != "copy"}).clone()
        kwargs.pop("copy", None)
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        keep = {k: v for k, v in (("dtype", dtype), ("memory_format", memory_format)) if v is not None}
        if _is_cuda(device) and not isinstance(self, FakeCudaTensor):
            return _ToFake.apply(original_to(self, **keep) if keep else self)
        if isinstance(self, FakeCudaTensor) and device is not None and not _is_cuda(device):
            cpu = _FromFake.apply(self)  # C++ sees both on the CPU and would return the wrapper itself
            return original_to(cpu, **keep) if keep else cpu
        if isinstance(self, FakeCudaTensor) and _is_cuda(device):
            return original_to(self, **keep) if keep else self
        return original_to(self, *args, **kwargs)

    def cuda(self, device=None, non_blocking=False, **kwargs):
        return self if isinstance(self, FakeCudaTensor) else _ToFake.apply(self)

    def from_data(original):
        def build(data, *args, device=None, **kwargs):  # torch.tensor/as_tensor bypass dispatch modes
            if _is_cuda(device):
                return _ToFake.apply(original(_unwrap(data), *args, **kwargs))
            return original(data, *args, device=device, **kwargs)

        return build

    original_storage_to, original_load = torch.UntypedStorage.to, torch.load

    def load(*args, **kwargs):  # tensors whose storage map_location put on cuda come back as cuda tensors
        if kwargs.get("weights_only", True) is not False:
            return original_load(*args, **kwargs)  # (weights-only loads resolve torch's rebuild by identity)
        _LOADED_ON_CUDA.clear()
        try:
            with mock.patch("torch._utils._rebuild_tensor_v2", _rebuild_tensor):
                return original_load(*args, **kwargs)
        finally:
            _LOADED_ON_CUDA.clear()

    def storage_to(self, *args, **kwargs):  # torch.load mapping a CPU-saved storage onto cuda
        device = kwargs.get("device", args[0] if args else None)
        if _is_cuda(device):
            _LOADED_ON_CUDA.add(self.data_ptr())
            return self
        return original_storage_to(self, *args, **kwargs)

    patches = [
        mock.patch.object(torch.UntypedStorage, "to", storage_to),
        mock.patch("torch.load", load),
        mock.patch("torch.tensor", from_data(torch.tensor)),
        mock.patch("torch.as_tensor", from_data(torch.as_tensor)),
        # module.to(device) keeps its Parameter objects (as .data = does across real devices): swap their contents
        mock.patch("torch.__future__.get_swap_module_params_on_conversion", lambda: True),
        mock.patch.object(torch.Tensor, "to", to),
        mock.patch.object(torch.Tensor, "cuda", cuda),
        mock.patch.object(torch.Tensor, "pin_memory", lambda self, *a, **k: self),
        mock.patch.object(torch.Tensor, "is_pinned", lambda self, *a, **k: False),
        mock.patch("torch.cuda._lazy_init", lambda: None),
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.is_initialized", lambda: True),
        mock.patch("torch.cuda.device_count", lambda: 1),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda.get_device_name", lambda *a: "fake-cuda (CPU)"),
        mock.patch("torch.cuda.synchronize", lambda *a: None),
        mock.patch("torch.cuda.max_memory_allocated", lambda *a: 0),
        mock.patch("torch.cuda.memory_allocated", lambda *a: 0),
        mock.patch("torch.cuda.reset_peak_memory_stats", lambda *a: None),
        mock.patch("torch.cuda.manual_seed", lambda *a: None),
        mock.patch("torch.cuda.manual_seed_all", lambda *a: None),
        mock.patch("torch.cuda.get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)]),  # on the CPU
        mock.patch("torch.cuda.set_rng_state_all", lambda *a: None),
        mock.patch("torch.cuda.get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
        mock.patch("torch.cuda.set_rng_state", lambda *a, **k: None),
        mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator")
        stack.enter_context(_FactoryMode())
        yield
