"""kosmos2_ros: Kosmos-2 grounding for ROS 2.

`kosmos2_ros.core` holds the model side and imports no ROS; `kosmos2_ros.ros` is the node.
The generated interfaces (`kosmos2_ros.msg`, `.srv`, `.action`) may live in a colcon install
tree apart from these sources; extending the package path lets both be imported as one.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = "0.1.0"
