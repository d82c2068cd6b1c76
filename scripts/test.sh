#!/usr/bin/env bash
# The whole test suite, with the environment set-up made (real rclpy over loopback DDS).
# ROS_DISTRO_WHEELS=jazzy scripts/test.sh [TESTS...] runs in the Jazzy environment (setup.sh --distro jazzy).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
exec scripts/ros-env python -m pytest -q "$@"
