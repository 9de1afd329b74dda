from setuptools import find_packages, setup

setup(
    name="jaxalign",
    version="0.1.0",
    description="Align language models in JAX: SFT, reward models, PPO, DPO family, GRPO/RLOO.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["jaxalign", "jaxalign.*"]),
    package_data={"jaxalign": ["assets/*/*", "recipes/*/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "transformers>=5.23,<6",
        "datasets>=5.2,<6",
        "sentencepiece>=0.2.3,<0.3",
        "ml_collections>=1.1.0,<2",
        "chex>=0.1.92,<0.2",
        "safetensors>=0.6",
        "ml_dtypes>=0.5",
        "numpy>=2",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "jinja2>=3.1",        # chat templates (transformers imports it lazily)
        "pyarrow>=15",        # Parquet data files
        "absl-py>=2",         # multihost flag handling
    ],
    extras_require={
        "test": ["pytest>=8", "torch==2.13.0", "matplotlib>=3.8", "peft>=0.17"],
        "plot": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["jaxalign=jaxalign.cli:main"]},
)
