"""`python -m bench.peer_server ARGS`: llama-cpp-python's OpenAI server, ARGS as for
`python -m llama_cpp.server`, with llama.cpp's repacked CPU weight buffers off.

The agent and the direct side load the model with them off
(agent/runtime/llama_cpp.py): their AMX path segfaults on multi-token batches on
some Xeons, and the server has no flag for it. Llama() reads the model's default
parameters from llama_cpp.llama_cpp at load, so they are replaced there before
the server starts.
"""

from __future__ import annotations

import runpy
from typing import Any

import llama_cpp.llama_cpp as llama_lib


def main() -> None:
    defaults = llama_lib.llama_model_default_params

    def model_params() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_lib.llama_model_default_params = model_params
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
