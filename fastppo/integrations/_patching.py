"""What every peer integration shares: replace a peer's function everywhere the peer bound it, put
the originals back exactly, and warn outside the peer versions the patch was tested with."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
import warnings

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fastppo.kernels import reference, token_logprobs
from fastppo.kernels._checks import BACKENDS


def require(package: str, extra: str):
    """Import `package` or say which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"fastppo.integrations needs `{package}`, which is not installed: "
                          f"pip install 'fastppo[{extra}]' (or pip install {package})") from err


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return backend


def logprobs_entropy(logits, labels, *, temperature=1.0, ignore_index=-100, with_entropy=False,
                     backend="auto"):
    """(log p(labels), entropy or None) of softmax(logits / T), float32; float64 logits go through
    fastppo's float64 reference and stay float64 (a peer keeps float64 as float64)."""
    if logits.dtype == torch.float64:
        out = reference.token_logprobs(logits, labels.long(), temperature=temperature,
                                       ignore_index=ignore_index, return_entropy=with_entropy)
    else:
        out = token_logprobs(logits, labels.long(), temperature=temperature, ignore_index=ignore_index,
                             return_entropy=with_entropy, backend=backend)
    return out if with_entropy else (out, None)


def entropy(logits, *, temperature=1.0, backend="auto"):
    """The entropy of softmax(logits / T) over the last axis, for any leading shape (even none)."""
    rows = logits.reshape(-1, logits.shape[-1])
    zeros = torch.zeros(rows.shape[0], dtype=torch.long, device=logits.device)
    _, ent = logprobs_entropy(rows, zeros, temperature=temperature, with_entropy=True, backend=backend)
    return ent.view(logits.shape[:-1])


def context(patcher, patch, unpatch):
    """The `patched()` context manager of an integration: patch for the block, then restore the peer
    (unpatched, or patched with the backend it had, as before the block)."""
    @contextlib.contextmanager
    def patched(backend: str = "auto"):
        was, backend_before = patcher.active, patcher.backend
        patch(backend)
        try:
            yield
        finally:
            if was:
                patcher.backend = backend_before
            else:
                unpatch()
    patched.__doc__ = "`with patched(): ...` runs the block patched and restores the peer after it."
    return patched


class Patcher:
    """The replacements made in one peer package, and how to undo them.

    A peer binds a helper by name in every module that does `from .utils import helper`, so a
    replacement is written into each loaded module of the package that holds the original object;
    modules imported later take the replacement from the module they import it from. `restore()`
    puts the original back wherever a replacement is found, including in those later modules.
    """

    def __init__(self, distribution: str, package: str, tested: str, extra: str):
        self.distribution, self.package, self.tested = distribution, package, SpecifierSet(tested)
        self.extra = extra
        self.backend = "auto"  # the kernels' backend the replacements call
        self.replaced: dict[tuple[str, str], tuple[object, object]] = {}  # (module, name) -> (orig, new)

    def begin(self, backend: str) -> bool:
        """What every patch() does first: the peer is importable, its version checked (a warning
        outside the tested range), the backend valid. True when the replacements are still to make."""
        require(self.package, self.extra)
        self.check_version()
        self.backend = check_backend(backend)
        return not self.active

    @property
    def active(self) -> bool:
        return bool(self.replaced)

    def check_version(self) -> Version:
        """Warn (not fail) when the installed peer is outside the versions this patch was tested with."""
        version = Version(importlib.metadata.version(self.distribution))
        if version not in self.tested:
            warnings.warn(f"fastppo.integrations: {self.distribution} {version} is outside the versions "
                          f"this patch was tested with ({self.tested}); the patched functions may not "
                          "match its semantics", RuntimeWarning, stacklevel=3)
        return version

    def _modules(self):
        prefix = self.package + "."
        return [m for name, m in list(sys.modules.items())
                if m is not None and (name == self.package or name.startswith(prefix))]

    def replace(self, module_name: str, name: str, new) -> bool:
        """Replace `module_name.name` and every other binding of the same object in the package.
        False (and nothing replaced) when the peer has no such attribute."""
        module = importlib.import_module(module_name)
        original = getattr(module, name, None)
        if original is None:
            return False
        for m in self._modules():
            if m.__dict__.get(name) is original:
                setattr(m, name, new)
                self.replaced[(m.__name__, name)] = (original, new)
        return True

    def restore(self) -> None:
        originals = {(id(new), name): original for (_, name), (original, new) in self.replaced.items()}
        for m in self._modules():
            for (new_id, name), original in originals.items():
                if id(m.__dict__.get(name)) == new_id:
                    setattr(m, name, original)
        self.replaced.clear()
