"""vqgen: tokenizers and autoregressive generators for images and video, in JAX/Flax."""
import setuptools

setuptools.setup(
    name="vqgen",
    version="0.1.0",
    description=(
        "JAX/Flax library and CLI for visual tokenizers (VQGAN, ViT-VQGAN, MAGVIT, LFQ, FSQ, "
        "IBQ, VAR) and the autoregressive/masked generators over their tokens."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["vqgen", "vqgen.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "chex>=0.1.90,<0.2",
        "grain>=0.2.18,<0.3",
        "ml-collections>=1.1,<2",
        "tensorflow-datasets>=4.9.10,<5",
        "absl-py>=2.1,<3",
        "numpy>=2.0,<3",
        "scipy>=1.13,<2",
        "mlxtend>=0.25,<0.26",
        "scikit-image>=0.24,<0.27",
        "pillow>=10,<14",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
    ],
    extras_require={
        # gs:// workdirs and data (Orbax writes arrays itself; everything else goes through etils.epath)
        "gcs": ["gcsfs>=2024.2"],
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            # the gs:// workdir test: gcsfs and an in-memory Cloud Storage server on the loopback interface
            "gcsfs>=2024.2",
            "gcp-storage-emulator>=2024.8",
            # CPU wheel, used only by the reference checks against PyTorch implementations.
            "torch==2.13.0",
            # tests/test_notebooks.py runs every notebook under notebooks/ top to bottom
            "nbclient>=0.10,<0.12",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
            "matplotlib>=3.8,<4",
        ],
        # the plots of the notebooks under notebooks/
        "notebooks": ["matplotlib>=3.8,<4"],
    },
    entry_points={"console_scripts": ["vqgen=vqgen.main:run"]},
)
