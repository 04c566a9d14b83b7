# SPDX-License-Identifier: Apache-2.0
"""hotweights: push new model weights into running processes with minimal pause."""

import torch  # noqa: F401  -- libc10/libtorch must be loaded before _C

try:
    from . import _C
except ImportError as e:  # pragma: no cover - exercised by hand when the build is missing
    raise ImportError(
        f"hotweights: the compiled extension hotweights._C could not be loaded ({e}). "
        f"Build it for this environment (torch {torch.__version__}) with "
        "`pip install --no-build-isolation -e .` in the source tree."
    ) from e

_built_torch = _C.build_info()["torch_version"]
if _built_torch != torch.__version__:
    raise ImportError(
        f"hotweights._C was built against torch {_built_torch} but torch {torch.__version__} is "
        "installed; rebuild with `pip install --no-build-isolation -e .`"
    )

__version__ = _C.build_info()["version"]

from .manifest import Manifest  # noqa: E402
from .module import CommitInfo, HotweightsHandle, install as _install, register  # noqa: E402
from .plan import Plan, make_plan, verify_plan  # noqa: E402
from .replicate import Publisher, PublishError, PublishResult, UpdateError  # noqa: E402

_install()  # torch.nn.Module.register_hotweights

__all__ = ["Publisher", "PublishResult", "PublishError", "UpdateError", "register",
           "HotweightsHandle", "CommitInfo", "Manifest", "Plan", "make_plan", "verify_plan",
           "__version__"]
