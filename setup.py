"""dreamer_tf: Dreamer v1 in TensorFlow 2 (see README.md)."""
from setuptools import find_packages, setup

setup(
    name="dreamer_tf",
    version="0.1.0",
    description="A TensorFlow 2 reproduction of Dreamer v1 (Dream to Control, Hafner et al., ICLR 2020)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["dreamer_tf", "dreamer_tf.*"]),
    data_files=[
        ("share/dreamer_tf/configs", ["configs/dreamer.yaml"]),
        ("share/dreamer_tf/published", [f"results/published/{name}" for name in (
            "README.md", "LICENSE-scores", "dmc_baselines.json", "dreamer_paper_table.json",
            "dreamer_v1_curves.json")]),
    ],
    install_requires=[
        "tensorflow==2.21.0",
        "tensorflow-probability==0.25.0",
        "tf-keras==2.21.0",  # TFP 0.25 refuses to import without it; models use Keras 3
        "dm-control==1.0.50",
        "mujoco==3.17.0",  # mujoco 4.0 breaks dm_control 1.0.50 (flex_vertedge)
        "numpy>=1.26,<3",
        "lz4>=4.3,<5",  # the replay's chunked episode files (dreamer_tf/data/chunks.py)
        "ruamel.yaml>=0.18",
        "imageio>=2.30",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tensorboard==2.21.0",
    ],
    extras_require={
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
        "atari": ["ale-py==0.12.1"],
        "gym": ["gymnasium[classic-control]==1.4.0"],  # classic-control: pygame for rgb_array
        "cluster": ["ray[default]>=2.40"],
        "wandb": ["wandb==0.31.0"],  # loggers: [..., wandb]
        "mlflow": ["mlflow==3.17.2"],  # loggers: [..., mlflow]
        "dev": ["pytest>=8", "pytest-xdist==3.8.0", "ale-py==0.12.1", "ray[default]>=2.40",
                "gymnasium[classic-control]==1.4.0", "wandb==0.31.0", "mlflow==3.17.2"],
    },
    entry_points={"console_scripts": ["dreamer-tf=dreamer_tf.cli:main"]},
)
