"""The buf.gen.yaml examples for partners (examples/go, examples/typescript) are
valid buf configurations over this repository's workspace: run as documented, with
their remote plugins swapped for a local one (no network here), they generate the
contracts (and, for TypeScript, the vendored google/rpc files that decode errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# A protoc plugin installed with the dev tools; it writes .pyi files.
LOCAL_PLUGIN = "protoc-gen-mypy"


def _generate(template: Path, tmp_path: Path, *inputs: str) -> set[str]:
    config = yaml.safe_load(template.read_text())
    for index, plugin in enumerate(config["plugins"]):
        assert plugin.pop("remote").startswith("buf.build/")
        plugin.pop("opt", None)
        plugin["local"] = LOCAL_PLUGIN
        plugin["out"] = str(tmp_path / "out" / str(index))
    local = tmp_path / "buf.gen.yaml"
    local.write_text(yaml.safe_dump(config))
    subprocess.run(
        [str(BIN / "buf"), "generate", *inputs, "--template", str(local)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        timeout=120,
    )
    outs = [tmp_path / "out" / str(index) for index in range(len(config["plugins"]))]
    return {str(path.relative_to(out)) for out in outs for path in out.rglob("*.pyi")}


@pytest.mark.parametrize(
    ("template", "inputs", "vendored"),
    [
        ("examples/go/buf.gen.yaml", ("proto",), False),
        ("examples/typescript/buf.gen.yaml", (), True),
    ],
)
def test_the_partner_templates_generate_the_contracts(
    tmp_path: Path, template: str, inputs: tuple[str, ...], vendored: bool
) -> None:
    # The command each template documents.
    assert f"buf generate {' '.join(inputs)}".strip() in (ROOT / template).read_text()

    generated = _generate(ROOT / template, tmp_path, *inputs)

    assert "resultity/cloud/v1/inference_service_pb2.pyi" in generated
    assert ("google/rpc/error_details_pb2.pyi" in generated) is vendored
