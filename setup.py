"""Packaging for mmpretrain (distribution name ``mmpretrain-clip``).

The import name is ``mmpretrain``; OpenMMLab publishes an unrelated package with that
distribution name, so ours is distributed as ``mmpretrain-clip`` and the two cannot share
an environment. ``mmpretrain.kernels`` lives in the top-level ``kernels/`` folder.

Packages are found, not listed (a hand-written list once left ``mmpretrain.objectives`` out of the
wheel). The wheel also carries the tokenizer's BPE vocabulary and every YAML of ``configs/`` as
``mmpretrain/configs/`` (data only), so ``mmpretrain-train demo`` runs without a checkout.
tests/integration/test_wheel.py builds the wheel and uses it from outside the checkout.

setup.py keeps ranges a real GPU cluster can satisfy; ``constraints.txt`` pins the exact
versions the tests ran with.
"""

from setuptools import find_packages, setup

# kernels/ is installed as mmpretrain.kernels, configs/ as mmpretrain/configs (YAML files, no Python)
PACKAGE_DIR = {"mmpretrain.kernels": "kernels", "mmpretrain.configs": "configs"}
PACKAGES = [
    *find_packages(include=["mmpretrain", "mmpretrain.*"]),
    "mmpretrain.kernels",
    *(f"mmpretrain.kernels.{p}" for p in find_packages("kernels")),
    "mmpretrain.configs",
]

setup(
    name="mmpretrain-clip",
    version="0.1.0",
    description="Pretrain CLIP/SigLIP image-text models at scale: WebDataset, DeepSpeed ZeRO, Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"mmpretrain.data": ["*.txt.gz"], "mmpretrain.configs": ["**/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "triton>=3.0",
        "deepspeed>=0.15",
        "webdataset>=0.2.86,<2",
        "transformers>=4.45",
        "safetensors>=0.4",
        "wandb>=0.17",
        "omegaconf>=2.3",
        "pillow>=10",
        "numpy>=1.24",
        "tqdm>=4.60",
        "regex",
        "ftfy",
        "simplejpeg>=1.7",  # reduced-scale JPEG decoding (the fast decode path)
        "pyarrow>=14",  # parquet caption files in mmpretrain-make-shards
        "matplotlib>=3.7",  # mmpretrain-plot, mmpretrain-inspect-shards --out
        "psutil>=5.9",  # the stop file's age against the process start (also a DeepSpeed dependency)
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "wheel>=0.38",  # tests/integration/test_wheel.py builds without isolation (setuptools < 70.1 needs it)
            "open_clip_torch>=2.24",
            "scikit-image>=0.22",
            "onnx>=1.17",
            "onnxscript>=0.2",
            "onnxruntime>=1.20",
            "peft>=0.13",
        ],
        # python -m mmpretrain.instruct: LoRA through peft
        "instruct": ["peft>=0.13"],
        # python -m mmpretrain.export: ONNX files checked with onnxruntime
        "export": ["onnx>=1.17", "onnxscript>=0.2", "onnxruntime>=1.20"],
    },
    entry_points={
        "console_scripts": [
            "mmpretrain-train=mmpretrain.train:main",
            "mmpretrain-eval=mmpretrain.eval.cli:main",
            "mmpretrain-adapt=mmpretrain.adapt:main",
            "mmpretrain-export=mmpretrain.export:main",
            "mmpretrain-convert=mmpretrain.convert.cli:main",
            "mmpretrain-make-shards=mmpretrain.tools.make_shards:main",
            "mmpretrain-inspect-shards=mmpretrain.tools.inspect_shards:main",
            "mmpretrain-plot=mmpretrain.tools.plot_metrics:main",
        ],
    },
)
