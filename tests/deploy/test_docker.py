"""The image recipes (no test can build them): pinned base, plugin installed, `vllm serve`."""

from __future__ import annotations

import json
import re

from .conftest import REPO

DOCKER = REPO / "deploy" / "docker"


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def base_image(name: str) -> str:
    ins = instructions(name)
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    (base,) = [a for op, a in ins if op == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


def entrypoint(name: str) -> list[str]:
    ins = dict(instructions(name))
    return json.loads(ins["ENTRYPOINT"])


def runs(name: str) -> str:
    return "\n".join(a for op, a in instructions(name) if op == "RUN")


def test_gpu_image():
    base = base_image("Dockerfile")
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", base), base
    assert ("COPY", ". .") in instructions("Dockerfile")
    assert re.search(r"pip install [^\n]* \.(\s|$)", runs("Dockerfile"))
    assert entrypoint("Dockerfile") == ["vllm", "serve"]


def test_cpu_image():
    base = base_image("Dockerfile.cpu")
    assert re.fullmatch(r"python:\d+\.\d+-slim(-\w+)?", base), base
    run = runs("Dockerfile.cpu")
    install = run.index('pip install --no-cache-dir ".[cpu]"')
    uninstall = run.index("pip uninstall -y torchvision torchaudio torchcodec")
    assert install < uninstall
    assert entrypoint("Dockerfile.cpu") == ["vllm", "serve"]


def test_gpu_image_is_on_a_supported_vllm():
    """The image's vLLM is one the patches were written for (they are version-guarded: an
    image on another vLLM would refuse --model-impl ffnskip at start)."""
    from vllm_ffnskip.patches import SUPPORTED_VLLM, is_supported

    pinned = base_image("Dockerfile").rsplit(":v", 1)[1]
    assert is_supported(pinned), (pinned, [str(v) for v in SUPPORTED_VLLM])
    assert not is_supported("0.34.0")  # the guard has an upper bound the image must respect
