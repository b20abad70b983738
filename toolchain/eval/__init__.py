"""Quality metrics, compression accounting, reports and image grids."""
