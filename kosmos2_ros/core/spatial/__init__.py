"""The spatial side: model boxes to pixels and camera rays, object geometry from RGB-D, tracks across frames."""
