"""Model side of kosmos2_ros: no rclpy, no message types."""
