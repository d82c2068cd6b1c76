"""Pure-Python install of kosmos2_ros (CLI and core) for machines without colcon.

The ROS 2 package itself (messages, launch, config, `ros2 run` executables) is built by
colcon through CMakeLists.txt; this file gives `pip install .` the console scripts.
"""
from setuptools import find_packages, setup

setup(
    name="kosmos2_ros",
    version="0.1.0",
    description="Kosmos-2 grounded vision-language node for ROS 2",
    packages=find_packages(include=["kosmos2_ros", "kosmos2_ros.*"]),
    python_requires=">=3.10",
    # The floors are scripts/requirements-jetson.txt's (JetPack 6: numpy 1.x, transformers < 5.15 for its torch
    # 2.5.0a0; test/test_jetson_requirements.py holds them together); torch 2.3 is JetPack 6.0's.
    install_requires=["numpy>=1.21.6", "pillow", "pyyaml", "transformers>=5.0,<6",
                      "safetensors>=0.4.3", "torch>=2.3"],
    extras_require={"onnx": ["onnx>=1.17", "onnxruntime", "onnx-ir"], "test": ["pytest", "hypothesis"]},
    entry_points={
        "console_scripts": [
            "kosmos2-ground = kosmos2_ros.cli:ground_main",
            "kosmos2-build-engines = kosmos2_ros.cli:build_engines_main",
            "kosmos2-demo = kosmos2_ros.cli:demo_main",
            "kosmos2-eval = kosmos2_ros.eval.cli:main",
            "grounding_node = kosmos2_ros.ros.node:main",
        ]
    },
)
